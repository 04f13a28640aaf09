"""The paper's baselines behind one interface: LoRA r=4, DyLoRA r=4, AdaLoRA 6 -> 4 (and SeLoRA).

The trainer calls :func:`make_adapters` once and then, every step::

    adapters.before_forward(step)                  # DyLoRA: draw this step's truncation b
    loss = diffusion_loss + adapters.regulariser() # AdaLoRA: orth_reg_weight * R(A, B); else 0
    loss.backward(); optimizer.step()
    adapters.after_step(step)                      # AdaLoRA: update_and_allocate(step)
    optimizer.zero_grad()

SeLoRA's expansion needs the optimizer, so the trainer runs its own
:class:`selora.ExpansionController`; here SeLoRA is only injected. :func:`count_parameters`
reports trainable parameters (absolute and as a fraction of the frozen base) for every method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import nn

from selora.baselines.adalora import adalora_config, adalora_ranks, inject_adalora, orthogonal_regulariser
from selora.baselines.dylora import DyLoRALinear, sample_truncation, set_truncation, to_dylora
from selora.inject import inject, select_linear

METHODS = ("selora", "lora", "dylora", "adalora")
#: A preset, a list of names/regexes (see :func:`selora.inject`), or ``{submodule: those}`` to give
#: parts of one model their own targets, e.g. ``{"unet": "paper-unet", "text_encoder": "paper-text-encoder"}``.
Targets = Union[str, Sequence[str], Mapping[str, Union[str, Sequence[str]]]]
#: Adapter parameters by name fragment (PEFT AdaLoRA's ``ranknum`` is a frozen bookkeeping scalar).
ADAPTER_KEYS = ("lora_A", "lora_B", "lora_E", "ranknum")


@dataclass
class Adapters:
    """What :func:`make_adapters` returns: the adapted layers and the method's per-step hooks."""

    method: str
    layers: dict[str, nn.Module]
    before_forward: Callable[[int], object] = lambda step: None
    after_step: Callable[[int], object] = lambda step: None
    regulariser: Callable[[], torch.Tensor] = field(default=lambda: torch.zeros(()))
    tuner: object | None = None  # the PEFT AdaLoraModel, for AdaLoRA


def _parts(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Module, str | Sequence[str]]]:
    """``(prefix, submodule, its targets)`` for a plain target spec (prefix "") or a mapping."""
    if isinstance(targets, Mapping):
        return [(prefix, model.get_submodule(prefix), t) for prefix, t in targets.items()]
    return [("", model, targets)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def resolve_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules ``targets`` selects (rules of :func:`selora.inject`)."""
    return [_join(prefix, n) for prefix, sub, spec in _parts(model, targets) for n in select_linear(sub, spec)]


def make_adapters(
    model: nn.Module,
    method: str,
    targets: Targets,
    *,
    rank: int | None = None,
    scale: float = 1.0,
    total_steps: int | None = None,
    generator: torch.Generator | None = None,
    adalora_init_r: int = 6,
    adalora_target_r: int = 4,
    orth_reg_weight: float = 0.5,
) -> Adapters:
    """Adapt ``model`` in place with ``method`` on ``targets`` and return the per-step hooks.

    Everything but the adapters is frozen. Call it once on the module the trainer optimises
    (e.g. UNet + text encoder together, with a ``{submodule: targets}`` mapping) so that DyLoRA
    draws one b per step and AdaLoRA keeps one rank budget for all layers.

    ``rank``: SeLoRA's initial rank (default 1), LoRA's and DyLoRA's rank (default 4); AdaLoRA
    uses ``adalora_init_r`` -> ``adalora_target_r`` and needs ``total_steps`` for its budget
    schedule. ``generator`` seeds ``lora_A`` (LoRA family) and DyLoRA's truncation draws.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "adalora":
        if total_steps is None:
            raise ValueError("total_steps: AdaLoRA's rank budget schedule needs the number of training steps")
        config = adalora_config(resolve_targets(model, targets), total_steps, adalora_init_r, adalora_target_r,
                                scale=scale, orth_reg_weight=orth_reg_weight)
        tuner = inject_adalora(model, config)
        layers = {name: model.get_submodule(name) for name in adalora_ranks(model)}
        return Adapters(method, layers, after_step=tuner.update_and_allocate,
                        regulariser=lambda: orth_reg_weight * orthogonal_regulariser(model), tuner=tuner)
    kind = "selora" if method == "selora" else "lora"
    default_rank = 1 if method == "selora" else 4
    model.requires_grad_(False)
    layers = {}
    for prefix, sub, spec in _parts(model, targets):
        injected = inject(sub, spec, kind=kind, rank=rank or default_rank, scale=scale, generator=generator)
        layers.update({_join(prefix, n): m for n, m in injected.items()})
    if method == "dylora":
        layers = to_dylora(layers, model)
        return Adapters(method, layers, before_forward=lambda step: sample_truncation(model, generator))
    return Adapters(method, layers)


@dataclass(frozen=True)
class ParameterCount:
    """Trainable (adapter) parameters, frozen base parameters, and ``trainable / base``."""

    trainable: int
    base: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.base if self.base else float("nan")

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable / {self.base:,} base ({100 * self.fraction:.3f} %)"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable parameters (``requires_grad``) and frozen base parameters of an adapted ``model``.

    Works for every method: the package's LoRA/SeLoRA/DyLoRA layers and PEFT's AdaLoRA alike.
    Adapter bookkeeping (AdaLoRA's frozen ``ranknum``) counts as neither. For AdaLoRA the
    trainable count is the allocated ``init_r`` tensors; its live budget is :func:`adalora_ranks`.
    """
    trainable = base = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
        elif not any(key in name for key in ADAPTER_KEYS):
            base += p.numel()
    return ParameterCount(trainable, base)


__all__ = [
    "METHODS",
    "Adapters",
    "DyLoRALinear",
    "ParameterCount",
    "Targets",
    "adalora_config",
    "adalora_ranks",
    "count_parameters",
    "inject_adalora",
    "make_adapters",
    "orthogonal_regulariser",
    "resolve_targets",
    "sample_truncation",
    "set_truncation",
]
