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

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraModel
from torch import nn

from selora.core.inject import replace_modules
from selora.methods.base import Adapters, Factors, MethodConfig, RankChange, Targets, resolve_targets

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


#: AdaLoRA's initial rank and orthogonality weight (paper: AdaLoRA 6 -> 4; Zhang et al.'s default 0.5).
INIT_RANK, ORTH_WEIGHT = 6, 0.5
#: PEFT AdaLoRA allocator statistics kept in a checkpoint (per adapter parameter).
ALLOCATOR_STATS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


class AdaLoRAAdapters(Adapters):
    """AdaLoRA ``init_r`` -> ``lora_rank`` through PEFT: the regulariser in the loss, the allocator
    after every step, ranks as its latest ``rank_pattern`` keeps them."""

    name: ClassVar[str] = "adalora"

    @classmethod
    def card_text(cls, cfg: MethodConfig, scaling: str) -> str:
        return f"AdaLoRA (Zhang et al. 2023, through PEFT) pruned to rank {cfg.lora_rank}, scaling s = {scaling}."

    def __init__(self, model: nn.Module, tuner: AdaLoraModel, orth_reg_weight: float = ORTH_WEIGHT) -> None:
        super().__init__(model, {name: model.get_submodule(name) for name in adalora_ranks(model)})
        self.tuner, self.orth_reg_weight = tuner, orth_reg_weight

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if cfg.lora_rank > INIT_RANK:
            raise ValueError(
                f"key 'lora_rank': AdaLoRA prunes from rank {INIT_RANK} down to lora_rank; "
                f"expected lora_rank <= {INIT_RANK}, got {cfg.lora_rank}"
            )

    @classmethod
    def build(
        cls,
        model: nn.Module,
        targets: Targets,
        *,
        rank: int | None = None,
        scale: float = 1.0,
        total_steps: int | None = None,
        generator: torch.Generator | None = None,
        init_rank: int = INIT_RANK,
        orth_reg_weight: float = ORTH_WEIGHT,
    ) -> AdaLoRAAdapters:
        """PEFT AdaLoRA on ``targets``, ``init_rank`` -> ``rank`` (default 4) over ``total_steps``
        (any value >= 1 when only loading weights: the masks live in E). ``generator`` is unused."""
        if total_steps is None:
            raise ValueError("total_steps: AdaLoRA's rank budget schedule needs the number of training steps")
        config = adalora_config(
            resolve_targets(model, targets),
            total_steps,
            init_rank,
            rank or cls.default_rank,
            scale=scale,
            orth_reg_weight=orth_reg_weight,
        )
        return cls(model, inject_adalora(model, config), orth_reg_weight)

    def regulariser(self) -> torch.Tensor:
        return self.orth_reg_weight * orthogonal_regulariser(self.model)

    def after_step(self, step: int, grad_scale: float = 1.0) -> RankChange | None:
        """``update_and_allocate(step)`` (needs this step's gradients, already unscaled); the layers it pruned."""
        before = self.ranks()
        self.tuner.update_and_allocate(step)
        now = self.ranks()
        if now == before:
            return None
        return RankChange({"ranks": now, "pruned": [k for k in now if now[k] < before[k]]})

    def train_record(self, regulariser: torch.Tensor) -> dict[str, Any]:
        return {"reg": regulariser.item()}

    def ranks(self) -> dict[str, int]:
        """The live rank: the initial rank until the allocator first masks triplets of E, then the
        triplets its latest ``rank_pattern`` keeps."""
        pattern = self.tuner.peft_config[ADAPTER].rank_pattern or {}
        out = {}
        for name, factors in self.factors().items():
            keep = pattern.get(f"{name}.lora_E.{ADAPTER}")
            out[name] = int(sum(keep)) if keep is not None else factors["lora_E"].shape[0]
        return out

    def factors(self) -> Factors:
        """``{"lora_A": (r, in), "lora_B": (out, r), "lora_E": (r, 1)}`` per layer at the allocated
        ``init_r`` (pruned triplets are zeros in E), so they load back into the same layers."""
        out = {}
        for name, module in self.model.named_modules():
            E = getattr(module, "lora_E", None)
            if isinstance(E, nn.ParameterDict):
                out[name] = {"lora_A": module.lora_A[ADAPTER], "lora_B": module.lora_B[ADAPTER], "lora_E": E[ADAPTER]}
        return out

    def state_dict(self) -> dict[str, Any]:
        """The allocator's smoothed sensitivities and the latest ``rank_pattern``."""
        alloc = self.tuner.rankallocator
        stats = {
            stat: {n: t.detach().cpu().contiguous() for n, t in getattr(alloc, stat).items()}
            for stat in ALLOCATOR_STATS
        }
        return {"allocator": stats, "rank_pattern": self.tuner.peft_config[ADAPTER].rank_pattern}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        alloc = self.tuner.rankallocator
        alloc.reset_ipt()
        device = next(self.tuner.model.parameters()).device
        for stat, values in state["allocator"].items():
            for name, value in values.items():
                getattr(alloc, stat)[name] = value.to(device)
        self.tuner.peft_config[ADAPTER].rank_pattern = state["rank_pattern"]

    def merge(self) -> int:
        """PEFT's ``merge`` (W0 + s B (A ⊙ E) / r) into each base layer, which then replaces the wrapper."""
        merged = {}
        for name in self.factors():
            layer = self.model.get_submodule(name)
            layer.merge()
            merged[id(layer)] = layer.get_base_layer()
        replace_modules(self.model, merged)
        return len(merged)
