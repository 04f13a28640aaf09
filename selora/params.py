"""Parameter counts, in one place: trainable (adapter) parameters against the frozen base model.

Two primitives: :func:`count_parameters` (trainable vs frozen base parameters of a module, for every
method) and :func:`per_component` (sums per component of the diffusion model, by the prefix of the
qualified name: ``unet.…``, ``text_encoder.…``). The per-component reports are built from them:
:func:`trainable_counts` (a model's adapters at their current ranks against LoRA at a fixed rank)
and :func:`adapter_counts` (a saved checkpoint's adapters against the frozen base).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from selora.core.inject import select_linear
from selora.core.layers import lora_layers
from selora.pipeline import COMPONENTS

__all__ = [
    "ADAPTER_KEYS",
    "ParameterCount",
    "adapter_counts",
    "count_parameters",
    "lora_count",
    "per_component",
    "trainable_counts",
]

#: Adapter parameters by name fragment (PEFT AdaLoRA's ``ranknum`` is a frozen bookkeeping scalar).
ADAPTER_KEYS = ("lora_A", "lora_B", "lora_E", "ranknum")


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
    trainable count is the allocated ``init_r`` tensors; its live budget is
    :func:`selora.methods.adalora_ranks`.
    """
    trainable = base = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
        elif not any(key in name for key in ADAPTER_KEYS):
            base += p.numel()
    return ParameterCount(trainable, base)


def lora_count(model: nn.Module, targets: str | Sequence[str], rank: int = 4) -> int:
    """Parameters of rank-``rank`` LoRA on the ``nn.Linear`` layers ``targets`` selects in ``model``:
    sum of r (d_in + d_out). Needs only the layers' shapes, so ``model`` may live on the meta device
    (e.g. SD v1.5 at full widths, built in seconds without memory)."""
    return sum(rank * (m.in_features + m.out_features) for m in select_linear(model, targets).values())


def per_component(sizes: Iterable[tuple[str, int]], components: Sequence[str] = COMPONENTS) -> dict[str, int]:
    """``{component: sum, …, "total": sum}`` of ``(qualified name, count)`` pairs, grouped by the name's
    first part (one of ``components``); a name outside every component is a ValueError."""
    out = dict.fromkeys((*components, "total"), 0)
    for name, n in sizes:
        comp = next((c for c in components if name.startswith(c + ".")), None)
        if comp is None:
            raise ValueError(f"adapter {name!r}: expected a name starting with one of {tuple(components)}")
        out[comp] += n
        out["total"] += n
    return out


def trainable_counts(
    model: nn.Module, lora_rank: int = 4, components: Sequence[str] = COMPONENTS
) -> dict[str, dict[str, int]]:
    """Adapter parameters per component for the model's current ranks and for LoRA at ``lora_rank``.

    An adapter of rank r on a ``d_in -> d_out`` layer has r (d_in + d_out) parameters
    (``lora_A`` (r, d_in) + ``lora_B`` (d_out, r)). ``model``: e.g. a
    :class:`selora.pipeline.DiffusionModel` with LoRA/SeLoRA layers named ``<component>.…``.
    Returns ``{component: {"selora": n, "lora": m}}`` for each of ``components`` and ``total``.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: no LoRA/SeLoRA layers (inject adapters first)")
    widths = {name: layer.in_features + layer.out_features for name, layer in layers.items()}
    grown = per_component(((name, layers[name].rank * w) for name, w in widths.items()), components)
    lora = per_component(((name, lora_rank * w) for name, w in widths.items()), components)
    return {c: {"selora": grown[c], "lora": lora[c]} for c in grown}


def adapter_counts(
    tensors: Mapping[str, torch.Tensor], model: object, components: Sequence[str] = COMPONENTS
) -> dict[str, dict[str, int | float]]:
    """Trainable (adapter) and frozen base parameters per component and in ``total``.

    ``tensors``: a checkpoint's adapter tensors ``{"<component>.<layer>.lora_A": (r, in), …}``
    (:func:`selora.checkpoint.adapter_tensors`); ``model``: the pipeline (or
    :class:`selora.pipeline.DiffusionModel`) they belong to, with one module attribute per component.
    Returns ``{component: {"trainable": n, "base": m, "fraction": n / m}}``.
    """
    trainable = per_component(((key, t.numel()) for key, t in tensors.items()), components)
    base = {c: count_parameters(getattr(model, c)).base for c in components}
    base["total"] = sum(base.values())
    return {c: {"trainable": trainable[c], "base": base[c], "fraction": trainable[c] / base[c]} for c in trainable}
