"""Expansion criteria: what a test step measures on each layer, and when the layer grows.

A :class:`Criterion` owns the test of Algorithm 1, so that the controller
(:class:`selora.core.expansion.ExpansionController`) runs the algorithm once for any of them:

- what the hooks keep (:meth:`Criterion.fold`): one backward's per-sample gradients of a layer
  (:class:`selora.core.fisher.SampleGrads`) folded into a row of sums, which adds up across
  micro-batches, the steps of a window and processes;
- the score of every layer from those rows, after one reduction across processes (:meth:`Criterion.scores`);
- the pass rule (:meth:`Criterion.passes`).

:class:`FIRatio` is the paper's (Eq. 3-5: expand when FI_exp / FI_orig >= lambda, on the test step);
:class:`SignalTest` is this book's (chapter 9, :mod:`selora.core.signal`: expand when the new column's
mean per-sample gradient stands above sampling noise at level alpha, over the last ``window`` steps of
each interval). A score names its own fields of the rank history (:meth:`Score.record`).
:data:`CRITERIA` is the registry of the config's ``criterion`` values and :func:`criterion_from_config`
the one place a criterion is looked up by name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from selora.core.fisher import FISHER_STATS, LayerCapture, SampleGrads, fi_ratio, fi_scores, sample_stats
from selora.core.growable import Growable
from selora.core.signal import SIGNAL_SCALARS, SignalScore, complement_grads, signal_row, signal_score

#: lambda, the paper's threshold on FI_exp / FI_orig.
LAMBDA = 1.1
#: ``reduce(stats) -> stats``, an elementwise SUM (e.g. an all-reduce across DDP ranks).
Reduce = Callable[[torch.Tensor], torch.Tensor]


class Score(Protocol):
    """One layer's score on a test step."""

    def record(self) -> dict[str, float]:
        """``{rank-history key: value}`` of this layer (e.g. ``{"ratios": 1.3}``)."""


class CriterionConfig(Protocol):
    """The training-config keys the criteria read (:class:`selora.config.TrainConfig` has them)."""

    criterion: str
    threshold: float
    interval: int
    signal_alpha: float
    signal_window: int


@dataclass(frozen=True)
class FisherScore:
    """FI-Scores (Eq. 4) of a layer and of the layer expanded by the scored K, and
    ``ratio = fi_exp / fi_orig`` (Eq. 5, working direction, >= 1; ``inf`` if only fi_exp > 0,
    ``nan`` for 0/0, e.g. a layer that was not used)."""

    fi_orig: float
    fi_exp: float
    ratio: float

    @classmethod
    def of(cls, stats: torch.Tensor) -> FisherScore:
        """The score of a summed :func:`selora.core.fisher.sample_stats` row ``(3,)``."""
        fi_orig, fi_exp = fi_scores(stats)
        return cls(fi_orig, fi_exp, fi_ratio(fi_orig, fi_exp))

    def record(self) -> dict[str, float]:
        return {"ratios": self.ratio}


@dataclass(frozen=True)
class SignalTestScore:
    """The signal test's score of a layer (:class:`selora.core.signal.SignalScore`: R, nu, p-value),
    beside the paper's FI values of the same capture."""

    fisher: FisherScore
    signal: SignalScore

    def record(self) -> dict[str, float]:
        test = {"signal": self.signal.statistic, "signal_dof": self.signal.dof, "p_values": self.signal.p_value}
        return {**self.fisher.record(), **test}


def _check_probability(value: float, what: str) -> None:
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise ValueError(f"{what}: expected a probability in (0, 1), got {value!r}")


def fisher_table(captures: Sequence[LayerCapture], rows: Sequence[torch.Tensor], grad_scale: float) -> torch.Tensor:
    """``(layers, 3)`` :func:`~selora.core.fisher.sample_stats` sums, the first entries of ``rows``, on the
    first layer's device in at least float32; the squared gradients of ``loss * grad_scale`` (a
    GradScaler's backward) divided back to those of the loss."""
    ref = captures[0].layer.lora_A
    dtype = torch.promote_types(ref.dtype, torch.float32)
    table = torch.stack([row[:FISHER_STATS].to(device=ref.device, dtype=dtype) for row in rows])
    if grad_scale != 1.0:
        table[:, :2] /= grad_scale**2
    return table


class Criterion(ABC):
    """An expansion test (module docstring). ``window``: the last ``window`` steps of every
    interval are captured, one K per window (1: the test step only)."""

    name: ClassVar[str]
    window: int = 1

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: CriterionConfig) -> Criterion:
        """The criterion with the config's settings; ValueError naming the key for a bad one."""

    @abstractmethod
    def fold(self, layer: Growable, K: torch.Tensor, grads: SampleGrads) -> torch.Tensor:
        """What the capture keeps of one backward of ``layer`` (candidate rows ``K`` ``(k, in)``): a row of sums."""

    @abstractmethod
    def scores(self, captures: Sequence[LayerCapture], grad_scale: float, reduce: Reduce | None) -> list[Score]:
        """Every layer's score from its capture's summed rows (``reduce``d once across processes);
        ``grad_scale``: the loss scale of the captured backward."""

    @abstractmethod
    def passes(self, score: Score) -> bool:
        """Whether a layer with this score grows (if its rank is below its cap)."""

    @abstractmethod
    def describe(self) -> str:
        """The pass rule in words, completing "a layer grows when ..." (a model card's sentence)."""

    def rows(self, captures: Sequence[LayerCapture]) -> list[torch.Tensor]:
        """Each capture's summed rows; zeros for a layer that saw no gradient in the test."""
        return [c.stats if c.stats is not None else torch.zeros(self.row_size(c)) for c in captures]

    @abstractmethod
    def row_size(self, capture: LayerCapture) -> int:
        """Length of a folded row of ``capture``'s layer."""


