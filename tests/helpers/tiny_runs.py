"""Fast training runs on the ``assets`` fixture (tiny pipeline, phantom Montgomery set): their config
overrides, and the checks that two processes train like one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from selora.config import TrainConfig, load_config
from selora.rundir import read_records
from selora.trainer import Trainer

from .tiny_models import RES

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(assets: dict[str, Path], **extra) -> list[str]:
    """--set items for a fast run: tiny model, small phantom set, 16 px, batch 4, test every 3 steps."""
    values = {
        "model": str(assets["model"]),
        "dataset": "montgomery-phantom",
        "data_root": str(assets["data"]),
        "resolution": RES,
        "batch_size": 4,
        "epochs": 2,
        "interval": 3,
        "threshold": 1.0001,
        "lr": 1e-2,
        "num_samples": 2,
        "sample_steps": 2,
        "eval_every": 1,
        "prompt_dropout": 0.2,
        "max_grad_norm": 1.0,
    }
    values.update(extra)
    return [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]


def tiny_config(assets: dict[str, Path], **extra) -> TrainConfig:
    """The ``montgomery-offline`` config with :func:`tiny_overrides`."""
    return load_config("montgomery-offline", tiny_overrides(assets, **extra))


def train_losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training record in the run folder ``run``."""
    return [(r["step"], r["loss"]) for r in read_records(run)["train"]]


def ddp_overrides(paths: dict[str, Path]) -> list[str]:
    """Global batch 16 -> 6 steps per epoch; tests for expansion at steps 2, 4, 6; evaluation at the end.
    ``paths``: the ``assets`` fixture."""
    return tiny_overrides(paths, batch_size=16, epochs=1, interval=2, threshold=1.3, num_samples=2)


def one_process_run(paths: dict[str, Path]) -> Path:
    """The one-process run with :func:`ddp_overrides`, trained once per session (both launcher tests use it)."""
    run = paths["model"].parent / "ddp-one-process"
    if not (run / "ranks.json").is_file():  # written by Trainer._finish
        Trainer(load_config("montgomery-offline", ddp_overrides(paths)), run, progress=False).run()
    return run


def check_two_processes(paths: dict[str, Path], ddp: Path) -> None:
    """``ddp`` (a run folder with each process's ``rank<r>.json`` / ``rank<r>.safetensors``) was trained
    by two processes of one thread each, identically on both, and matches the one-process run.
    ``paths``: the ``assets`` fixture."""
    overrides = ddp_overrides(paths)
    info = [json.loads((ddp / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in info] == [2, 2] and [i["threads"] for i in info] == [1, 1]
    # identical across processes: ranks exactly, adapters bit for bit (DDP averages the gradients)
    assert info[0]["ranks"] == info[1]["ranks"]
    a0, a1 = (load_file(str(ddp / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(a0[k], a1[k]) for k in a0)
    grown = [n for n, r in info[0]["ranks"].items() if r > 1]
    assert grown and len(grown) < len(info[0]["ranks"]), "threshold should grow some layers, not all"

    # one process, same global batch
    single = one_process_run(paths)
    assert json.loads((single / "ranks.json").read_text()) == info[0]["ranks"]
    ref = load_file(str(single / "adapters.safetensors"))
    assert ref.keys() == a0.keys()
    # summation order differs (gradients averaged over two half batches), and Adam divides by sqrt(v):
    # an entry whose gradient is ~0 can move by a visible fraction of lr, so compare at 1 % of lr
    lr = load_config("montgomery-offline", overrides).lr
    for k in ref:
        assert torch.allclose(ref[k], a0[k], rtol=1e-4, atol=0.01 * lr), f"{k}: DDP and single-process adapters differ"
    assert sum(not torch.allclose(ref[k], a0[k], rtol=1e-4, atol=1e-5) for k in ref) <= 2
    losses = [[r["loss"] for r in read_records(d)["train"]] for d in (single, ddp)]
    assert len(losses[0]) == len(losses[1]) == 6
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(*losses))
    evals = [[r["eval_loss"] for r in read_records(d)["eval"]] for d in (single, ddp)]
    assert len(evals[1]) == 1 and abs(evals[0][0] - evals[1][0]) <= 1e-5 * evals[0][0]
    hist = [[h["ranks"] for h in read_records(d)["ranks"]] for d in (single, ddp)]
    assert hist[0] == hist[1] and len(hist[0]) == 4
    assert (ddp / "samples" / "epoch-001.png").is_file()
