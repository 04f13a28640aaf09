"""selora.book.step_cost: the cost of a plain step, a hook-scored test step and an extra forward/backward."""

from __future__ import annotations

import pytest
import torch

from selora import ExpansionController, inject, trainable_parameters
from selora.book.step_cost import SCORING_MODES, scoring_costs


def _mlp_and_batch(kind):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    inject(mlp, "all-linear", kind=kind, rank=2)
    opt = torch.optim.Adam(trainable_parameters(mlp), lr=1e-3)
    return mlp, torch.randn(3, 5, 6), torch.randn(3, 5, 4), opt


def test_scoring_costs_counts_the_hooks_on_test_steps_only():
    mlp, x, y, opt = _mlp_and_batch("selora")
    A0 = mlp[0].lora_A.detach().clone()
    costs = scoring_costs(mlp, x, y, opt, steps=2, rounds=2, warmup=1)
    assert not torch.equal(mlp[0].lora_A, A0)  # real training steps
    plain, test, extra = (costs[m] for m in SCORING_MODES)
    assert 0 < plain.flops < test.flops  # the hooks' per-sample products are counted
    assert extra.flops == 2 * plain.flops  # an extra forward/backward, no hooks
    assert all(len(c.seconds) == 4 and min(c.seconds) > 0 for c in costs.values())
    assert {m.rank for m in mlp.modules() if hasattr(m, "rank")} == {2}  # nothing grew
    assert all(getattr(m, "_capture", None) is None for m in mlp.modules())  # left disarmed


def test_scoring_costs_plain_step_is_a_lora_step():
    """The plain step pays nothing for SeLoRA: its FLOPs equal fixed-rank LoRA's."""
    plain = {}
    for kind in ("selora", "lora"):
        costs = scoring_costs(*_mlp_and_batch(kind), steps=1, rounds=1, modes=["plain step"])
        plain[kind] = costs["plain step"].flops
    assert plain["selora"] == plain["lora"] > 0


def test_scoring_costs_refuses_a_model_another_controller_scores():
    mlp, x, y, opt = _mlp_and_batch("selora")
    ExpansionController(mlp, opt, interval=1)
    with pytest.raises(ValueError, match="armed"):
        scoring_costs(mlp, x, y, opt, steps=1, rounds=1)


def test_scoring_costs_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="modes: expected some of"):
        scoring_costs(*_mlp_and_batch("selora"), steps=1, rounds=1, modes=["plain"])