@dataclass(frozen=True)
class FIRatio(Criterion):
    """The paper's test (Eq. 3-5): expand when ``FI_exp / FI_orig >= threshold`` (lambda)."""

    threshold: float = LAMBDA
    name: ClassVar[str] = "fi-ratio"

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise ValueError(f"threshold: expected a finite number, got {self.threshold!r}")

    @classmethod
    def from_config(cls, cfg: CriterionConfig) -> FIRatio:
        return cls(cfg.threshold)

    def fold(self, layer: Growable, K: torch.Tensor, grads: SampleGrads) -> torch.Tensor:
        return sample_stats(*grads)

    def row_size(self, capture: LayerCapture) -> int:
        return FISHER_STATS

    def scores(self, captures: Sequence[LayerCapture], grad_scale: float, reduce: Reduce | None) -> list[Score]:
        table = fisher_table(captures, self.rows(captures), grad_scale)
        if reduce is not None:
            table = reduce(table)
        return [FisherScore.of(stats) for stats in table.cpu()]

    def passes(self, score: FisherScore) -> bool:
        return score.ratio >= self.threshold  # nan >= x is False

    def describe(self) -> str:
        return f"the Fisher-information ratio of an expanded candidate reaches λ = {self.threshold:g}"


@dataclass(frozen=True)
class SignalTest(Criterion):
    """This book's test (:mod:`selora.core.signal`): expand when the p-value of the new column's mean
    per-sample gradient is at most ``alpha`` (the false-expansion rate per layer and test on pure
    noise), captured over the last ``window`` steps of every interval."""

    alpha: float
    window: int = 1
    name: ClassVar[str] = "signal"

    def __post_init__(self) -> None:
        _check_probability(self.alpha, "alpha")
        if not (isinstance(self.window, int) and self.window >= 1):
            raise ValueError(f"window: expected an integer >= 1, got {self.window!r}")

    @classmethod
    def from_config(cls, cfg: CriterionConfig) -> SignalTest:
        _check_probability(cfg.signal_alpha, "key 'signal_alpha'")
        if cfg.signal_window > cfg.interval:
            raise ValueError(f"key 'signal_window': expected at most interval={cfg.interval}, got {cfg.signal_window}")
        return cls(cfg.signal_alpha, cfg.signal_window)

    def fold(self, layer: Growable, K: torch.Tensor, grads: SampleGrads) -> torch.Tensor:
        """:func:`~selora.core.fisher.sample_stats`, then :func:`~selora.core.signal.signal_row` of the
        new column's complement gradients at the layer's parameters of that backward."""
        complement = complement_grads(grads.dB, grads.dB_new, layer.lora_A, layer.lora_B, K)
        return torch.cat([sample_stats(*grads), signal_row(complement)])

    def row_size(self, capture: LayerCapture) -> int:
        return FISHER_STATS + SIGNAL_SCALARS + capture.layer.out_features * capture.K.shape[0]

    def scores(self, captures: Sequence[LayerCapture], grad_scale: float, reduce: Reduce | None) -> list[Score]:
        """Pack the Fisher table and every layer's signal row into one vector, reduce it once, unpack,
        score (R and nu are invariant to a GradScaler's scale: the signal rows are not rescaled)."""
        rows = self.rows(captures)
        table = fisher_table(captures, rows, grad_scale)
        tails = [row[FISHER_STATS:].to(table) for row in rows]
        packed = torch.cat([table.flatten(), *tails])
        if reduce is not None:
            packed = reduce(packed)
        packed = packed.cpu()
        table, rest = packed[: table.numel()].reshape(table.shape), packed[table.numel() :]
        return [
            SignalTestScore(FisherScore.of(stats), signal_score(tail, float(stats[2])))
            for stats, tail in zip(table, rest.split([t.numel() for t in tails]))
        ]

    def passes(self, score: SignalTestScore) -> bool:
        return score.signal.p_value <= self.alpha

    def describe(self) -> str:
        return (
            "the new column's mean per-sample gradient stands above sampling noise "
            f"(signal test, p <= {self.alpha:g} over the last {self.window} step(s) of each interval)"
        )


#: THE registry of expansion criteria (config ``criterion`` values).
CRITERIA: dict[str, type[Criterion]] = {cls.name: cls for cls in (FIRatio, SignalTest)}


def criterion_from_config(cfg: CriterionConfig) -> Criterion:
    """The criterion the config's ``criterion`` key names, with its settings (ValueError naming the key)."""
    if cfg.criterion not in CRITERIA:
        raise ValueError(f"key 'criterion': expected one of {', '.join(CRITERIA)}, got {cfg.criterion!r}")
    return CRITERIA[cfg.criterion].from_config(cfg)
