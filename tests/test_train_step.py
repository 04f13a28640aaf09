"""The one training step (selora.train_step) and the run state (selora.run_state) on tiny problems."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selora.run_state import RunState
from selora.train_step import NON_FINITE_GRADIENT, NON_FINITE_LOSS, TrainStep, squared_error


def problem(seed: int = 0) -> tuple[nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(6, 3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return layer, (torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g))


def test_a_plain_step_is_backward_step_zero_grad_bitwise():
    """No scaler, schedule, method or controller: exactly ``loss.backward(); opt.step(); opt.zero_grad()``."""
    (a, batch), (b, _) = problem(), problem()
    opt_a, opt_b = torch.optim.Adam(a.parameters(), lr=0.1), torch.optim.Adam(b.parameters(), lr=0.1)
    step = TrainStep(a, opt_a, squared_error)
    for i in range(3):
        result = step(batch, i)
        loss = squared_error(b, batch)
        loss.backward()
        opt_b.step()
        opt_b.zero_grad()
        assert result.skipped is None and torch.equal(result.loss, loss.detach())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(p.grad is None for p in a.parameters())


def test_a_poisoned_loss_is_skipped_and_changes_nothing():
    layer, batch = problem()
    before = [p.detach().clone() for p in layer.parameters()]
    step = TrainStep(layer, torch.optim.SGD(layer.parameters(), lr=0.1), squared_error)
    step.add_callback("on_loss", lambda s: setattr(s, "loss", s.loss * float("nan")))
    result = step(batch, 0)
    assert result.skipped == NON_FINITE_LOSS and torch.isnan(result.loss)
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before))
    assert all(p.grad is None for p in layer.parameters())


def test_a_non_finite_gradient_is_skipped():
    layer, (x, y) = problem()
    step = TrainStep(layer, torch.optim.SGD(layer.parameters(), lr=0.1), squared_error)
    step.add_callback("on_backward", lambda s: layer.weight.grad.fill_(float("inf")))
    assert step((x, y), 0).skipped == NON_FINITE_GRADIENT


def test_an_extra_pass_on_backward_doubles_the_gradient():
    """The authors' scoring pass (one more forward/backward) before the optimizer step, as a callback."""
    (a, batch), (b, _) = problem(), problem()
    once = TrainStep(a, torch.optim.SGD(a.parameters(), lr=0.1), squared_error)
    twice = TrainStep(b, torch.optim.SGD(b.parameters(), lr=0.05), squared_error)
    twice.add_callback("on_backward", lambda s: squared_error(s.forward, s.batch).backward())
    once(batch, 0), twice(batch, 0)
    assert all(torch.allclose(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_an_unknown_event_is_refused():
    layer, _ = problem()
    with pytest.raises(ValueError, match="event: expected one of"):
        TrainStep(layer, torch.optim.SGD(layer.parameters(), lr=0.1), squared_error).add_callback("on_end", print)


def test_run_state_reads_a_checkpoint_written_before_it_had_every_field():
    saved = {"step": 7, "epoch": 1, "batch": 2, "attempt": 8, "bad": 0, "best": None, "finished": False, "world": 1}
    assert RunState.from_json(saved) == RunState(step=7, epoch=1, batch=2, attempt=8)
    assert RunState.from_json({**saved, "stopped_at": 7, "eval_step": 7}).stopped_at == 7
