"""What the expansion controller grows: the :class:`Growable` interface and the registry of finders.

A growable layer is an adapter ``y = base(x) + scaling * (x A^T) B^T`` (Eq. 1) with ``lora_A``
``(r, in)`` and ``lora_B`` ``(out, r)`` whose rank grows by Eq. 2 with the output unchanged.
:class:`selora.core.layers.SeLoRALinear` is one. A library module adds other kinds (e.g.
:mod:`selora.peft_lora`: views of PEFT's own LoRA layers) by registering a :data:`Finder`, so that
:class:`selora.core.expansion.ExpansionController` finds every kind in a model the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from selora.core.layers import Capture, SeLoRALinear, lora_layers


@runtime_checkable
class Growable(Protocol):
    """The controller's view of a layer it can grow (a :class:`SeLoRALinear` is one).

    ``_capture``: the controller sets it while the layer is armed and clears it (None) afterwards;
    every forward of an armed layer calls ``_capture.record(x, u, z, lora_B)`` with the input
    ``x`` ``(N, ..., in)`` of ``lora_A``, ``u = x A^T`` ``(N, ..., r)``, a tensor ``z`` whose
    gradient is ``dL/dy`` ``(N, ..., out)`` and the ``lora_B`` ``(out, r)`` of that forward.
    """

    _capture: Capture | None

    @property
    def lora_A(self) -> torch.Tensor:
        """The parameter A ``(r, in)``."""

    @property
    def lora_B(self) -> torch.Tensor:
        """The parameter B ``(out, r)``."""

    @property
    def scaling(self) -> float:
        """s of Eq. 1; unchanged by growth."""

    @property
    def rank(self) -> int: ...

    @property
    def in_features(self) -> int: ...

    @property
    def out_features(self) -> int: ...

    def draw_rows(self, k: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """k candidate rows K ``(k, in)`` for Eq. 2."""

    def expand(
        self, k: int = 1, generator: torch.Generator | None = None, K: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Grow by ``k`` rows K (Eq. 2) into NEW ``lora_A``/``lora_B`` parameters; returns K ``(k, in)``."""


#: ``finder(model) -> {qualified name: layer}``: the growable layers of one kind in ``model`` (model order).
Finder = Callable[[nn.Module], dict[str, Growable]]

#: THE registry of layer kinds the controller grows; :func:`register_finder` adds one.
FINDERS: list[Finder] = [partial(lora_layers, kind=SeLoRALinear)]


def register_finder(finder: Finder) -> Finder:
    """Add ``finder`` to :data:`FINDERS` (once); returns it, so it can decorate a function."""
    if finder not in FINDERS:
        FINDERS.append(finder)
    return finder


def growable_layers(model: nn.Module) -> dict[str, Growable]:
    """``{qualified name: layer}`` of every growable layer in ``model``, kind by kind (:data:`FINDERS`)."""
    found: dict[str, Growable] = {}
    for finder in FINDERS:
        found.update(finder(model))
    return found
