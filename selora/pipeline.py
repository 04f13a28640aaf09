"""A Stable Diffusion pipeline as the trainer sees it: UNet + text encoder as one module, with a
method's adapters put in (never the VAE)."""

from __future__ import annotations

import torch
from torch import nn

from selora.config import ConfigError, TrainConfig
from selora.methods import METHODS, Adapters

#: The pipeline parts that carry adapters, and the name prefixes of their layers in :class:`DiffusionModel`.
COMPONENTS = ("unet", "text_encoder")


class DiffusionModel(nn.Module):
    """UNet + text encoder as one module (one DDP wrapper, one set of adapters over both).

    ``forward(noisy (N, 4, h, w), t (N,), ids (N, 77)) -> eps prediction (N, 4, h, w)``.
    After :func:`add_adapters`, ``.adapters`` is the method's :class:`~selora.methods.Adapters`.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.adapters: Adapters | None = None

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, t, self.text_encoder(ids)[0]).sample


def cast_trainable(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Every trainable parameter of ``model`` to ``dtype`` in place (identity kept), as diffusers'
    ``cast_training_params`` does: adapters train in float32 under half-precision frozen weights."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def add_adapters(pipe, cfg: TrainConfig, total_steps: int, generator: torch.Generator | None = None) -> DiffusionModel:
    """Put ``cfg.method``'s adapters into ``pipe.unet`` (+ the text encoder); everything else frozen.

    Initial ``lora_A`` rows come from ``generator`` (default: seeded with ``cfg.seed``, the same on
    every process; a method may keep drawing from it). ``total_steps``: the run's optimizer steps
    (for a method with a schedule over steps; any value >= 1 when only loading weights).
    Adapter parameters are float32 even when the frozen weights are half precision.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    pipe.vae.requires_grad_(False)
    model = DiffusionModel(pipe.unet, pipe.text_encoder)
    targets = {"unet": cfg.unet_targets}
    if cfg.text_encoder_targets is not None:
        targets["text_encoder"] = cfg.text_encoder_targets
    try:
        model.adapters = METHODS[cfg.method].from_config(model, targets, cfg, total_steps, gen)
    except ValueError as err:  # e.g. a target that matches no layer
        raise ConfigError(f"method={cfg.method}: {err}") from None
    cast_trainable(model)
    return model
