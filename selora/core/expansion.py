"""The expansion controller: Algorithm 1 of the paper with hook-captured per-sample statistics.

Training loop contract::

    loss = criterion(model(x), y)     # mean over the batch (loss_reduction="mean")
    loss.backward(); optimizer.step(); decisions = ctl.step(); optimizer.zero_grad()
    # a skipped step (non-finite loss or gradient): optimizer.zero_grad(); ctl.discard()
    # a GradScaler: scaler.scale(loss).backward(); ...; ctl.step(grad_scale=the scale of that backward)

Every ``interval``-th ``step()`` is a test step. Before the last ``criterion.window`` steps of each
interval (at construction when they start at the first step) the controller ARMS every SeLoRA layer
and draws its candidate rows K; those steps' forward/backward passes then capture exact per-sample
statistics (:mod:`selora.core.fisher`) at the parameters of each backward — no extra pass, no call
of the model. ``step()`` on the test step has the expansion criterion (:mod:`selora.core.criteria`:
the paper's FI-Ratio, Eq. 3-5, or this book's signal test) score every layer, expands the layers
that pass and are below their rank cap by the K that was scored (Eq. 2), disarms, and swaps the
grown parameters into the optimizer (:mod:`selora.core.optim`). Unarmed layers pay one ``is None``
check. A step that is skipped calls ``discard()`` instead of ``step()``: what its backward captured
is dropped and the next forward/backward is captured afresh for the same test (same K).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selora.core.criteria import Criterion, FIRatio, Reduce, Score
from selora.core.fisher import LOSS_REDUCTIONS, LayerCapture
from selora.core.growable import Growable, growable_layers
from selora.core.optim import check_supported, replace_parameters

#: t, the paper's interval between expansion tests (optimizer steps).
INTERVAL = 40


@dataclass(frozen=True)
class Decision:
    """One layer's outcome on a test step: its rank before the test, what the criterion scored
    (e.g. :class:`selora.core.criteria.FisherScore`: ``score.ratio``) and whether the rank grew by one."""

    name: str
    rank_before: int
    score: Score
    expanded: bool


def score_fields(decisions: Sequence[Decision]) -> dict[str, dict[str, float]]:
    """``{rank-history key: {layer name: value}}`` of the decisions' scores (e.g. ``ratios``)."""
    fields: dict[str, dict[str, float]] = {}
    for d in decisions:
        for key, value in d.score.record().items():
            fields.setdefault(key, {})[d.name] = value
    return fields


def _layers(model_or_layers: nn.Module | Mapping[str, Growable] | Sequence[Growable]) -> dict[str, Growable]:
    if isinstance(model_or_layers, nn.Module):
        layers = growable_layers(model_or_layers)
    elif isinstance(model_or_layers, Mapping):
        layers = dict(model_or_layers)
    else:
        layers = {str(i): m for i, m in enumerate(model_or_layers)}
    bad = [name for name, m in layers.items() if not isinstance(m, Growable)]
    if bad:
        raise TypeError(f"ExpansionController: not growable layers (selora.core.growable.Growable): {bad[:5]}")
    if not layers:
        raise ValueError(
            "ExpansionController: no SeLoRALinear layer found (did you call selora.core.inject?) "
            "and no other growable layer (e.g. PEFT LoRA layers, with selora imported)"
        )
    return layers


def _check_settings(criterion: Criterion, interval: int, max_rank: int | None, loss_reduction: str) -> None:
    if not isinstance(criterion, Criterion):
        raise TypeError(f"criterion: expected a selora.core.criteria.Criterion (e.g. FIRatio()), got {criterion!r}")
    if int(interval) != interval or interval < 1:
        raise ValueError(f"interval: expected an integer >= 1, got {interval!r}")
    if max_rank is not None and (int(max_rank) != max_rank or max_rank < 1):
        raise ValueError(f"max_rank: expected None or an integer >= 1, got {max_rank!r}")
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction: expected one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
    if criterion.window > interval:
        raise ValueError(f"window: expected at most interval={interval}, got {criterion.window!r}")


