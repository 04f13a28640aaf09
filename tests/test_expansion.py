"""ExpansionController (Algorithm 1) and optimizer surgery."""

import copy
import math

import pytest
import torch
from torch import nn

import selora
from selora.core.criteria import FIRatio
from selora.core.layers import lora_layers
from selora.core.optim import replace_parameters


def toy(seed: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, selora.inject(model, "all-linear", generator=torch.Generator().manual_seed(seed))


def batch(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 6, generator=g)
    return x, torch.sin(3 * x[:, :3]) + x[:, 3:] ** 2


def train(model, opt, ctl, steps: range, calls: list | None = None) -> tuple[list[float], list[list]]:
    losses, decisions = [], []
    for s in steps:
        x, y = batch(s)
        if calls is not None:
            calls.append(ctl.armed)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        decisions.append(ctl.step())
        opt.zero_grad()
        losses.append(loss.item())
    return losses, decisions


def live_params_match(model, opt) -> bool:
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    return len(held) == len(set(held)) and set(held) == {id(p) for p in selora.trainable_parameters(model)}


def test_controller_counts_forward_calls_and_works_only_on_test_steps():
    model, _ = toy()
    forwards = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    opt = torch.optim.Adam(selora.trainable_parameters(model), lr=1e-2)
    ctl = selora.ExpansionController(model, opt, FIRatio(1.0), interval=4)
    armed = []
    _, decisions = train(model, opt, ctl, range(13), armed)
    assert len(forwards) == 13  # no extra forward: the controller never calls the model
    assert armed == [(s + 1) % 4 == 0 for s in range(13)]  # armed only for test steps' passes
    assert [bool(d) for d in decisions] == [(s + 1) % 4 == 0 for s in range(13)]
    assert all(len(d) == 3 for s, d in enumerate(decisions) if (s + 1) % 4 == 0)
    assert not ctl.armed and all(m._capture is None for m in lora_layers(model).values())


def test_expansion_decisions_and_optimizer_stays_exact():
    model, layers = toy()
    opt = torch.optim.AdamW(selora.trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    ctl = selora.ExpansionController(model, opt, FIRatio(1.0), interval=2, max_rank=3)
    _, decisions = train(model, opt, ctl, range(12))
    test_steps = [d for d in decisions if d]
    # threshold 1: every layer with signal grows by one per test until max_rank
    for t, ds in enumerate(test_steps):
        for d in ds:
            assert d.score.ratio >= 1 and d.expanded == (d.rank_before < 3)
            assert d.rank_before == min(1 + t, 3)
    assert selora.ranks(model) == {name: 3 for name in layers}
    assert live_params_match(model, opt)
    assert all(dict(model.named_modules())[n] is m for n, m in layers.items())


def test_threshold_and_zero_signal_block_expansion():
    model, _ = toy()
    opt = torch.optim.SGD(selora.trainable_parameters(model), lr=1e-2)
    ctl = selora.ExpansionController(model, opt, FIRatio(1e12), interval=1)
    _, decisions = train(model, opt, ctl, range(2))
    assert all(not d.expanded and d.score.ratio < 1e12 for ds in decisions for d in ds)
    assert set(selora.ranks(model).values()) == {1}
    # an unused layer scores 0/0: no expansion
    unused = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    layers = selora.inject(unused, "all-linear")
    ctl = selora.ExpansionController(layers, None, FIRatio(1.0), interval=1)
    unused["a"](torch.randn(4, 3)).sum().backward()
    by = {d.name: d for d in ctl.step()}
    assert math.isnan(by["b"].score.ratio) and not by["b"].expanded and by["b"].score.fi_orig == 0
    assert by["a"].expanded  # B = 0 at init: fi_orig has only dB, and the new column adds signal


def test_scored_K_is_installed():
    model, layers = toy()
    ctl = selora.ExpansionController(model, None, FIRatio(1.0), interval=1)
    Ks = {n: c.K.clone() for n, c in ctl.captures.items()}
    x, y = batch(0)
    ((model(x) - y) ** 2).mean().backward()
    ctl.step()
    for name, layer in layers.items():
        assert layer.rank == 2 and torch.equal(layer.lora_A[1:], Ks[name])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    ],
)
def test_optimizer_state_preserved_bit_for_bit(make):
    model, layers = toy()
    params = selora.trainable_parameters(model)
    opt = make([{"params": params[:2], "lr": 1e-3}, {"params": params[2:]}])
    ctl = selora.ExpansionController(model, opt, FIRatio(1.0), interval=3)
    train(model, opt, ctl, range(2))  # state exists, no test yet
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    x, y = batch(2)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    before = {n: (m.lora_A, m.lora_B) for n, m in layers.items()}
    states = {id(p): copy.deepcopy(opt.state[p]) for pair in before.values() for p in pair}
    assert all(d.expanded for d in ctl.step())  # test step 3: every layer grows (threshold 1)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert live_params_match(model, opt)
    for name, m in layers.items():
        assert m.rank == 2
        group = opt.param_groups[0 if name == "0" else 1]["params"]
        assert sum(p is m.lora_A for p in group) == 1 and sum(p is m.lora_B for p in group) == 1
        old_A, old_B = before[name]
        for old, new, keep in (
            (old_A, m.lora_A, (slice(0, 1), slice(None))),
            (old_B, m.lora_B, (slice(None), slice(0, 1))),
        ):
            assert old not in opt.state
            saved, state = states[id(old)], opt.state[new]
            assert set(state) == set(saved)
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and value.shape == old.shape:
                    assert state[key].shape == new.shape
                    assert torch.equal(state[key][keep], value), key  # old entries bit-for-bit
                    fresh = torch.ones_like(state[key], dtype=torch.bool)
                    fresh[keep] = False
                    assert torch.count_nonzero(state[key][fresh]) == 0, key  # zeros for new entries
                elif isinstance(value, torch.Tensor):
                    assert torch.equal(state[key], value), key  # step
                else:
                    assert state[key] == value, key
    train(model, opt, ctl, range(3, 4))  # and the optimizer steps on


