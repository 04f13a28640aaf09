"""The expansion controller: Algorithm 1 of the paper with hook-captured per-sample Fisher.

Training loop contract::

    loss = criterion(model(x), y)     # mean over the batch (loss_reduction="mean")
    loss.backward(); optimizer.step(); decisions = ctl.step(); optimizer.zero_grad()
    # a skipped step (non-finite loss or gradient): optimizer.zero_grad(); ctl.discard()
    # a GradScaler: scaler.scale(loss).backward(); ...; ctl.step(grad_scale=the scale of that backward)

Every ``interval``-th ``step()`` is a test step. At the end of the step before it (at construction
when ``interval == 1``) the controller ARMS every SeLoRA layer and draws its candidate rows K;
the test step's forward/backward then captures exact per-sample statistics (:mod:`selora.core.fisher`)
at the parameters of that backward — no extra pass, no call of the model. ``step()`` on the test
step scores each layer (Eq. 3-5), expands where FI_exp / FI_orig >= threshold and
rank < max_rank (``criterion="fi-ratio"``, the paper's rule), or where the new column's mean
per-sample gradient stands above sampling noise at level ``alpha`` (``criterion="signal"``, this
book's test: :mod:`selora.core.signal`), installing the K that was scored (Eq. 2), disarms, and swaps the grown
parameters into the optimizer (:mod:`selora.core.optim`). Unarmed layers pay one ``is None`` check.
A step that is skipped calls ``discard()`` instead of ``step()``: what its backward captured is
dropped and the next forward/backward is captured afresh for the same test (same K).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selora.core.fisher import LOSS_REDUCTIONS, LayerCapture, fi_ratio, fi_scores
from selora.core.layers import SeLoRALinear, lora_layers
from selora.core.optim import check_supported, replace_parameters
from selora.core.signal import SIGNAL_SCALARS, SignalScore, signal_score

#: ``reduce(stats) -> stats``, an elementwise SUM (e.g. an all-reduce across DDP ranks). The
#: fi-ratio criterion passes a ``(layers, 3)`` table of [sum of squared per-sample gradient norms
#: (A, B), same for the new B columns, sample count]; the signal criterion one flat vector: that
#: table, then each layer's :func:`selora.core.signal.signal_row` (summed before any square is taken).
Reduce = Callable[[torch.Tensor], torch.Tensor]
#: The expansion tests: the paper's FI-Ratio (Eq. 5) and this book's signal test (selora.core.signal).
CRITERIA = ("fi-ratio", "signal")


@dataclass(frozen=True)
class Decision:
    """One layer's outcome on a test step.

    ``fi_orig``/``fi_exp``: FI-Scores (Eq. 4) of the layer and of the layer expanded by the scored K;
    ``ratio = fi_exp / fi_orig`` (Eq. 5, working direction, >= 1; ``inf`` if only fi_exp > 0, ``nan``
    for 0/0, e.g. a layer that was not used); ``expanded``: whether the rank grew by one.
    Under the signal criterion also ``signal`` (R), ``dof`` (nu) and ``p_value`` (:mod:`selora.core.signal`);
    ``nan`` under the fi-ratio criterion.
    """

    name: str
    rank_before: int
    fi_orig: float
    fi_exp: float
    ratio: float
    expanded: bool
    signal: float = math.nan
    dof: float = math.nan
    p_value: float = math.nan


def _layers(model_or_layers: nn.Module | Mapping[str, nn.Module] | Sequence[nn.Module]) -> dict[str, SeLoRALinear]:
    if isinstance(model_or_layers, nn.Module):
        layers = lora_layers(model_or_layers, SeLoRALinear)
    elif isinstance(model_or_layers, Mapping):
        layers = dict(model_or_layers)
    else:
        layers = {str(i): m for i, m in enumerate(model_or_layers)}
    bad = [name for name, m in layers.items() if not isinstance(m, SeLoRALinear)]
    if bad:
        raise TypeError(f"ExpansionController: not SeLoRALinear layers: {bad[:5]}")
    if not layers:
        raise ValueError("ExpansionController: no SeLoRALinear layer found (did you call selora.core.inject?)")
    return layers


class ExpansionController:
    """Grow SeLoRA ranks during training (Algorithm 1).

    Args:
        model_or_layers: a model (its ``SeLoRALinear`` modules, named by qualified name), a dict
            ``{name: layer}`` such as :func:`selora.core.inject` returns, or a list of layers.
        optimizer: the optimizer holding every adapter parameter (Adam, AdamW or SGD), or None.
        threshold: lambda; expand when FI_exp / FI_orig >= threshold (paper: 1.1).
        interval: t, test every t-th ``step()`` (paper: 40).
        max_rank: rank cap; default ``min(in_features, out_features)`` per layer.
        generator: CPU generator for the candidate rows K; default one seeded from torch's global
            RNG at construction (so ``selora.setup(seed)`` makes runs reproducible).
        loss_reduction: ``"mean"`` (loss = mean_i L_i) or ``"sum"``; only rescales FI values.
        reduce: elementwise sum applied to the statistics before scoring (DDP, :data:`Reduce`);
            default identity.
        criterion: ``"fi-ratio"`` (Eq. 5: FI_exp / FI_orig >= threshold) or ``"signal"`` (expand when
            the signal test's p-value <= ``alpha``; ``threshold`` is then unused).
        alpha: the signal test's false-expansion rate per layer and test on pure noise.
        window: capture the last ``window`` steps of every interval (1: the test step only; up to
            ``interval``), one K per window: more samples for the test, and each step in the
            window pays the hooks' cost (no extra pass). A skipped step drops the window so far.

    The first input dimension of every adapted layer must be the sample dimension (inputs
    ``(N, in)`` or ``(N, ..., in)``); a layer called several times per forward is handled. Forwards
    under ``torch.no_grad()`` (validation) are never captured; several forward/backward passes
    before one ``step()`` (gradient accumulation) count as more samples; activation checkpointing
    works (armed layers keep their inputs alive until the backward). Replacing parameters on
    expansion means a DDP wrapper must be rebuilt afterwards (the trainer's job).
    """

    def __init__(
        self,
        model_or_layers: nn.Module | Mapping[str, nn.Module] | Sequence[nn.Module],
        optimizer: torch.optim.Optimizer | None,
        threshold: float = 1.1,
        interval: int = 40,
        max_rank: int | None = None,
        generator: torch.Generator | None = None,
        loss_reduction: str = "mean",
        reduce: Reduce | None = None,
        criterion: str = "fi-ratio",
        alpha: float = 0.001,
        window: int = 1,
    ) -> None:
        if int(interval) != interval or interval < 1:
            raise ValueError(f"interval: expected an integer >= 1, got {interval!r}")
        if max_rank is not None and (int(max_rank) != max_rank or max_rank < 1):
            raise ValueError(f"max_rank: expected None or an integer >= 1, got {max_rank!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction: expected one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
        if int(window) != window or not 1 <= window <= interval:
            raise ValueError(f"window: expected an integer in [1, interval={interval}], got {window!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion: expected one of {CRITERIA}, got {criterion!r}")
        if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
            raise ValueError(f"alpha: expected a probability in (0, 1), got {alpha!r}")
        self.layers = _layers(model_or_layers)
        self.optimizer = optimizer
        if optimizer is not None:
            check_supported(optimizer)
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [n for n, m in self.layers.items() if id(m.lora_A) not in held or id(m.lora_B) not in held]
            if missing:
                raise ValueError(f"optimizer: does not hold the adapter parameters of {missing[:5]}")
        self.threshold = float(threshold)
        self.interval = int(interval)
        self.max_rank = max_rank
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        self.loss_reduction = loss_reduction
        self.reduce = reduce
        self.criterion = criterion
        self.alpha = float(alpha)
        self.window = int(window)
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
            capture = LayerCapture(layer, K.to(layer.lora_A), self.loss_reduction, self.criterion == "signal")
            layer._capture = capture
            self.captures[name] = capture

    def _disarm(self) -> None:
        for name in self.captures:
            self.layers[name]._capture = None
        self.captures = {}

    def _in_window(self) -> bool:
        """Whether the next step is one of the last ``window`` steps of its interval."""
        return (-(self.count + 1)) % self.interval < self.window

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

    def layer_max_rank(self, layer: SeLoRALinear) -> int:
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
        names = list(self.layers)
        ref = self.layers[names[0]].lora_A
        dtype = torch.promote_types(ref.dtype, torch.float32)
        rows = []
        for name in names:
            capture = self.captures[name]
            capture.flush()
            stats = capture.stats if capture.stats is not None else torch.zeros(3)
            rows.append(stats.to(device=ref.device, dtype=dtype))
        table = torch.stack(rows)  # (layers, 3)
        if grad_scale != 1.0:  # squared gradients of loss * grad_scale -> those of the loss
            table[:, :2] /= grad_scale**2
        if self.criterion == "signal":
            table, scores = self._reduce_signal(names, table)
        else:
            if self.reduce is not None:
                table = self.reduce(table)
            scores = [None] * len(names)
        decisions, swaps = [], {}
        for name, stats, score in zip(names, table.cpu(), scores):
            layer, capture = self.layers[name], self.captures[name]
            fi_orig, fi_exp = fi_scores(stats)
            ratio = fi_ratio(fi_orig, fi_exp)
            rank = layer.rank
            passed = ratio >= self.threshold if score is None else score.p_value <= self.alpha  # nan >= x is False
            grow = passed and rank < self.layer_max_rank(layer)
            if grow:
                old_A, old_B = layer.lora_A, layer.lora_B
                layer.expand(1, K=capture.K)  # Eq. 2, the K that was scored
                swaps[old_A], swaps[old_B] = layer.lora_A, layer.lora_B
            extra = () if score is None else (score.statistic, score.dof, score.p_value)
            decisions.append(Decision(name, rank, fi_orig, fi_exp, ratio, bool(grow), *extra))
        if swaps and self.optimizer is not None:
            replace_parameters(self.optimizer, swaps)
        return decisions

    def _reduce_signal(self, names: list[str], table: torch.Tensor) -> tuple[torch.Tensor, list[SignalScore]]:
        """Pack the ``(layers, 3)`` table and every layer's signal row into one vector, reduce it once,
        unpack, and score each layer (R and nu are invariant to a GradScaler's scale: no rescaling)."""
        rows = []
        for name in names:
            layer, capture = self.layers[name], self.captures[name]
            row = capture.signal_stats
            if row is None:  # the layer saw no gradient in this test
                row = torch.zeros(SIGNAL_SCALARS + layer.out_features * capture.K.shape[0])
            rows.append(row.to(table))
        packed = torch.cat([table.flatten(), *rows])
        if self.reduce is not None:
            packed = self.reduce(packed)
        packed = packed.cpu()
        table, rest = packed[: table.numel()].reshape(table.shape), packed[table.numel() :]
        scores = []
        for stats, part in zip(table, rest.split([r.numel() for r in rows])):
            scores.append(signal_score(part, float(stats[2])))
        return table, scores

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
