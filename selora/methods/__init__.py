"""The methods behind one interface (:class:`Adapters`): SeLoRA and the paper's baselines
LoRA r = 4, DyLoRA r = 4 and AdaLoRA 6 -> 4.

:data:`METHODS` is THE registry (config ``method`` values); the trainer builds a method with
``METHODS[cfg.method].from_config(...)`` and from then on calls only the :class:`Adapters` hooks.
"""

from __future__ import annotations

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
    "orthogonal_regulariser",
    "resolve_targets",
    "sample_truncation",
    "set_truncation",
]
