"""A Stable Diffusion pipeline as the trainer sees it: UNet + text encoder as one module, with a
method's adapters put in (never the VAE)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from selora.config import ConfigError, TrainConfig
from selora.core.layers import LoRALinear, lora_layers
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


def enable_checkpointing(model: DiffusionModel, use_reentrant: bool = False) -> None:
    """Activation checkpointing in the UNet and the text encoder, non-reentrant by default.

    With frozen embeddings the text encoder's input carries no gradient, and a REENTRANT checkpoint
    (transformers 4.x's default) then gives its layers' adapters none; so the checkpoint is
    non-reentrant and the embedding output is made to require grad (``enable_input_require_grads``;
    which also rescues ``use_reentrant=True``). transformers >= 5 calls it
    ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` is deprecated there).
    """
    from torch.utils.checkpoint import checkpoint

    def unet_checkpoint(module, *args):  # diffusers' own default, with use_reentrant made explicit
        return checkpoint(module.__call__, *args, use_reentrant=use_reentrant)

    model.unet.enable_gradient_checkpointing(unet_checkpoint)
    te, kwargs = model.text_encoder, {"use_reentrant": use_reentrant}
    if hasattr(te, "activation_checkpointing_enable"):
        te.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4.x
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not (getattr(te, "_require_grads_hooks", None) or getattr(te, "_require_grads_hook", None)):
        te.enable_input_require_grads()  # not already done by transformers (5.x does it; 4.x only for PEFT)


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


def components(pipe_or_models: Any) -> dict[str, nn.Module]:
    """``{"unet": ..., "text_encoder": ...}`` from a pipeline (attributes) or a mapping; Nones dropped."""
    if isinstance(pipe_or_models, Mapping):
        found = {k: v for k, v in pipe_or_models.items() if v is not None}
        unknown = sorted(set(found) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"components: unknown name(s) {unknown}; expected some of {', '.join(COMPONENTS)}")
    else:
        found = {k: getattr(pipe_or_models, k, None) for k in COMPONENTS}
        found = {k: v for k, v in found.items() if v is not None}
    if not found or not all(isinstance(m, nn.Module) for m in found.values()):
        raise TypeError(
            f"expected a pipeline with .unet/.text_encoder or a dict of nn.Modules, got {type(pipe_or_models).__name__}"
        )
    return found


def adapted_layers(pipe_or_models: Any) -> dict[str, dict[str, LoRALinear]]:
    """``{component: {module name: adapter}}`` of the components that carry LoRA/SeLoRA layers."""
    found = {c: lora_layers(m) for c, m in components(pipe_or_models).items()}
    found = {c: layers for c, layers in found.items() if layers}
    if not found:
        raise ValueError("export: no LoRA/SeLoRA layer found (inject adapters with selora.core.inject first)")
    return found
