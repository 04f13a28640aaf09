"""The signal test (selora.core.signal): its null distribution against scipy, its predictions, the
complement projection, DDP-style reduction, and its wiring into the controller and the config."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats as sps
from torch import nn

import selora
from selora.config import ConfigError, TrainConfig
from selora.core.criteria import FIRatio, SignalTest
from selora.core.expansion import ExpansionController
from selora.core.layers import SeLoRALinear
from selora.core.signal import (
    complement_grads,
    critical_value,
    effective_dof,
    false_expansion_rate,
    noise_sf,
    signal_row,
    signal_score,
)


def scores(draw, trials: int, n: int) -> list:
    return [signal_score(signal_row(draw()), n) for _ in range(trials)]


@pytest.mark.parametrize(("dof", "n", "x"), [(1, 8, 3.0), (16, 64, 1.7), (4.5, 20, 0.4), (300, 320, 1.2)])
def test_noise_sf_is_the_beta_tail(dof, n, x):
    assert math.isclose(noise_sf(x, dof, n), sps.beta.sf(x / n, dof / 2, dof * (n - 1) / 2), rel_tol=1e-8)


@pytest.mark.parametrize(("alpha", "dof", "n"), [(0.001, 8, 64), (0.01, 1, 8), (0.05, 32, 640)])
def test_critical_value_inverts_the_tail(alpha, dof, n):
    expected = n * sps.beta.isf(alpha, dof / 2, dof * (n - 1) / 2)
    assert math.isclose(critical_value(alpha, dof, n), expected, rel_tol=1e-9)
    assert math.isclose(false_expansion_rate(expected, dof, n), alpha, rel_tol=1e-6)


def test_isotropic_noise_is_calibrated_and_centred():
    """Prediction 1-2: E R = 1 and P(p <= alpha) = alpha on zero-mean Gaussian gradients (exact)."""
    gen = torch.Generator().manual_seed(0)
    n, d, trials = 32, 12, 4000
    got = scores(lambda: torch.randn(n, d, generator=gen, dtype=torch.float64), trials, n)
    mean_r = sum(s.statistic for s in got) / trials
    assert abs(mean_r - 1) < 4 * math.sqrt(2 / d) / math.sqrt(trials), f"mean R {mean_r:.4f} on noise, expected 1"
    p = torch.tensor([s.p_value for s in got])
    for alpha in (0.01, 0.05, 0.2):
        hits = int((p <= alpha).sum())
        lo, hi = sps.binom.ppf(1e-4, trials, alpha), sps.binom.isf(1e-4, trials, alpha)
        assert lo <= hits <= hi, f"{hits}/{trials} p-values <= {alpha}: not calibrated"
    assert sps.kstest(p.numpy(), "uniform").pvalue > 1e-4, "p-values on noise are not uniform"


def test_effective_dimension_of_anisotropic_noise():
    """Prediction 3: nu estimates (tr C)^2 / tr C^2."""
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.1, 0.1], dtype=torch.float64)
    truth = float(scale.pow(2).sum() ** 2 / scale.pow(4).sum())
    got = [s.dof for s in scores(lambda: torch.randn(64, 8, generator=gen, dtype=torch.float64) * scale, 400, 64)]
    assert abs(sum(got) / len(got) - truth) < 0.1 * truth, f"nu {sum(got) / len(got):.2f} vs {truth:.2f}"


def test_a_mean_gradient_raises_r_by_n_minus_1_rho():
    """Prediction 4: E R = 1 + (N - 1) rho, rho = ||mu||^2 / E||g||^2."""
    gen = torch.Generator().manual_seed(2)
    n, d = 48, 10
    mu = torch.zeros(d, dtype=torch.float64)
    mu[0] = 0.5
    rho = float(mu.pow(2).sum() / (mu.pow(2).sum() + d))
    got = scores(lambda: mu + torch.randn(n, d, generator=gen, dtype=torch.float64), 2000, n)
    mean_r = sum(s.statistic for s in got) / len(got)
    assert abs(mean_r - (1 + (n - 1) * rho)) < 0.05 * (1 + (n - 1) * rho), f"mean R {mean_r:.3f}"


def test_degenerate_rows_never_fire():
    zero = signal_score(signal_row(torch.zeros(5, 3)), 5)
    one = signal_score(signal_row(torch.ones(1, 3)), 1)
    assert zero.p_value == 1.0 and one.p_value == 1.0 and math.isnan(zero.statistic)
    assert effective_dof(1.0, 1.0, 0.0, 0.0, 1.0, 7) == 7.0


def projectors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return A.T @ torch.linalg.pinv(A.T), B @ torch.linalg.pinv(B)


def test_complement_grads_match_explicit_projectors():
    """g_i = (I - P_B) s sum_t g_t ((I - P_A) K^T)^T x_t: the part of the new column no old entry can fit."""
    gen = torch.Generator().manual_seed(3)
    n, t, d_in, d_out, r = 5, 7, 9, 6, 2
    x, g = torch.randn(n, t, d_in, generator=gen).double(), torch.randn(n, t, d_out, generator=gen).double()
    A, B, K = (torch.randn(*s, generator=gen).double() for s in ((r, d_in), (d_out, r), (1, d_in)))
    dA, dB, dB_new = selora.core.fisher.per_sample_grads(x, x @ A.T, g, B, 0.7, K)
    PA, PB = projectors(A, B)
    eye_in, eye_out = torch.eye(d_in).double(), torch.eye(d_out).double()
    expected = 0.7 * torch.einsum("ntj,nti,ki->njk", g @ (eye_out - PB).T, x @ (eye_in - PA).T, K).reshape(n, -1)
    assert torch.allclose(complement_grads(dB, dB_new, A, B, K), expected, atol=1e-10)
    in_span = complement_grads(dB, selora.core.fisher.per_sample_grads(x, x @ A.T, g, B, 0.7, A[:1])[2], A, B, A[:1])
    assert in_span.abs().max() < 1e-10, "a candidate inside A's row space has no new direction"
    fresh = complement_grads(dB, dB_new, A, torch.zeros_like(B), K)
    assert torch.allclose(fresh, (dB_new - dB @ (K @ torch.linalg.pinv(A)).T).reshape(n, -1)), "B = 0 spans nothing"


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    layers = selora.inject(model, "all-linear", kind="selora", rank=2, generator=torch.Generator().manual_seed(seed))
    for layer in layers.values():
        nn.init.normal_(layer.lora_B, std=0.3)
    x, y = torch.randn(12, 4, 6), torch.randn(12, 4, 5)
    return model, x, y


def decide(model, x, y, candidates, reduce=None) -> list:
    ctl = ExpansionController(model, None, SignalTest(alpha=0.001), interval=1, max_rank=2, reduce=reduce)
    ctl._rearm(candidates)
    ((model(x) - y) ** 2).mean().backward()
    decisions = ctl.step()
    ctl.close()
    model.zero_grad(set_to_none=True)
    return decisions


def test_reduce_over_two_halves_equals_the_whole_batch():
    """DDP: each process sums its half; R is formed after the sum (||S||^2 is not additive) and
    equals the whole batch's."""
    model, x, y = model_and_data()
    K = {
        name: layer.draw_rows(1, torch.Generator().manual_seed(9))
        for name, layer in selora.core.layers.lora_layers(model).items()
    }
    whole = decide(model, x, y, K)
    seen = []
    decide(model, x[6:], y[6:], K, reduce=lambda t: seen.append(t.clone()) or t)
    halves = decide(model, x[:6], y[:6], K, reduce=lambda t: t + seen[0])
    alone = decide(model, x[:6], y[:6], K)
    for w, h, a in zip(whole, halves, alone):
        h, w, a = h.score, w.score, a.score
        assert math.isclose(h.signal.statistic, w.signal.statistic, rel_tol=1e-5)
        assert math.isclose(h.fisher.fi_orig, w.fisher.fi_orig, rel_tol=1e-5)
        # nu is estimated from pairs within each process: an unbiased estimate, not the whole batch's
        assert math.isclose(h.signal.p_value, noise_sf(h.signal.statistic, h.signal.dof, 12), rel_tol=1e-9)
        assert not math.isclose(a.signal.statistic, w.signal.statistic, rel_tol=1e-3), "half a batch: another R"