def test_replace_parameters_copies_state_exactly():
    p = nn.Parameter(torch.randn(2, 3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.randn(2, 3)
    opt.step()
    saved = copy.deepcopy(opt.state[p])
    q = nn.Parameter(torch.randn(3, 3))
    replace_parameters(opt, {p: q})
    assert opt.param_groups[0]["params"] == [q] and p not in opt.state
    new = opt.state[q]
    assert torch.equal(new["step"], saved["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(new[key][:2], saved[key]) and torch.count_nonzero(new[key][2]) == 0
    q.grad = torch.ones(3, 3)
    opt.step()  # the resized state is usable
    with pytest.raises(ValueError, match="not in the optimizer"):
        replace_parameters(opt, {p: q})
    with pytest.raises(ValueError, match="cannot shrink"):
        replace_parameters(opt, {q: nn.Parameter(torch.zeros(2, 3))})


def test_unknown_optimizer_and_missing_parameters_are_errors():
    model, _ = toy()
    with pytest.raises(TypeError, match="RMSprop.*supported: Adam, AdamW, SGD"):
        selora.ExpansionController(model, torch.optim.RMSprop(selora.trainable_parameters(model)))
    with pytest.raises(ValueError, match="does not hold"):
        selora.ExpansionController(model, torch.optim.Adam(selora.trainable_parameters(model)[:2]))
    with pytest.raises(ValueError, match="no SeLoRALinear"):
        selora.ExpansionController(nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="interval"):
        selora.ExpansionController(model, None, interval=0)
    with pytest.raises(ValueError, match="loss_reduction"):
        selora.ExpansionController(model, None, loss_reduction="none")


def test_resume_from_state_dict_gives_same_ranks_and_losses():
    def fresh():
        model, _ = toy()
        opt = torch.optim.Adam(selora.trainable_parameters(model), lr=2e-2)
        ctl = selora.ExpansionController(
            model, opt, FIRatio(1.05), interval=3, generator=torch.Generator().manual_seed(7)
        )
        return model, opt, ctl

    model, opt, ctl = fresh()
    losses_a, _ = train(model, opt, ctl, range(17))
    ranks_a = selora.ranks(model)

    model, opt, ctl = fresh()
    train(model, opt, ctl, range(8))  # stop right before the test step 9 (armed)
    assert ctl.armed
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ctl.state_dict()))
    del model, opt, ctl

    model, opt, ctl = fresh()
    ctl.load_state_dict(saved[2])
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    assert ctl.armed and ctl.count == 8
    losses_b, _ = train(model, opt, ctl, range(8, 17))
    assert selora.ranks(model) == ranks_a and max(ranks_a.values()) > 1
    assert losses_b == losses_a[8:]
    assert live_params_match(model, opt)


def test_reduce_hook_sees_the_statistics():
    model, _ = toy()
    seen = []

    def double(stats):
        seen.append(stats.clone())
        return 2 * stats  # like summing two identical DDP ranks: FI values unchanged

    x, y = batch(0)
    ref_model = copy.deepcopy(model)
    ref = selora.ExpansionController(
        ref_model, None, FIRatio(1e9), interval=1, generator=torch.Generator().manual_seed(0)
    )
    ((ref_model(x) - y) ** 2).mean().backward()
    ctl = selora.ExpansionController(
        model, None, FIRatio(1e9), interval=1, generator=torch.Generator().manual_seed(0), reduce=double
    )
    ((model(x) - y) ** 2).mean().backward()
    got, want = ctl.step(), ref.step()
    assert len(seen) == 1 and seen[0].shape == (3, 3) and torch.all(seen[0][:, 2] == 16)
    for a, b in zip(got, want):
        assert a.score.fi_orig == pytest.approx(b.score.fi_orig) and a.score.fi_exp == pytest.approx(b.score.fi_exp)


def test_discard_drops_a_skipped_pass_and_keeps_the_test_step():
    """A pass whose step is skipped (here: a huge loss, as an fp16 overflow would give) is dropped by
    ``discard()``; the next pass is captured afresh with the same K: the decisions of a controller
    that never saw the bad pass."""
    model, _ = toy()
    ref_model = copy.deepcopy(model)
    ctl = selora.ExpansionController(model, None, FIRatio(1.0), interval=1, generator=torch.Generator().manual_seed(0))
    ref = selora.ExpansionController(
        ref_model, None, FIRatio(1.0), interval=1, generator=torch.Generator().manual_seed(0)
    )
    (bx, by), (x, y) = batch(7), batch(0)
    (((model(bx) - by) ** 2).mean() * float("inf")).backward()
    assert ctl.armed
    ctl.discard()
    assert ctl.armed and all(c.stats is None for c in ctl.captures.values())
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    ((ref_model(x) - y) ** 2).mean().backward()
    got, want = ctl.step(), ref.step()
    assert [(d.name, d.score, d.expanded) for d in got] == [(d.name, d.score, d.expanded) for d in want]
    assert all(math.isfinite(d.score.ratio) for d in got) and selora.ranks(model) == selora.ranks(ref_model)


@pytest.mark.parametrize("scale", [2.0**16, 3.0])
def test_grad_scale_is_divided_out_of_the_statistics(scale):
    """Hooks see the gradient of ``loss * scale`` (a GradScaler); ``step(grad_scale=scale)`` gives the
    FI values of the unscaled loss (sums of squared gradients: divided by scale^2)."""
    model, _ = toy()
    ref_model = copy.deepcopy(model)
    ctl = selora.ExpansionController(model, None, FIRatio(1.0), interval=1, generator=torch.Generator().manual_seed(0))
    ref = selora.ExpansionController(
        ref_model, None, FIRatio(1.0), interval=1, generator=torch.Generator().manual_seed(0)
    )
    x, y = batch(0)
    (((model(x) - y) ** 2).mean() * scale).backward()
    ((ref_model(x) - y) ** 2).mean().backward()
    got, want = ctl.step(grad_scale=scale), ref.step()
    for a, b in zip(got, want):
        assert a.score.fi_orig == pytest.approx(b.score.fi_orig, rel=1e-5) and a.score.fi_exp == pytest.approx(
            b.score.fi_exp, rel=1e-5
        )
        assert a.score.ratio == pytest.approx(b.score.ratio, rel=1e-5) and a.expanded == b.expanded
    with pytest.raises(ValueError, match="grad_scale"):
        ctl.step(grad_scale=0.0)
