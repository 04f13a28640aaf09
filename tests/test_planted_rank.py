"""Planted-rank recovery: SeLoRA from rank 1 (lambda = 1.1, t = 40) finds the rank each layer needs.

Independent frozen linear maps 64 -> 8; each target adds a planted delta of rank p (p = 1, 2, 4, 6)
with the same Frobenius norm. A layer expands while the Fisher ratio sees signal for a new direction
and stops once its delta is fitted.

Why this geometry: with B_new = 0 the ratio is roughly 1 + ||K||^2 / (||A||_F^2 + (in/out) rho ||B||_F^2),
rho the share of the residual gradient inside range(B). While a layer misses directions its residual
lies outside range(B) (measured rho ~ 0.03-0.4, ratio ~ 1 + ||K||^2/||A||_F^2 >= 1.1); once fitted, what
is left of it lies mostly inside range(B) (measured rho ~ 0.6-1.0) and the in/out-weighted dA term
pushes the ratio below 1.1. With square layers (in = out) that term is too weak and the ranks follow
||A||_F rather than the planted rank (all layers grew towards full rank in a 16 -> 16 version).
"""

import pytest
import scipy.stats
import torch
from torch import nn

import selora
from selora.book import toy
from selora.core.criteria import FIRatio

PLANTED = (1, 2, 4, 6)
D_IN, D_OUT, NORM, STEPS = 64, 8, 4.0, 1000


class Independent(nn.Module):
    def __init__(self, bases: list[nn.Linear]) -> None:
        super().__init__()
        self.maps = nn.ModuleList(bases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, in) -> (N, L, out)
        return torch.stack([m(x[:, i]) for i, m in enumerate(self.maps)], 1)


def train(kind: str, seed: int = 0) -> tuple[list[int], float]:
    g = torch.Generator().manual_seed(seed)
    bases, targets = [], []
    for p in PLANTED:
        base = nn.Linear(D_IN, D_OUT, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.randn(D_OUT, D_IN, generator=g) / D_IN**0.5)
        U = torch.linalg.qr(torch.randn(D_OUT, p, generator=g))[0]
        V = torch.linalg.qr(torch.randn(D_IN, p, generator=g))[0]
        targets.append(base.weight + NORM / p**0.5 * U @ V.T)  # planted rank-p delta, ||delta||_F = NORM
        bases.append(base)
    W = torch.stack(targets)  # (L, out, in)
    model = Independent(bases)
    selora.inject(model, "all-linear", kind=kind, rank=1, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(selora.trainable_parameters(model), lr=1e-2)
    ctl = selora.ExpansionController(model, opt, FIRatio(1.1), interval=40, generator=g) if kind == "selora" else None
    tail = []
    for step in range(STEPS):
        x = torch.randn(64, len(PLANTED), D_IN, generator=g)
        loss = ((model(x) - torch.einsum("nli,loi->nlo", x, W)) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
        if ctl is not None:
            ctl.step()
        opt.zero_grad()
        if step >= STEPS - 50:
            tail.append(loss.item())
    return list(selora.ranks(model).values()), sum(tail) / len(tail)


def test_planted_ranks_are_recovered():
    ranks, loss = train("selora")
    _, lora_loss = train("lora")
    assert all(b > a for a, b in zip(ranks, ranks[1:])), f"ranks {ranks} do not grow with planted {PLANTED}"
    assert all(abs(r - p) <= 1 for r, p in zip(ranks, PLANTED)), f"ranks {ranks} vs planted {PLANTED}"
    assert lora_loss > 1.0  # rank-1 LoRA cannot fit deltas of rank > 1
    assert loss < 0.1 * lora_loss, f"SeLoRA loss {loss:.4g} vs fixed rank-1 LoRA {lora_loss:.4g}"


# -- the signal test (selora.core.signal, book chapter 9) ---------------------------------------------
#: Chapter 4's toy (independent layers from rank 1, Adam, batches of 64, t = 40), with target noise
#: sigma = 0.1 and a training set large enough that the noise is noise in-sample too.
SIGNAL = dict(criterion="signal", alpha=0.001, window=10)
TOY = dict(noise=0.1, n=16384, steps=1000)
GEOMETRIES = {
    "square": dict(width=32, planted=[1, 2, 4, 8]),
    "wide-to-narrow": dict(width=64, out_width=8, planted=[1, 2, 4, 6]),
}
SEEDS = range(20)


def recovered(geometry: dict, seed: int, **kwargs) -> bool:
    """Whether every final rank is within one of its planted rank."""
    planted = geometry["planted"]
    run = toy.planted_run(planted, seed=seed, **{k: v for k, v in geometry.items() if k != "planted"}, **TOY, **kwargs)
    return all(abs(r[-1] - p) <= 1 for r, p in zip(run.ranks.values(), planted))


@pytest.mark.slow
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_signal_test_recovers_planted_ranks_where_the_paper_rule_does_not(geometry):
    signal = sum(recovered(GEOMETRIES[geometry], s, **SIGNAL) for s in SEEDS)
    paper = sum(recovered(GEOMETRIES[geometry], s) for s in SEEDS)
    assert signal >= 0.9 * len(SEEDS), f"{geometry}: signal test within +-1 on {signal}/{len(SEEDS)} seeds"
    assert paper < 0.9 * len(SEEDS), f"{geometry}: the paper's rule recovered {paper}/{len(SEEDS)} seeds"


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_a_pure_noise_layer_expands_no_more_often_than_alpha(alpha):
    """20 tests per run (800 steps, t = 40) x 20 seeds: expansions at most the upper 0.1 % of Binomial(400, alpha)."""
    expansions = 0
    for seed in SEEDS:
        run = toy.planted_run(
            [0], width=16, noise=0.1, n=16384, steps=800, seed=seed, criterion="signal", alpha=alpha, window=10
        )
        expansions += run.ranks["layer0"][-1] - 1
    tests = 800 // 40 * len(SEEDS)
    bound = scipy.stats.binom.isf(1e-3, tests, alpha)
    assert expansions <= bound, (
        f"{expansions} expansions in {tests} tests of pure noise at alpha = {alpha} (bound {bound:.0f})"
    )
    paper = toy.planted_run([0], width=16, noise=0.1, n=16384, steps=800, seed=0)
    assert paper.ranks["layer0"][-1] == 16, "the paper's rule should grow the noise layer to its cap"
