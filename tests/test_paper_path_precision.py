"""Mixed precision on the paper path, exercised on the CPU (torch allows fp16/bf16 autocast and a
GradScaler there, even though the Trainer itself refuses mixed precision on the CPU):

- item 2: under half-precision frozen weights every trainable parameter of every method is float32
  (AdaLoRA's live in PEFT ParameterDicts), so ``GradScaler.unscale_`` accepts their gradients;
- item 5: a step skipped between the arming and the expansion test (non-finite gradient, fp16
  overflow) leaves no stale Fisher statistic, and the statistics are divided by the loss scale.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_models import RES
from helpers.tiny_runs import tiny_config
from torch import nn

from selora.methods import METHODS
from selora.models import load_pipeline
from selora.pipeline import add_adapters
from selora.rundir import read_records
from selora.trainer import Trainer

pytestmark = pytest.mark.usefixtures("assets_cache")


# -- item 2: float32 adapters under half-precision weights ----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", list(METHODS))
def test_half_precision_pipeline_trains_float32_adapters(assets, dtype, method):
    cfg = tiny_config(assets, method=method)
    pipe = load_pipeline(str(assets["model"]), dtype, "cpu")
    model = add_adapters(pipe, cfg, total_steps=10)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {n for n, p in trainable.items() if p.dtype != torch.float32} == set()
    assert any(p.dtype == dtype for p in model.parameters() if not p.requires_grad), "base weights not half"
    if method == "adalora":
        assert any("lora_E" in n for n in trainable)
    # one scaled backward under autocast, then the unscale a GradScaler does before clipping
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, RES // 2, RES // 2, generator=g).to(dtype)
    ids = pipe.tokenizer(["a chest x-ray"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.autocast("cpu", dtype=dtype):
        pred = model(noisy, torch.tensor([10, 500]), ids)
    loss = F.mse_loss(pred.float(), torch.randn(pred.shape, generator=g)) + model.adapters.regulariser().float()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # "Attempting to unscale FP16 gradients" if any adapter stayed half
    grads = [p.grad for p in trainable.values() if p.grad is not None]
    assert grads and all(gr.dtype == torch.float32 for gr in grads)


# -- item 5: skipped steps and the loss scale in the Fisher statistics ----------------------------
class InfGrad(torch.autograd.Function):
    """Identity forward, an all-inf gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


class Poisoned(nn.Module):
    """The trainer's forward module with an on/off switch for :class:`InfGrad` on its output."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.on = inner, False

    def forward(self, *args):
        out = self.inner(*args)
        return InfGrad.apply(out) if self.on else out


def spied_trainer(cfg, run, scale: float | None) -> tuple[Trainer, list]:
    """A trainer (GradScaler with ``scale`` on the CPU, or none) whose controller decisions are recorded."""
    trainer = Trainer(cfg, run, progress=False)
    if scale is not None:  # what mixed_precision="fp16" sets up on a GPU; fp32 weights here
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
        trainer.step_fn.scaler = trainer.parts.scaler = scaler
    decisions, ctl = [], trainer.adapters.controller
    real_step = ctl.step

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        decisions.append(out)
        return out

    ctl.step = step
    trainer.step_fn.forward = Poisoned(trainer.model)
    return trainer, decisions


def batches(n: int, size: int = 4) -> list[torch.Tensor]:
    return [torch.arange(i * size, (i + 1) * size) for i in range(n)]


def as_numbers(decisions: list) -> list:
    """The decisions as comparable tuples (nan as a string, so that nan == nan)."""

    def num(x: float) -> float | str:
        return "nan" if math.isnan(x) else x

    return [
        [(d.name, d.rank_before, num(d.score.fi_orig), num(d.score.fi_exp), num(d.score.ratio), d.expanded) for d in ds]
        for ds in decisions
    ]


@pytest.mark.parametrize("scale", [None, 2.0**10], ids=["no-scaler", "grad-scaler"])
def test_skipped_step_before_the_test_leaves_no_stale_statistic(assets, tmp_path, scale):
    """Steps 1-2, then (armed for the test at step 3) a batch whose gradient is non-finite, then
    batch 3: the decisions equal those of a run that never saw the bad batch (the bad batch's
    noise draws are put back so both runs see the same batch 3)."""
    cfg = tiny_config(assets, epochs=1, num_samples=0, interval=3)
    clean, clean_dec = spied_trainer(cfg, tmp_path / "clean", scale)
    bad, bad_dec = spied_trainer(cfg, tmp_path / "bad", scale)
    idx = batches(4)
    for trainer in (clean, bad):
        assert trainer.train_step(idx[0]) is not None and trainer.train_step(idx[1]) is not None
    assert bad.adapters.controller.armed
    state = bad.parts.generator.get_state()
    bad.step_fn.forward.on = True
    if scale is None:
        with pytest.warns(RuntimeWarning, match="non-finite gradient"):
            assert bad.train_step(idx[3]) is None
    else:  # GradScaler: an "overflow"; it skips the step itself and halves the scale
        assert bad.train_step(idx[3]) is None
        assert bad.step_fn.scaler.get_scale() == scale / 2
    bad.step_fn.forward.on = False
    bad.parts.generator.set_state(state)
    assert bad.adapters.controller.armed, "the test step must still come"
    assert bad.train_step(idx[2]) is not None and clean.train_step(idx[2]) is not None
    assert len(clean_dec) == len(bad_dec) == 3 and clean_dec[2], "no expansion test at step 3"
    assert as_numbers(bad_dec) == as_numbers(clean_dec)
    assert read_records(bad.run_dir)["ranks"] == read_records(clean.run_dir)["ranks"]
    a, b = (dict(t.model.named_parameters()) for t in (clean, bad))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_scale_is_divided_out_of_the_statistics(assets, tmp_path):
    """A GradScaler-scaled backward (loss * 2^10) gives the FI values and ratios of the unscaled one."""
    cfg = tiny_config(assets, epochs=1, num_samples=0, interval=2)
    plain, plain_dec = spied_trainer(cfg, tmp_path / "plain", None)
    scaled, scaled_dec = spied_trainer(cfg, tmp_path / "scaled", 2.0**10)
    for i in batches(4):
        plain.train_step(i)
        scaled.train_step(i)
    tests = [ds for ds in plain_dec if ds]
    assert len(tests) == 2 and all(d.score.fi_orig > 0 for d in tests[0])
    assert as_numbers(scaled_dec) == as_numbers(plain_dec)  # powers of two: exact