def test_signal_criterion_keeps_the_fisher_values_and_records_the_test():
    model, x, y = model_and_data(1)
    names = list(selora.core.layers.lora_layers(model))
    K = {n: selora.core.layers.lora_layers(model)[n].draw_rows(1, torch.Generator().manual_seed(4)) for n in names}
    signal = decide(model, x, y, K)
    fisher = ExpansionController(model, None, interval=1, max_rank=2)
    fisher._rearm(K)
    ((model(x) - y) ** 2).mean().backward()
    plain = fisher.step()
    for s, f in zip(signal, plain):
        assert s.score.fisher == f.score, "the signal test keeps the paper's FI values of the same capture"
        assert not hasattr(f.score, "signal"), "the paper's criterion produces no signal fields"
        test = s.score.signal
        assert test.statistic > 0 and 0 < test.p_value <= 1 and 1 <= test.dof <= 5


def test_window_captures_the_last_steps_with_one_candidate():
    model, x, y = model_and_data(2)
    opt = torch.optim.SGD(selora.trainable_parameters(model), lr=0.01)
    ctl = ExpansionController(model, opt, SignalTest(alpha=0.5, window=3), interval=5)
    armed, Ks = [], []
    for step in range(1, 11):
        armed.append(ctl.armed)
        Ks.append(None if not ctl.armed else ctl.captures["0"].K.clone())
        ((model(x[:4]) - y[:4]) ** 2).mean().backward()
        opt.step()
        ctl.step()
        opt.zero_grad()
        if step == 4:
            samples = float(ctl.captures["0"].stats[2])
    assert armed == [False, False, True, True, True] * 2, armed
    assert torch.equal(Ks[2], Ks[4]) and not torch.equal(Ks[4], Ks[7]), "one K per window"
    assert samples == 8.0, "two steps of the window should have added 2 x 4 samples"


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: "signal", TypeError, "criterion: expected a selora.core.criteria.Criterion"),
        (lambda: SignalTest(alpha=0.0), ValueError, "alpha"),
        (lambda: SignalTest(alpha=0.01, window=0), ValueError, "window"),
        (lambda: SignalTest(alpha=0.01, window=41), ValueError, "window: expected at most interval=40"),
    ],
)
def test_controller_rejects_bad_settings(make, error, message):
    layer = SeLoRALinear(nn.Linear(4, 3), rank=1)
    with pytest.raises(error, match=message):
        ExpansionController([layer], None, make())


