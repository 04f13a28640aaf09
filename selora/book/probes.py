"""The model-running experiment of chapter 6: does a prompt's findings text change what the model does?

Two paired-seed views. On generated images (image i of every tensor drawn with seed i, so index i is
a paired comparison): :func:`rms_difference`, :func:`prompt_effect` (findings vs a control change vs
a new seed) and :func:`laterality_index` (does the side word move the change to that side). On real
images: :func:`noise_prediction_errors`, the training loss under the true vs an altered prompt on
identical noise. Images are ``(N, C, H, W)`` tensors in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from selora.diffusion import add_noise, loss_target, noise_scheduler, per_sample_errors, tokenize

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "PromptEffect",
    "laterality_index",
    "noise_prediction_errors",
    "prompt_effect",
    "rms_difference",
    "side_fraction",
]


# -- does the image follow the findings? ----------------------------------------------------------
def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(
            f"images: expected two (N, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def rms_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square pixel difference per image pair: ``(N, C, H, W)`` x 2 -> ``(N,)``."""
    _check_pair(a, b)
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt()


def side_fraction(a: torch.Tensor, b: torch.Tensor, side: str) -> float:
    """Share of the squared difference ``sum (a - b)^2`` that lies on the image half showing the
    patient's ``side`` (radiological convention: the patient's left is the image's right half).

    ``a``, ``b``: ``(N, C, H, W)``; 0.5 means the change is not lateralised (with an odd width the
    middle column counts for neither side).
    """
    _check_pair(a, b)
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: expected 'left' or 'right'")
    sq = (a.double() - b.double()).pow(2).sum(dim=(0, 1, 2))  # (W,) energy per image column
    w = sq.shape[0]
    half = sq[w // 2 + w % 2 :] if side == "left" else sq[: w // 2]
    total = sq.sum()
    if total == 0:
        raise ValueError("images: identical, the difference has no energy to locate")
    return float(half.sum() / total)


def laterality_index(left: torch.Tensor, right: torch.Tensor, normal: torch.Tensor) -> np.ndarray:
    """Per paired seed: does the side word move a finding's change to that side?

    ``left``, ``right``, ``normal``: ``(N, C, H, W)`` drawn with seed i at index i for the same finding
    named on the patient's left, on the right, and for ``normal``. Returns ``(N,)``: the share of the
    change ``left_i - normal_i`` on the patient's left (:func:`side_fraction`) minus the share of
    ``right_i - normal_i`` there. 1: each change lands wholly on its named side; 0: the side word does
    not move the change; -1: the sides are swapped.
    """
    _check_pair(left, normal)
    _check_pair(right, normal)
    return np.asarray(
        [
            side_fraction(left[i : i + 1], normal[i : i + 1], "left")
            - side_fraction(right[i : i + 1], normal[i : i + 1], "left")
            for i in range(normal.shape[0])
        ]
    )


@dataclass(frozen=True)
class PromptEffect:
    """Mean RMS pixel differences (images in [-1, 1]) of one paired-seed experiment.

    ``finding``: same seed, findings prompt vs normal prompt; ``control``: same seed, a prompt
    differing in a detail the model should hardly care about (one year of age) vs the normal
    prompt; ``seed``: same normal prompt, neighbouring seeds (how different two draws are anyway).
    """

    finding: float
    control: float
    seed: float

    @property
    def over_control(self) -> float:
        """How many times more the findings change the image than the control change does."""
        return self.finding / self.control

    @property
    def over_seed(self) -> float:
        """The findings change relative to the difference between two seeds of one prompt."""
        return self.finding / self.seed


def prompt_effect(normal: torch.Tensor, finding: torch.Tensor, control: torch.Tensor) -> PromptEffect:
    """The three mean differences of :class:`PromptEffect` from images ``(N, C, H, W)``, N >= 2,
    where image i of each tensor was drawn with seed i (so index i is a paired comparison)."""
    _check_pair(normal, finding)
    _check_pair(normal, control)
    if normal.shape[0] < 2:
        raise ValueError(f"images: need at least 2 seeds, got {normal.shape[0]}")
    return PromptEffect(
        finding=float(rms_difference(finding, normal).mean()),
        control=float(rms_difference(control, normal).mean()),
        seed=float(rms_difference(normal[1:], normal[:-1]).mean()),
    )


# -- does the model use the findings? (noise prediction with the true vs an altered prompt) -------
@torch.no_grad()
def noise_prediction_errors(
    pipe: StableDiffusionPipeline,
    images: torch.Tensor,
    prompts: Sequence[str],
    draws: int = 8,
    seed: int = 0,
    batch: int = 32,
) -> torch.Tensor:
    """Noise-prediction MSE (the training loss) of ``pipe`` on real ``images`` under ``prompts``.

    images: ``(N, C, H, W)`` in [-1, 1] (C = 1 is repeated to the VAE's channels); returns ``(N, draws)``:
    for each image ``draws`` fixed (noise, timestep) pairs from a generator seeded ``seed``, so two
    calls with the same images and seed but different prompts are compared on identical noise.
    Latents are the VAE posterior means scaled by ``vae.config.scaling_factor``.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompts: expected {images.shape[0]} (one per image), got {len(prompts)}")
    unet, vae, tok = pipe.unet, pipe.vae, pipe.tokenizer
    dev, dtype = unet.device, unet.dtype
    scheduler = noise_scheduler(pipe)
    x = images.to(dev, dtype).expand(-1, vae.config.in_channels, -1, -1)
    z0 = torch.cat([vae.encode(c).latent_dist.mean for c in x.split(batch)]).float().cpu()
    z0 = z0 * float(vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((draws, *z0.shape), generator=gen)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (draws, z0.shape[0]), generator=gen)
    ids = tokenize(tok, prompts)
    errors = torch.empty(z0.shape[0], draws, dtype=torch.float64)
    for idx in torch.arange(z0.shape[0]).split(batch):
        emb = pipe.text_encoder(ids[idx].to(dev))[0]
        for d in range(draws):
            z0_i, noise_i, t_i = z0[idx], noise[d, idx], steps[d, idx]
            pred = unet(add_noise(scheduler, z0_i, noise_i, t_i).to(dev, dtype), t_i.to(dev), emb).sample
            errors[idx, d] = per_sample_errors(pred, loss_target(scheduler, z0_i, noise_i, t_i)).double()
    return errors