class ExpansionController:
    """Grow SeLoRA ranks during training (Algorithm 1).

    Args:
        model_or_layers: a model (its growable layers, named by qualified name: ``SeLoRALinear``
            modules and every kind in :data:`selora.core.growable.FINDERS`, e.g. PEFT LoRA layers
            via :mod:`selora.peft_lora`), a dict ``{name: layer}`` such as :func:`selora.core.inject`
            returns, or a list of layers.
        optimizer: the optimizer holding every adapter parameter (Adam, AdamW or SGD), or None.
        criterion: the expansion test (:mod:`selora.core.criteria`); default the paper's
            ``FIRatio()`` (expand when FI_exp / FI_orig >= lambda = 1.1). Its ``window`` sets how many
            steps of each interval are captured (one K per window; each pays the hooks' cost).
        interval: t, test every t-th ``step()`` (paper: 40).
        max_rank: rank cap; default ``min(in_features, out_features)`` per layer.
        generator: CPU generator for the candidate rows K; default one seeded from torch's global
            RNG at construction (so ``selora.setup(seed)`` makes runs reproducible).
        loss_reduction: ``"mean"`` (loss = mean_i L_i) or ``"sum"``; only rescales FI values.
        reduce: elementwise sum applied to the captured statistics before scoring (DDP,
            :data:`selora.core.criteria.Reduce`); default identity.

    The first input dimension of every adapted layer must be the sample dimension (inputs
    ``(N, in)`` or ``(N, ..., in)``); a layer called several times per forward is handled. Forwards
    under ``torch.no_grad()`` (validation) are never captured; several forward/backward passes
    before one ``step()`` (gradient accumulation) count as more samples; activation checkpointing
    works (armed layers keep their inputs alive until the backward). Replacing parameters on
    expansion means a DDP wrapper must be rebuilt afterwards (the trainer's job).
    """

    def __init__(
        self,
        model_or_layers: nn.Module | Mapping[str, Growable] | Sequence[Growable],
        optimizer: torch.optim.Optimizer | None,
        criterion: Criterion | None = None,
        *,
        interval: int = INTERVAL,
        max_rank: int | None = None,
        generator: torch.Generator | None = None,
        loss_reduction: str = "mean",
        reduce: Reduce | None = None,
    ) -> None:
        criterion = FIRatio() if criterion is None else criterion
        _check_settings(criterion, interval, max_rank, loss_reduction)
        self.layers = _layers(model_or_layers)
        self.optimizer = optimizer
        if optimizer is not None:
            check_supported(optimizer)
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [n for n, m in self.layers.items() if id(m.lora_A) not in held or id(m.lora_B) not in held]
            if missing:
                raise ValueError(f"optimizer: does not hold the adapter parameters of {missing[:5]}")
        self.criterion = criterion
        self.interval = int(interval)
        self.max_rank = max_rank
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        self.loss_reduction = loss_reduction
        self.reduce = reduce
        self.count = 0
        self.captures: dict[str, LayerCapture] = {}
        self.closed = False
        self._rearm()

    # -- arming -----------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        """Whether the next forward/backward is captured (the next ``step()`` is in a test window)."""
        return bool(self.captures)

    def _arm(self, candidates: Mapping[str, torch.Tensor] | None = None) -> None:
        """Install a capture with candidate rows K ``(1, in)`` in every layer (drawn unless given)."""
        for name, layer in self.layers.items():
            K = candidates[name] if candidates is not None else layer.draw_rows(1, self.generator)
            capture = LayerCapture(layer, K.to(layer.lora_A), self.criterion.fold, self.loss_reduction)
            layer._capture = capture
            self.captures[name] = capture

    def _disarm(self) -> None:
        for name in self.captures:
            self.layers[name]._capture = None
        self.captures = {}

    def _in_window(self) -> bool:
        """Whether the next step is one of the last ``criterion.window`` steps of its interval."""
        return (-(self.count + 1)) % self.interval < self.criterion.window

    def _rearm(self, candidates: Mapping[str, torch.Tensor] | None = None) -> None:
        self._disarm()
        if not self.closed and self._in_window():
            self._arm(candidates)

    def _advance(self) -> None:
        """After a step: stay armed (same K, statistics accumulating) inside a window, else arm or disarm."""
        if self.closed or not self._in_window():
            self._disarm()
        elif not self.armed:
            self._arm()

    def close(self) -> None:
        """Disarm for good (end of training, or before calling the model for something else)."""
        self.closed = True
        self._disarm()

    def layer_max_rank(self, layer: Growable) -> int:
        """The rank cap of ``layer``: ``max_rank`` or ``min(in_features, out_features)``."""
        return self.max_rank if self.max_rank is not None else min(layer.in_features, layer.out_features)

    # -- the step ---------------------------------------------------------------------------
    def step(self, grad_scale: float = 1.0) -> list[Decision]:
        """Call once per optimizer step; on test steps score, expand and return the decisions.

        ``grad_scale``: the factor the loss was multiplied by for this step's backward (a
        ``GradScaler``'s scale before its ``update()``); the captured statistics, sums of squared
        gradients, are divided by ``grad_scale ** 2`` so that they are those of the unscaled loss.
        """
        if not (isinstance(grad_scale, (int, float)) and math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale: expected a finite number > 0, got {grad_scale!r}")
        self.count += 1
        decisions: list[Decision] = []
        if self.count % self.interval == 0 and not self.closed:
            decisions = self._decide(float(grad_scale))
            self._disarm()
        self._advance()
        return decisions

    def discard(self) -> None:
        """The step was skipped (non-finite loss or gradient, fp16 overflow): drop what its
        forward/backward captured; armed layers stay armed with the same K, so the next pass is
        captured afresh for the same test. No effect when not armed."""
        for capture in self.captures.values():
            capture.reset()

    def _decide(self, grad_scale: float = 1.0) -> list[Decision]:
        """Score every layer with the criterion, grow those that pass (Eq. 2, the K that was scored)."""
        captures = [self.captures[name] for name in self.layers]
        for capture in captures:
            capture.flush()
        scores = self.criterion.scores(captures, grad_scale, self.reduce)
        decisions, swaps = [], {}
        for (name, layer), capture, score in zip(self.layers.items(), captures, scores):
            rank = layer.rank
            grow = self.criterion.passes(score) and rank < self.layer_max_rank(layer)
            if grow:
                old_A, old_B = layer.lora_A, layer.lora_B
                layer.expand(1, K=capture.K)  # Eq. 2, the K that was scored
                swaps[old_A], swaps[old_B] = layer.lora_A, layer.lora_B
            decisions.append(Decision(name, rank, score, bool(grow)))
        if swaps and self.optimizer is not None:
            replace_parameters(self.optimizer, swaps)
        return decisions

    # -- resume -----------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        """``{name: rank}`` of the controlled layers."""
        return {name: layer.rank for name, layer in self.layers.items()}

    def state_dict(self) -> dict[str, Any]:
        """Step count, ranks, K generator state and the armed candidates (tensors and ints only)."""
        return {
            "count": self.count,
            "ranks": self.ranks(),
            "generator": self.generator.get_state(),
            "candidates": {name: c.K.detach().cpu().clone() for name, c in self.captures.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a run: grow layers to the saved ranks (swapping optimizer parameters), then count,
        generator and armed candidates. Call it BEFORE ``model.load_state_dict`` and
        ``optimizer.load_state_dict`` so the adapter shapes match the saved weights."""
        saved = dict(state["ranks"])
        if set(saved) != set(self.layers):
            extra, lacking = sorted(set(saved) - set(self.layers)), sorted(set(self.layers) - set(saved))
            raise ValueError(f"state_dict['ranks']: layer names differ (unknown {extra[:3]}, absent {lacking[:3]})")
        swaps = {}
        for name, layer in self.layers.items():
            target = int(saved[name])
            if target < layer.rank:
                raise ValueError(f"state_dict['ranks'][{name!r}] = {target} is below the current rank {layer.rank}")
            if target > layer.rank:
                old_A, old_B = layer.lora_A, layer.lora_B
                layer.expand(target - layer.rank, K=old_A.new_zeros(target - layer.rank, layer.in_features))
                swaps[old_A], swaps[old_B] = layer.lora_A, layer.lora_B
        if swaps and self.optimizer is not None:
            replace_parameters(self.optimizer, swaps)
        self.count = int(state["count"])
        self.generator.set_state(state["generator"])
        self._rearm(state["candidates"] or None)
