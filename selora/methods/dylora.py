"""DyLoRA (Valipour et al. 2022, arXiv 2210.07558): one adapter trained for every rank 1..r at once.

Each training step samples a truncation b ∈ {1, …, r} (uniform, one b for the whole model) and
the layer uses exactly the first b components — rows ``lora_A[:b]`` and columns ``lora_B[:, :b]`` —
with DyLoRA's rank-dependent scale α/b (Valipour et al., Sec. 3). So components are ordered by
importance ("nested dropout"), and any prefix is a working adapter at inference. All b active
components are trained (the paper's non-frozen variant); the rest get exactly zero gradient.

In this package ``scaling`` is the full-rank scale (α/r), so truncation b uses ``scaling · r / b``;
at b = r a DyLoRA layer computes exactly what a :class:`~selora.core.layers.LoRALinear` computes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from selora.core.inject import replace_modules
from selora.core.layers import LoRALinear, RowInit
from selora.methods.base import Adapters, MethodConfig, Targets, inject_parts


class DyLoRALinear(LoRALinear):
    """A :class:`LoRALinear` with nested ranks; ``.truncation`` (b) selects the active prefix.

    forward(x) = base(x) + scaling · (r / b) · (x A[:b]^T) B[:, :b]^T, x of shape (..., in_features).
    ``truncation`` starts at the full rank r; :func:`sample_truncation` sets it for a training step
    and :func:`set_truncation` for evaluation at a chosen rank.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 4,
        scale: float = 1.0,
        init: RowInit | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base, rank=rank, scale=scale, init=init, generator=generator)
        self.truncation = self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., out)`` with the first b = ``truncation`` components (DyLoRA, Sec. 3)."""
        b = self.truncation
        u = F.linear(x, self.lora_A[:b])  # (..., b): x A[:b]^T
        z = F.linear(u * (self.scaling * self.rank / b), self.lora_B[:, :b])  # α/b scale, α/r = scaling
        return self.base(x) + z

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling · (r / b) · B[:, :b] A[:b]``, shape ``(out_features, in_features)``; ``merge()`` uses it."""
        b = self.truncation
        return self.scaling * self.rank / b * (self.lora_B[:, :b] @ self.lora_A[:b])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, truncation={self.truncation}"


def dylora_layers(model: nn.Module) -> dict[str, DyLoRALinear]:
    """``{qualified name: layer}`` of every :class:`DyLoRALinear` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DyLoRALinear)}


def set_truncation(model: nn.Module, b: int | None = None) -> None:
    """Use the first ``b`` components in every DyLoRA layer (``None``: each layer's full rank)."""
    layers = dylora_layers(model)
    for name, layer in layers.items():
        if b is not None and not 1 <= b <= layer.rank:
            raise ValueError(f"b={b}: expected 1 <= b <= rank {layer.rank} of {name}")
        layer.truncation = layer.rank if b is None else int(b)


def sample_truncation(model: nn.Module, generator: torch.Generator | None = None) -> int:
    """Draw b ~ U{1..r} (r = the largest DyLoRA rank in ``model``), install it everywhere, return it.

    Called once per training step before the forward pass. Layers of smaller rank use min(b, rank).
    """
    layers = dylora_layers(model)
    if not layers:
        raise ValueError("sample_truncation: the model has no DyLoRALinear layers")
    r = max(layer.rank for layer in layers.values())
    b = int(torch.randint(1, r + 1, (1,), generator=generator))
    for layer in layers.values():
        layer.truncation = min(b, layer.rank)
    return b


def to_dylora(layers: dict[str, LoRALinear], model: nn.Module) -> dict[str, DyLoRALinear]:
    """Swap the given :class:`LoRALinear` adapters of ``model`` (e.g. from ``selora.inject(kind="lora")``)
    for :class:`DyLoRALinear` layers that keep their base layer and their exact ``lora_A``/``lora_B``.
    """
    swapped: dict[int, DyLoRALinear] = {}
    for layer in layers.values():
        if id(layer) not in swapped:
            new = DyLoRALinear(layer.base, rank=layer.rank, scale=layer.scaling, init=layer.init)
            new.lora_A, new.lora_B = layer.lora_A, layer.lora_B
            swapped[id(layer)] = new
    replace_modules(model, swapped)
    return {name: swapped[id(layer)] for name, layer in layers.items()}


class DyLoRAAdapters(Adapters):
    """DyLoRA r = ``lora_rank``: one truncation b per training step, evaluated at the full rank."""

    name: ClassVar[str] = "dylora"

    @classmethod
    def card_text(cls, cfg: MethodConfig, scaling: str) -> str:
        return f"DyLoRA (Valipour et al. 2023) with maximum rank {cfg.lora_rank}, exported at full rank, s = {scaling}."

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], generator: torch.Generator | None) -> None:
        super().__init__(model, layers)
        self.generator = generator

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
    ) -> DyLoRAAdapters:
        """LoRA adapters turned into :class:`DyLoRALinear`; ``generator`` then draws the truncations."""
        layers = inject_parts(model, targets, "lora", rank or cls.default_rank, scale, generator)
        return cls(model, to_dylora(layers, model), generator)

    def before_forward(self, step: int) -> None:
        sample_truncation(self.model, self.generator)

    def eval(self) -> None:
        set_truncation(self.model, None)

    def generators(self) -> dict[str, torch.Generator]:
        return {"truncation": self.generator} if self.generator is not None else {}
