"""LoRA and SeLoRA linear layers (paper Sec. 3, Eq. 1-2).

Layout follows PEFT so that export is a rename: ``lora_A`` has shape ``(r, in_features)`` and
``lora_B`` has shape ``(out_features, r)``. In the paper's row-vector convention
``h = x W0 + x A B`` the same adapter reads ``A_paper = lora_A.T`` and ``B_paper = lora_B.T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

#: ``init(rows, in_features, generator) -> Tensor (rows, in_features)`` on the CPU in float32.
RowInit = Callable[[int, int, "torch.Generator | None"], torch.Tensor]


def kaiming_rows(rows: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Kaiming-uniform rows, U(-b, b) with b = sqrt(6 / in_features), shape ``(rows, in_features)``.

    This is the paper's initialiser for K (Eq. 2) and, by default, for the first rows of ``lora_A``.
    Drawn on the CPU in float32 so that a seeded generator gives the same K on every device.
    """
    bound = math.sqrt(6.0 / in_features)
    u = torch.rand(rows, in_features, generator=generator, dtype=torch.float32)
    return (2.0 * u - 1.0) * bound


class Capture(Protocol):
    """What an armed layer calls in its forward (see :mod:`selora.core.fisher`)."""

    def record(self, x: torch.Tensor, u: torch.Tensor, z: torch.Tensor, lora_B: torch.Tensor) -> None: ...


class LoRALinear(nn.Module):
    """``y = base(x) + scaling * (x A^T) B^T`` with a frozen ``base`` (Eq. 1).

    Args:
        base: the ``nn.Linear`` to adapt; it is frozen (``requires_grad=False``) and kept as ``.base``.
        rank: r >= 1, rows of ``lora_A`` ``(r, in_features)`` and columns of ``lora_B``
            ``(out_features, r)``.
        scale: ``.scaling``, fixed at construction (never ``alpha / r``: growing r must not change
            the output).
        init: row initialiser for ``lora_A`` (and for expansion rows K); default :func:`kaiming_rows`.
        generator: optional CPU generator for the initial ``lora_A`` rows.

    Inputs have shape ``(..., in_features)`` and the layer's dtype; the first dimension is the
    sample dimension for Fisher statistics (:mod:`selora.core.fisher`).
    """

    _capture: Capture | None = None

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 4,
        scale: float = 1.0,
        init: RowInit | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if int(rank) != rank or rank < 1:
            raise ValueError(f"rank: expected an integer >= 1, got {rank!r}")
        self.base = base
        base.requires_grad_(False)
        self.scaling = float(scale)
        self.init = init if init is not None else kaiming_rows
        weight = base.weight
        A = self._draw(int(rank), generator)
        self.lora_A = nn.Parameter(A)
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], int(rank), dtype=weight.dtype, device=weight.device))

    def _draw(self, rows: int, generator: torch.Generator | None) -> torch.Tensor:
        """``rows`` fresh rows from ``self.init``, shape ``(rows, in_features)``, on the layer's device."""
        weight = self.base.weight
        K = self.init(rows, self.in_features, generator)
        if tuple(K.shape) != (rows, self.in_features):
            raise ValueError(f"init returned shape {tuple(K.shape)}, expected {(rows, self.in_features)}")
        return K.to(dtype=weight.dtype, device=weight.device)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def rank(self) -> int:
        """Current rank r (rows of ``lora_A``)."""
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., out)``: ``base(x) + scaling * (x A^T) B^T`` (Eq. 1)."""
        u = F.linear(x, self.lora_A)  # (..., r)
        z = F.linear(u * self.scaling, self.lora_B)  # (..., out), the adapter branch
        if self._capture is not None:
            self._capture.record(x, u, z, self.lora_B)
        return self.base(x) + z

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A``, shape ``(out_features, in_features)``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new ``nn.Linear`` with ``W0 + scaling * B A`` folded in (same output, frozen)."""
        w = self.base.weight
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        merged = merged.to(dtype=w.dtype, device=w.device)
        merged.weight.copy_(w + self.delta_weight())
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


class SeLoRALinear(LoRALinear):
    """A :class:`LoRALinear` that can grow its rank (Eq. 2); starts at rank 1 by default."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 1,
        scale: float = 1.0,
        init: RowInit | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base, rank=rank, scale=scale, init=init, generator=generator)

    def draw_rows(self, k: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """k candidate rows K ``(k, in_features)`` from the layer's initialiser (Eq. 2)."""
        return self._draw(k, generator)

    @torch.no_grad()
    def expand(
        self, k: int = 1, generator: torch.Generator | None = None, K: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Grow the rank by ``k``: ``A <- [A; K]``, ``B <- [B, 0]`` (Eq. 2); the output is unchanged.

        ``K`` ``(k, in_features)`` defaults to fresh Kaiming-uniform rows. ``lora_A`` and ``lora_B``
        are replaced by NEW ``nn.Parameter`` objects (an in-place ``.data`` resize while a previous
        graph is alive makes autograd sum gradients back to the old shape); any optimizer holding
        the old ones must be updated (:func:`selora.core.optim.replace_parameters`). Returns the
        installed K ``(k, in_features)``.
        """
        draw = partial(self._draw, generator=generator)
        self.lora_A, self.lora_B, K = expanded_factors(self.lora_A, self.lora_B, k, K, draw)
        return K


@torch.no_grad()
def expanded_factors(
    A: nn.Parameter, B: nn.Parameter, k: int, K: torch.Tensor | None, draw: Callable[[int], torch.Tensor]
) -> tuple[nn.Parameter, nn.Parameter, torch.Tensor]:
    """Eq. 2 on factors ``A`` ``(r, in)``, ``B`` ``(out, r)``: NEW parameters ``[A; K]`` ``(r + k, in)``
    and ``[B, 0]`` ``(out, r + k)`` (same ``requires_grad``), so ``B A`` is unchanged, and the installed
    K ``(k, in)``; ``K`` defaults to ``draw(k)``."""
    if int(k) != k or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    if K is None:
        K = draw(int(k))
    if K.dim() != 2 or K.shape[0] != k or K.shape[1] != A.shape[1]:
        raise ValueError(f"K: expected shape ({k}, {A.shape[1]}), got {tuple(K.shape)}")
    K = K.detach().to(dtype=A.dtype, device=A.device)
    new_A = nn.Parameter(torch.cat([A.detach(), K], dim=0), requires_grad=A.requires_grad)
    zeros = B.new_zeros(B.shape[0], int(k))
    new_B = nn.Parameter(torch.cat([B.detach(), zeros], dim=1), requires_grad=B.requires_grad)
    return new_A, new_B, K.clone()


L = TypeVar("L", bound=LoRALinear)


def lora_layers(model: nn.Module, kind: type[L] = LoRALinear) -> dict[str, L]:  # type: ignore[assignment]
    """``{qualified name: layer}`` of every ``kind`` module in ``model`` (model order)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def ranks(model: nn.Module) -> dict[str, int]:
    """``{qualified name: rank}`` of every LoRA/SeLoRA layer in ``model``."""
    return {name: m.rank for name, m in lora_layers(model).items()}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` with ``requires_grad`` (after :func:`selora.core.inject`: the adapters)."""
    return [p for p in model.parameters() if p.requires_grad]


def num_trainable(model: nn.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(p.numel() for p in trainable_parameters(model))
