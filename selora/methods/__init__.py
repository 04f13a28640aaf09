"""The methods behind one interface (:class:`Adapters`): SeLoRA and the paper's baselines
LoRA r = 4, DyLoRA r = 4 and AdaLoRA 6 -> 4.

:data:`METHODS` is THE registry (config ``method`` values); the trainer builds a method with
``METHODS[cfg.method].from_config(...)`` and from then on calls only the :class:`Adapters` hooks.
"""

from __future__ import annotations

import torch
from torch import nn

from selora.methods.adalora import (
    AdaLoRAAdapters,
    adalora_config,
    adalora_ranks,
    inject_adalora,
    orthogonal_regulariser,
)
from selora.methods.base import Adapters, RankChange, Targets, resolve_targets
from selora.methods.dylora import DyLoRAAdapters, DyLoRALinear, sample_truncation, set_truncation
from selora.methods.selora import SeLoRAAdapters

METHODS: dict[str, type[Adapters]] = {
    cls.name: cls for cls in (SeLoRAAdapters, Adapters, DyLoRAAdapters, AdaLoRAAdapters)
}


def make_adapters(
    model: nn.Module,
    method: str,
    targets: Targets,
    *,
    rank: int | None = None,
    scale: float = 1.0,
    total_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> Adapters:
    """Adapt ``model`` in place with ``method`` on ``targets``; everything but the adapters is frozen.

    Call it once on the module the trainer optimises (e.g. UNet + text encoder together, with a
    ``{submodule: targets}`` mapping) so that DyLoRA draws one b per step and AdaLoRA keeps one
    rank budget for all layers. ``rank``: SeLoRA's initial rank (default 1), LoRA's and DyLoRA's rank
    and AdaLoRA's target rank (default 4). AdaLoRA needs ``total_steps`` for its budget schedule.
    ``generator`` seeds ``lora_A`` (LoRA family) and DyLoRA's truncation draws.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    return METHODS[method].build(model, targets, rank=rank, scale=scale, total_steps=total_steps, generator=generator)


__all__ = [
    "METHODS",
    "AdaLoRAAdapters",
    "Adapters",
    "DyLoRAAdapters",
    "DyLoRALinear",
    "RankChange",
    "SeLoRAAdapters",
    "Targets",
    "adalora_config",
    "adalora_ranks",
    "inject_adalora",
    "make_adapters",
    "orthogonal_regulariser",
    "resolve_targets",
    "sample_truncation",
    "set_truncation",
]
