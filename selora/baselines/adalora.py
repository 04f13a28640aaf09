"""AdaLoRA (Zhang et al. 2023) through PEFT: SVD-form adapters whose rank budget shrinks 6 -> 4.

PEFT's AdaLoRA layer computes ``y = base(x) + (x (A ⊙ E)^T) B^T · lora_alpha / r`` with
``A`` (r, in), ``E`` (r, 1) the "singular values", ``B`` (out, r). Two things make it AdaLoRA and
both are the training loop's job, which is why this module exposes them explicitly:

- ``update_and_allocate(step)`` after every ``optimizer.step()`` (before ``zero_grad``): scores
  each triplet by smoothed sensitivity |θ ∂L/∂θ| and masks ``E`` entries down to the current
  budget, which falls cubically from ``init_r · layers`` to ``target_r · layers``.
- the orthogonality regulariser R = mean over A and B matrices of ||A A^T - I||_F resp.
  ||B^T B - I||_F, added as ``orth_reg_weight · R`` to the loss. PEFT adds it only inside
  ``forward`` when the wrapped model's output has a ``.loss``; a diffusers UNet returns a sample,
  so :func:`orthogonal_regulariser` must be added to the diffusion loss by hand.

With ``lora_alpha = scale · init_r`` one component of AdaLoRA is scaled like one component of
the package's LoRA (``scaling = scale``), so the methods start from the same footing.
"""
from __future__ import annotations

from typing import Sequence

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraModel
from torch import nn

ADAPTER = "default"


def adalora_config(
    target_modules: Sequence[str],
    total_step: int,
    init_r: int = 6,
    target_r: int = 4,
    scale: float = 1.0,
    tinit: int | None = None,
    tfinal: int | None = None,
    delta_t: int = 1,
    orth_reg_weight: float = 0.5,
) -> AdaLoraConfig:
    """The paper's AdaLoRA baseline (initial rank 6, target rank 4) as a PEFT ``AdaLoraConfig``.

    ``target_modules``: exact qualified module names. The schedule defaults to AdaLoRA's shape:
    ``tinit`` = 10 % warm-up at full budget, pruning until ``total_step - tfinal``, then
    ``tfinal`` = 20 % at the final budget.
    """
    if total_step < 1:
        raise ValueError(f"total_step: expected >= 1 training steps, got {total_step}")
    tinit = total_step // 10 if tinit is None else tinit
    tfinal = total_step // 5 if tfinal is None else tfinal
    if tinit + tfinal >= total_step:
        raise ValueError(f"tinit={tinit} + tfinal={tfinal}: expected fewer than total_step={total_step}")
    return AdaLoraConfig(
        target_modules=list(target_modules),
        init_r=init_r,
        target_r=target_r,
        lora_alpha=scale * init_r,
        lora_dropout=0.0,
        total_step=total_step,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta_t,
        orth_reg_weight=orth_reg_weight,
    )


def inject_adalora(model: nn.Module, config: AdaLoraConfig) -> AdaLoraModel:
    """Put AdaLoRA adapters into ``model`` in place (PEFT ``AdaLoraModel``); only they stay trainable.

    Returns the tuner: call ``tuner.update_and_allocate(step)`` each step. ``model`` itself keeps
    its forward signature (the tuner wraps the same object).
    """
    return AdaLoraModel(model, config, ADAPTER)


def orthogonal_regulariser(model: nn.Module, adapter: str = ADAPTER) -> torch.Tensor:
    """AdaLoRA's R(A, B) = mean over adapter matrices of ||P P^T - I||_F (A) / ||P^T P - I||_F (B).

    Zhang et al. 2023, Eq. 4 (the Frobenius form PEFT uses); a 0-d tensor on the adapters' device.
    Add ``orth_reg_weight * R`` to the training loss.
    """
    terms = []
    for name, p in model.named_parameters():
        if f"lora_A.{adapter}" in name or f"lora_B.{adapter}" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    if not terms:
        raise ValueError(f"orthogonal_regulariser: the model has no AdaLoRA adapter {adapter!r}")
    return torch.stack(terms).mean()


def adalora_ranks(model: nn.Module, adapter: str = ADAPTER) -> dict[str, int]:
    """``{qualified layer name: live rank}``: the unmasked (non-zero) entries of each layer's E."""
    suffix = f".lora_E.{adapter}"
    return {name[: -len(suffix)]: int((p != 0).sum()) for name, p in model.named_parameters() if name.endswith(suffix)}
