"""Expansion criteria as objects (selora.core.criteria): the controller runs Algorithm 1 for any of
them, a decision carries what its criterion scored, the registry is the one place names are read,
and the rank-history fields the trainer writes stay those the published runs have."""

from __future__ import annotations

import ast
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import selora
from selora.config import TrainConfig
from selora.core.criteria import (
    CRITERIA,
    LAMBDA,
    Criterion,
    FIRatio,
    FisherScore,
    SignalTest,
    SignalTestScore,
    criterion_from_config,
)
from selora.core.expansion import INTERVAL, Decision, ExpansionController
from selora.core.fisher import FISHER_STATS, sample_stats
from selora.methods.selora import SeLoRAAdapters

PACKAGE = Path(selora.__file__).resolve().parent


def model_and_batch(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    layers = selora.inject(model, "all-linear", kind="selora", rank=1, generator=torch.Generator().manual_seed(seed))
    for layer in layers.values():
        nn.init.normal_(layer.lora_B, std=0.3)
    return model, torch.randn(12, 6), torch.randn(12, 5)


def one_test(criterion: Criterion | None, seed: int = 0) -> list[Decision]:
    model, x, y = model_and_batch(seed)
    ctl = ExpansionController(model, None, criterion, interval=1, generator=torch.Generator().manual_seed(1))
    ((model(x) - y) ** 2).mean().backward()
    return ctl.step()


@dataclasses.dataclass(frozen=True)
class EveryOther(Criterion):
    """A criterion the controller has never heard of: grows the layers whose FI_orig is above the median."""

    name = "every-other"

    @classmethod
    def from_config(cls, cfg):  # pragma: no cover - not registered
        return cls()

    def fold(self, layer, K, grads):
        return sample_stats(*grads)

    def row_size(self, capture):
        return FISHER_STATS

    def scores(self, captures, grad_scale, reduce):
        fi = [float(row[0] / row[2]) for row in self.rows(captures)]
        cut = sorted(fi)[len(fi) // 2]
        return [SimpleNamespace(fi=v, above=v >= cut, record=lambda v=v: {"fi": v}) for v in fi]

    def passes(self, score) -> bool:
        return score.above

    def describe(self) -> str:
        return "its FI_orig is above the median of the tested layers"


def test_the_controller_runs_any_criterion():
    decisions = one_test(EveryOther())
    assert [d.expanded for d in decisions] == [d.score.above for d in decisions]
    assert any(d.expanded for d in decisions) and not all(d.expanded for d in decisions)


def test_a_decision_carries_what_its_criterion_scored():
    fisher = one_test(None)
    signal = one_test(SignalTest(alpha=0.5))
    assert [f.name for f in dataclasses.fields(Decision)] == ["name", "rank_before", "score", "expanded"]
    assert all(type(d.score) is FisherScore for d in fisher), "the default criterion is the paper's"
    assert all(type(d.score) is SignalTestScore for d in signal)
    assert [d.score for d in fisher] == [d.score.fisher for d in signal], "the same capture, the same FI values"
    for d in fisher:
        assert all(math.isfinite(getattr(d.score, f.name)) for f in dataclasses.fields(d.score)), "nothing NaN-filled"


def test_pass_rules():
    assert FIRatio(1.5).passes(FisherScore(1.0, 1.5, 1.5)) and not FIRatio(1.5).passes(FisherScore(1.0, 1.4, 1.4))
    assert not FIRatio(1.0).passes(FisherScore(0.0, 0.0, math.nan)), "an unused layer (0/0) never passes"
    score = SignalTestScore(FisherScore(1.0, 2.0, 2.0), selora.core.signal.SignalScore(3.0, 2.0, 10.0, 0.01))
    assert SignalTest(alpha=0.01).passes(score) and not SignalTest(alpha=0.009).passes(score)


def test_the_paper_values_are_written_once():
    assert (LAMBDA, INTERVAL) == (1.1, 40)
    cfg = TrainConfig()
    assert (cfg.threshold, cfg.interval, cfg.criterion) == (LAMBDA, INTERVAL, FIRatio.name)
    ctl = ExpansionController([selora.SeLoRALinear(nn.Linear(3, 2), rank=1)], None)
    assert ctl.criterion == FIRatio(LAMBDA) and ctl.interval == INTERVAL


def test_registry_builds_from_the_config_keys():
    assert set(CRITERIA) == set(TrainConfig.__dataclass_fields__["criterion"].metadata["choices"])
    keys = dict(criterion="fi-ratio", threshold=1.3, interval=10, signal_alpha=0.01, signal_window=4)
    assert criterion_from_config(SimpleNamespace(**keys)) == FIRatio(1.3)
    assert criterion_from_config(SimpleNamespace(**{**keys, "criterion": "signal"})) == SignalTest(0.01, 4)
    with pytest.raises(ValueError, match="key 'criterion': expected one of fi-ratio, signal, got 'magic'"):
        criterion_from_config(SimpleNamespace(**{**keys, "criterion": "magic"}))
    with pytest.raises(ValueError, match="key 'signal_window': expected at most interval=3"):
        criterion_from_config(SimpleNamespace(**{**keys, "criterion": "signal", "interval": 3}))
    with pytest.raises(ValueError, match="threshold: expected a finite number"):
        FIRatio(math.inf)


def record_keys(criterion: str) -> list[str]:
    """The keys of a rank-history record SeLoRA writes on a test step under ``criterion``."""
    model = nn.Sequential(nn.Linear(6, 5))
    cfg = TrainConfig(interval=1, criterion=criterion, signal_window=1, signal_alpha=0.5)
    adapters = SeLoRAAdapters.from_config(model, "all-linear", cfg, 10, torch.Generator().manual_seed(0))
    adapters.attach(torch.optim.SGD(selora.trainable_parameters(model), lr=0.1))
    x = torch.randn(8, 6)
    model(x).pow(2).mean().backward()
    change = adapters.after_step(0)
    assert all(set(v) == {"0"} for k, v in change.record.items() if k not in ("expanded",))
    return list(change.record)


def test_rank_history_records_keep_their_fields():
    """Published experiments and chapters read these keys (rank_history.jsonl)."""
    assert record_keys("fi-ratio") == ["ranks", "expanded", "ratios"]
    assert record_keys("signal") == ["ranks", "expanded", "ratios", "signal", "signal_dof", "p_values"]


def string_comparisons(tree: ast.AST, names: Sequence[str]) -> list[int]:
    """Lines comparing with one of ``names`` (``==``, ``!=``, ``in``, ...)."""
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                for const in ast.walk(operand):
                    if isinstance(const, ast.Constant) and const.value in names:
                        hits.append(node.lineno)
    return hits


def test_no_criterion_name_is_compared_outside_the_registry():
    names = list(CRITERIA)
    assert string_comparisons(ast.parse('if c == "signal": pass'), names) == [1], "the check can fail"
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "criteria.py":
            continue
        lines = string_comparisons(ast.parse(path.read_text(encoding="utf-8")), names)
        if lines:
            found[path.relative_to(PACKAGE).as_posix()] = lines
    assert not found, f"criterion names compared outside selora/core/criteria.py: {found}"


def test_the_paper_fisher_does_not_import_the_signal_test():
    tree = ast.parse((PACKAGE / "core" / "fisher.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {"selora.core.signal", "selora.core.criteria"} & imported, imported


def test_each_criterion_describes_its_rule_with_its_settings():
    """What a model card says a SeLoRA run expanded on (selora.methods.SeLoRAAdapters.card_text)."""
    assert "λ = 1.3" in FIRatio(1.3).describe()
    assert "p <= 0.01" in SignalTest(0.01, window=5).describe() and "5 step" in SignalTest(0.01, window=5).describe()
