"""Per-sample Fisher from hooks == torch.func per-sample reference (Eq. 3-5)."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import selora
from selora.core.criteria import FIRatio
from selora.core.fisher import fi_ratio


class Mixed(nn.Module):
    """3-D input layer, a layer called twice, a 2-D input head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, 5) -> (N, 3)
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))
        return self.head(h.mean(1))


def make_model(seed: int = 0, rank: int = 2, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = Mixed().to(dtype)
    layers = selora.inject(model, "all-linear", rank=rank, scale=0.7, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for layer in layers.values():  # non-zero B so that A receives gradient too
            layer.lora_B.normal_(0.0, 0.5)
    return model


def per_sample_loss(model, params, x, y):
    out = functional_call(model, params, (x[None],))
    return ((out - y[None]) ** 2).sum()


def reference_fi(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """mean_i sum over adapter entries of (dL_i/dtheta)^2 per layer, via vmap(grad)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    grads = vmap(grad(lambda p, xi, yi: per_sample_loss(model, p, xi, yi)), in_dims=(None, 0, 0))(params, x, y)
    out = {}
    for name in selora.ranks(model):
        g = [grads[f"{name}.lora_A"], grads[f"{name}.lora_B"]]
        out[name] = sum(t.pow(2).sum().item() for t in g) / x.shape[0]
    return out


def data(seed: int, n: int = 7, t: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def captured(model, x, y, reduction="mean"):
    """One controlled step (interval 1, no expansion): decisions and the candidate rows K."""
    ctl = selora.ExpansionController(
        model, None, FIRatio(1e30), interval=1, generator=torch.Generator().manual_seed(3), loss_reduction=reduction
    )
    Ks = {name: c.K.clone() for name, c in ctl.captures.items()}
    per = ((model(x) - y) ** 2).sum(1)
    (per.mean() if reduction == "mean" else per.sum()).backward()
    decisions = {d.name: d for d in ctl.step()}
    ctl.close()
    return decisions, Ks


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fi_orig_and_exp_match_vmap_reference(reduction):
    model = make_model()
    x, y = data(1)
    decisions, Ks = captured(model, x, y, reduction)
    ref_orig = reference_fi(model, x, y)
    expanded = copy.deepcopy(model)
    for name, layer in selora.core.layers.lora_layers(expanded).items():
        layer.expand(1, K=Ks[name])
    ref_exp = reference_fi(expanded, x, y)
    assert set(decisions) == {"inp", "mid", "head"}
    for name, d in decisions.items():
        assert d.score.fi_orig == pytest.approx(ref_orig[name], rel=1e-5), name
        assert d.score.fi_exp == pytest.approx(ref_exp[name], rel=1e-5), name
        assert d.score.fi_exp > d.score.fi_orig > 0
        assert d.score.ratio == pytest.approx(ref_exp[name] / ref_orig[name], rel=1e-5)
        assert not d.expanded


def test_gradient_accumulation_counts_samples_once():
    """Two half-batch passes (mean loss each) give the same FI as one full pass."""
    x, y = data(2, n=8)
    full, _ = captured(make_model(), x, y)
    model = make_model()
    ctl = selora.ExpansionController(model, None, FIRatio(1e30), interval=1, generator=torch.Generator().manual_seed(3))
    for sl in (slice(0, 4), slice(4, 8)):
        (((model(x[sl]) - y[sl]) ** 2).sum(1).mean() / 2).backward()
    halves = {d.name: d for d in ctl.step()}
    for name, d in full.items():
        # each half's mean loss is halved again here: per-sample gradients are 1/2, FI is 1/4
        assert halves[name].score.fi_orig == pytest.approx(d.score.fi_orig / 4, rel=1e-9)
        assert halves[name].score.ratio == pytest.approx(d.score.ratio, rel=1e-9)


def test_differs_from_squared_mean_gradient():
    """Eq. 3 squares PER-SAMPLE gradients; the squared batch-mean gradient is another quantity."""
    model = make_model()
    x, y = data(4, n=16)
    decisions, _ = captured(model, x, y)
    for name, layer in selora.core.layers.lora_layers(model).items():
        shortcut = layer.lora_A.grad.pow(2).sum().item() + layer.lora_B.grad.pow(2).sum().item()
        # Jensen: mean_i g_i^2 >= (mean_i g_i)^2, and with 16 samples far from equality
        assert shortcut < 0.5 * decisions[name].score.fi_orig, name


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    rank=st.integers(1, 3),
    n=st.integers(1, 5),
    t=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    zero_b=st.booleans(),
)
def test_ratio_is_at_least_one(d_in, d_out, rank, n, t, seed, zero_b):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 2))
    layers = selora.inject(model, "all-linear", rank=rank)
    if not zero_b:
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_B.normal_()
    ctl = selora.ExpansionController(
        model, None, FIRatio(1e30), interval=1, generator=torch.Generator().manual_seed(seed)
    )
    x = torch.randn(n, t, d_in) if t > 1 else torch.randn(n, d_in)
    model(x).pow(2).mean().backward()
    for d in ctl.step():
        if d.score.fi_orig > 0:
            assert d.score.fi_exp / d.score.fi_orig >= 1.0
            assert d.score.fi_orig / d.score.fi_exp <= 1.0  # the printed Eq. 5 direction can never reach 1.1
        else:
            assert math.isinf(d.score.ratio) or math.isnan(d.score.ratio)


def test_fi_ratio_edge_cases():
    assert fi_ratio(2.0, 3.0) == 1.5
    assert math.isinf(fi_ratio(0.0, 1.0))
    assert math.isnan(fi_ratio(0.0, 0.0))


class Checkpointed(Mixed):
    reentrant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        def body(h):
            return torch.tanh(self.mid(torch.tanh(self.mid(h))))

        h = checkpoint(body, torch.tanh(self.inp(x)), use_reentrant=self.reentrant)
        return self.head(h.mean(1))


class Reentrant(Checkpointed):
    reentrant = True


def test_activation_checkpointing_with_accumulation_matches():
    """Recomputed forwards during backward add nothing; micro-batches still count once each."""
    x, y = data(5, n=6)
    results = []
    for cls in (Mixed, Checkpointed, Reentrant):
        model = make_model()
        model.__class__ = cls
        ctl = selora.ExpansionController(
            model, None, FIRatio(1e30), interval=1, generator=torch.Generator().manual_seed(3)
        )
        for sl in (slice(0, 3), slice(3, 6)):
            ((model(x[sl]) - y[sl]) ** 2).sum(1).mean().backward()
        results.append({d.name: (d.score.fi_orig, d.score.fi_exp) for d in ctl.step()})
    for other in results[1:]:
        for name, (orig, exp) in results[0].items():
            assert other[name] == pytest.approx((orig, exp), rel=1e-9), name


def test_functional_helpers_agree_with_the_controller():
    """per_sample_grads -> sample_stats -> fi_scores, by hand from dL/dy, equals the hooked capture."""
    from selora.core.fisher import fi_scores, per_sample_grads, sample_stats

    torch.manual_seed(0)
    layer = selora.SeLoRALinear(nn.Linear(5, 4), rank=2, scale=1.5).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    ctl = selora.ExpansionController([layer], None, FIRatio(1e30), interval=1)
    K = ctl.captures["0"].K
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    y = layer(x)
    y.retain_grad()
    y.pow(2).sum(dim=(1, 2)).mean().backward()
    (decision,) = ctl.step()
    with torch.no_grad():
        u = x @ layer.lora_A.T
        parts = per_sample_grads(x, u, y.grad, layer.lora_B, layer.scaling, K, factor=6)
    assert fi_scores(sample_stats(*parts)) == pytest.approx((decision.score.fi_orig, decision.score.fi_exp), rel=1e-12)
    # and dB summed over samples is N times the batch gradient of the mean loss
    torch.testing.assert_close(parts[1].sum(0) / 6, layer.lora_B.grad)
    torch.testing.assert_close(parts[0].sum(0) / 6, layer.lora_A.grad)