def test_config_options():
    cfg = TrainConfig(criterion="signal", signal_alpha=0.01, signal_window=40)
    assert (cfg.criterion, cfg.signal_alpha, cfg.signal_window) == ("signal", 0.01, 40)
    assert TrainConfig(interval=2).criterion == "fi-ratio", "the paper's rule stays the default"
    with pytest.raises(ConfigError, match="criterion"):
        TrainConfig(criterion="magic")
    with pytest.raises(ConfigError, match="signal_window"):
        TrainConfig(criterion="signal", interval=5, signal_window=6)
    with pytest.raises(ConfigError, match="signal_alpha"):
        TrainConfig(criterion="signal", signal_alpha=1.0)


def test_the_paper_rule_ignores_the_signal_window():
    """The signal window applies to the signal criterion only: fi-ratio runs with interval < window still build."""
    from selora.methods.selora import SeLoRAAdapters

    for criterion, window in (("fi-ratio", 1), ("signal", 5)):
        model = nn.Sequential(nn.Linear(4, 3))
        cfg = TrainConfig(interval=5, criterion=criterion, signal_window=5 if criterion == "signal" else 10)
        adapters = SeLoRAAdapters.from_config(model, "all-linear", cfg, 10, torch.Generator().manual_seed(0))
        adapters.attach(torch.optim.SGD(selora.trainable_parameters(model), lr=0.1))
        expected = FIRatio(cfg.threshold) if criterion == "fi-ratio" else SignalTest(cfg.signal_alpha, window)
        assert adapters.controller.criterion == expected and adapters.controller.criterion.window == window
