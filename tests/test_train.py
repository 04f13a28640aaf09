"""The trainer on a tiny random-init SD pipeline (built from config, saved as a real diffusers
folder) and a small phantom Montgomery set: outputs, resume (bitwise), non-finite steps, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_models import RES
from helpers.tiny_runs import REPO, tiny_config, tiny_overrides, train_losses
from PIL import Image
from safetensors.torch import load_file

from selora.config import load_config
from selora.data.montgomery import scan, split_indices
from selora.rundir import read_records
from selora.train import main
from selora.trainer import Trainer

pytestmark = pytest.mark.usefixtures("assets_cache")


# ---------------------------------------------------------------------------------------------
def test_run_directory_contents_and_rank_growth(assets, tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = []

    def mean_gray(images, prompts, real):  # an evaluation metric plugged in like FID/CLIP will be
        value = float(np.mean([np.asarray(im.convert("L")) for im in images]))
        seen.append((len(images), list(prompts), tuple(real.shape), value))
        return value

    summary = Trainer(tiny_config(assets), run, progress=False, metrics={"mean_gray": mean_gray}).run()
    assert summary["status"] == "finished"
    records = read_records(run)
    train, evals, history = records["train"], records["eval"], records["ranks"]
    n_train = len(split_indices(scan(assets["data"]))["train"])
    assert len(train) == summary["step"] == 2 * (n_train // 4)
    assert [e["epoch"] for e in evals] == [1, 2] and all(e["eval_loss"] > 0 for e in evals)
    assert [e["mean_gray"] for e in evals] == [v for *_, v in seen]  # the hook's values are logged
    assert len(seen) == 2 and seen[0][0] == 2 and seen[0][2] == (2, 1, RES, RES) and seen[0][1] == seen[1][1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    k = len(train) // 4
    early, late = (sum(r["loss"] for r in part) / k for part in (train[:k], train[-k:]))
    assert late < 0.9 * early, f"training did not lower the loss ({early:.3f} -> {late:.3f})"
    # ranks grew from 1 on test steps only, and ranks.json matches the adapters' shapes
    assert set(history[0]["ranks"].values()) == {1}
    assert all(h["step"] % 3 == 0 for h in history[1:])
    final = json.loads((run / "ranks.json").read_text())
    assert final == history[-1]["ranks"] and max(final.values()) > 1
    assert any(k.startswith("text_encoder.") for k in final) and any(k.startswith("unet.") for k in final)
    assert not any(k.startswith("vae") for k in final)
    adapters = load_file(str(run / "adapters.safetensors"))
    assert {k: v.shape[0] for k, v in adapters.items() if k.endswith("lora_A")} == {
        f"{k}.lora_A": r for k, r in final.items()
    }
    assert train[-1]["total_rank"] == sum(final.values())
    # best checkpoint = lowest eval loss; sample grids and the config copy exist
    best = json.loads((run / "best" / "state.json").read_text())
    assert best["eval_loss"] == min(e["eval_loss"] for e in evals)
    assert (run / "samples" / "epoch-001.png").is_file() and (run / "samples" / "epoch-002.png").is_file()
    assert Image.open(run / "samples" / "real.png").size == Image.open(run / "samples" / "epoch-001.png").size
    assert load_config(run / "config.yaml").to_dict() == tiny_config(assets).to_dict()


def test_lora_method_keeps_its_rank(assets, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(assets, method="lora", lora_rank=3, epochs=1, num_samples=0), run, progress=False).run()
    assert set(json.loads((run / "ranks.json").read_text()).values()) == {3}
    assert len(read_records(run)["ranks"]) == 1


def test_resume_after_expansion_is_bitwise_identical(assets, tmp_path):
    """Stopping at step 5 (after the expansion at step 3, with K for step 6 already drawn) and
    resuming to step 10 gives the same adapters, ranks and losses as an uninterrupted run to step
    10, bit for bit (checkpoints at 4 and 8 are written on the way)."""
    cfg = tiny_config(assets, epochs=1, num_samples=0, checkpoint_every=4)
    full, split = tmp_path / "full", tmp_path / "split"
    Trainer(cfg, full, max_steps=10, progress=False).run()
    first = Trainer(cfg, split, max_steps=5, progress=False).run()
    assert first["status"] == "stopped at --max-steps" and first["step"] == 5
    history = read_records(split)["ranks"]
    assert any(h["expanded"] for h in history[1:]), "no expansion before the interruption"
    # a crash after the checkpoint leaves extra records; resume must drop them
    (split / "metrics.jsonl").write_text((split / "metrics.jsonl").read_text() + '{"kind": "train", "step": 99}\n')
    Trainer(load_config(split / "config.yaml"), split, resume=True, max_steps=10, progress=False).run()
    assert train_losses(split) == train_losses(full) and len(train_losses(full)) == 10
    assert read_records(split)["ranks"] == read_records(full)["ranks"]
    a, b = (load_file(str(r / "checkpoints" / "last" / "adapters.safetensors")) for r in (full, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((r / "checkpoints" / "last" / "ranks.json").read_text()) for r in (full, split))
    assert ra == rb and max(ra.values()) == 4  # grown at steps 3, 6 and 9
    sa, sb = (load_file(str(r / "checkpoints" / "last" / "state.safetensors")) for r in (full, split))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # Adam moments, RNG, K


def poisoned(trainer: Trainer, batches: set[int]) -> Trainer:
    """``trainer`` with a test callback on its training step: the loss of these batches (1-based
    count of batches drawn, skipped ones included) is NaN."""

    def nan_loss(step) -> None:
        if trainer.state.attempt in batches:
            step.loss = step.loss * float("nan")

    trainer.step_fn.add_callback("on_loss", nan_loss)
    return trainer


def test_non_finite_loss_is_skipped_then_stops(assets, tmp_path):
    run = tmp_path / "run"
    # one NaN batch: a warning, the step is skipped, training goes on
    cfg = tiny_config(assets, epochs=1, num_samples=0)
    with pytest.warns(RuntimeWarning, match="batch 2: non-finite loss"):
        poisoned(Trainer(cfg, run, max_steps=3, progress=False), {2}).run()
    records = read_records(run)["train"]
    assert records[1]["skipped"] == "non-finite loss" and records[1]["loss"] is None
    assert records[2]["step"] == 2 and records[2]["batch"] == 3
    # three in a row: stop with a clear error, the checkpoint of step 4 stays as it was
    run2 = tmp_path / "run2"
    cfg = tiny_config(assets, epochs=1, num_samples=0, checkpoint_every=4, max_bad_steps=3)
    with pytest.warns(RuntimeWarning):
        with pytest.raises(RuntimeError, match=r"non-finite loss in 3 consecutive steps \(batches 6-8\)"):
            poisoned(Trainer(cfg, run2, progress=False), {6, 7, 8}).run()
    state = json.loads((run2 / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == 4 and state["bad"] == 0
    saved = load_file(str(run2 / "checkpoints" / "last" / "adapters.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
    # and the intact checkpoint resumes (without the callback)
    summary = Trainer(load_config(run2 / "config.yaml"), run2, resume=True, max_steps=6, progress=False).run()
    assert summary["step"] == 6


def test_a_run_folder_of_an_earlier_version_resumes(assets, tmp_path):
    """Run folders hold ``debug_nan_steps: []`` in config.yaml from when it was a key; they still load."""
    run = tmp_path / "run"
    Trainer(tiny_config(assets, epochs=1, num_samples=0), run, max_steps=2, progress=False).run()
    with open(run / "config.yaml", "a", encoding="utf-8") as fh:
        fh.write("debug_nan_steps: []\n")
    assert Trainer(load_config(run / "config.yaml"), run, resume=True, max_steps=3, progress=False).run()["step"] == 3


def test_gradient_checkpointing_gives_the_same_run(assets, tmp_path):
    """Recomputed activations leave the per-sample Fisher capture (and so the ranks) unchanged."""
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    Trainer(tiny_config(assets, threshold=1.1), plain, max_steps=6, progress=False).run()
    Trainer(tiny_config(assets, threshold=1.1, gradient_checkpointing=True), ckpt, max_steps=6, progress=False).run()
    h1, h2 = read_records(plain)["ranks"], read_records(ckpt)["ranks"]
    assert len(h1) == 3
    assert [h["ranks"] for h in h1] == [h["ranks"] for h in h2]
    for a, b in zip(h1[1:], h2[1:]):
        assert a["ratios"].keys() == b["ratios"].keys()
        assert all(abs(a["ratios"][k] - b["ratios"][k]) <= 1e-4 * abs(a["ratios"][k]) for k in a["ratios"])


# -- command line --------------------------------------------------------------------------------
def run_cli(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SELORA_CACHE": str(cache), "SELORA_PROFILE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "selora.train", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "bogus=1"], "unknown key 'bogus'"),
        (["--set", "interval=ten"], "key 'interval': expected int, got str 'ten'"),
        (["--set", "data_root=does/not/exist"], "key 'data_root': no such folder"),
        (["--set", "method=dora"], "key 'method': expected one of selora, lora"),
        (["--max-steps", "0"], "--max-steps 0: expected an integer >= 1"),
    ],
)
def test_bad_input_exits_2_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["--config", "montgomery-offline", "--out", str(out), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()


def test_cli_trains_stops_and_resumes(assets, tmp_path, capsys):
    out = tmp_path / "run"
    sets = [a for item in tiny_overrides(assets, epochs=1, batch_size=16, num_samples=0) for a in ("--set", item)]
    proc = run_cli(
        ["--config", "montgomery-offline", "--out", str(out), *sets, "--max-steps", "2", "--no-progress"],
        assets["cache"],
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 2
    assert main(["--config", "montgomery-offline", "--out", str(out)]) == 2
    assert "use --resume" in capsys.readouterr().err
    assert main(["--resume", str(out), "--set", "lr=0.5"]) == 2
    assert "cannot change when resuming" in capsys.readouterr().err
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "finished"
    assert (out / "adapters.safetensors").is_file()


# -- the paper's baselines through the same trainer ----------------------------------------------
def adapter_numel(run: Path, name: str) -> int:
    return sum(t.numel() for t in load_file(str(run / name)).values())


def test_dylora_draws_one_truncation_per_step_and_evaluates_at_full_rank(assets, tmp_path, monkeypatch):
    import selora.methods.dylora as dylora
    from selora.methods.dylora import dylora_layers

    drawn, real_draw = [], dylora.sample_truncation

    def observed(model, generator=None):  # the real draw, recorded
        b = real_draw(model, generator)
        drawn.append(b)
        return b

    monkeypatch.setattr(dylora, "sample_truncation", observed)
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(assets, method="dylora", epochs=1, num_samples=0), run, progress=False)
    summary = trainer.run()
    assert len(drawn) == summary["step"] and set(drawn) == {1, 2, 3, 4}, drawn
    layers = dylora_layers(trainer.model)
    assert layers and all(m.truncation == m.rank == 4 for m in layers.values()), "evaluated below full rank"
    assert set(json.loads((run / "ranks.json").read_text()).values()) == {4}
    record = read_records(run)["eval"][-1]
    assert record["trainable"] == adapter_numel(run, "adapters.safetensors") == summary["trainable"]
    assert 0 < record["trainable_fraction"] == record["trainable"] / record["base"] < 0.05


def test_adalora_adds_its_regulariser_and_prunes_to_the_target_budget(assets, tmp_path):
    from selora.methods import orthogonal_regulariser

    run, cfg = tmp_path / "run", tiny_config(assets, method="adalora", epochs=1, num_samples=0)
    initial = 0.5 * orthogonal_regulariser(Trainer(cfg, tmp_path / "fresh", progress=False).model).item()
    summary = Trainer(cfg, run, progress=False).run()
    records = read_records(run)
    train, history = records["train"], records["ranks"]
    assert train[0]["reg"] == pytest.approx(initial, rel=1e-6), "step 1 did not use 0.5 R(A, B) of the initial adapters"
    assert train[-1]["reg"] < 0.5 * train[0]["reg"], "the orthogonality regulariser was not minimised with the loss"
    n = len(history[0]["ranks"])
    assert set(history[0]["ranks"].values()) == {6} and n > 10
    totals = [sum(h["ranks"].values()) for h in history]
    assert totals == sorted(totals, reverse=True) and totals[-1] == 4 * n  # budget 6 -> 4 per layer on average
    assert any(h["pruned"] for h in history[1:])
    final = json.loads((run / "ranks.json").read_text())
    assert final == history[-1]["ranks"] and summary["total_rank"] == 4 * n
    saved = load_file(str(run / "adapters.safetensors"))
    live = {k[: -len(".lora_E")]: int((v != 0).sum()) for k, v in saved.items() if k.endswith(".lora_E")}
    assert live == final, "the saved E does not carry the pruning"
    assert summary["trainable"] == adapter_numel(run, "adapters.safetensors")  # A, B and E at the initial rank 6
    check_adalora_loads_back_unmerged_and_merged(run)


@pytest.mark.parametrize("method, stop, total", [("dylora", 5, 9), ("adalora", 16, 22)])
def test_baseline_resume_is_bitwise_identical(assets, tmp_path, method, stop, total):
    """DyLoRA's truncation draws and AdaLoRA's allocator statistics and rank pattern survive a
    checkpoint: an interrupted run resumed to the end equals an uninterrupted one. (AdaLoRA with
    27 steps: pruning from step 3 to 21, final budget after; stopped inside the pruning phase.)"""
    cfg = tiny_config(assets, method=method, epochs=1, num_samples=0)
    full, split = tmp_path / "full", tmp_path / "split"
    Trainer(cfg, full, max_steps=total, progress=False).run()
    Trainer(cfg, split, max_steps=stop, progress=False).run()
    Trainer(load_config(split / "config.yaml"), split, resume=True, max_steps=total, progress=False).run()
    assert train_losses(split) == train_losses(full) and len(train_losses(full)) == total
    assert read_records(split)["ranks"] == read_records(full)["ranks"]
    a, b = (load_file(str(r / "checkpoints" / "last" / "adapters.safetensors")) for r in (full, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (load_file(str(r / "checkpoints" / "last" / "state.safetensors")) for r in (full, split))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if method == "adalora":
        assert any(k.startswith("method.allocator.exp_avg_ipt.") for k in sa)
        assert len(read_records(full)["ranks"]) > 1, "no pruning in the compared stretch"
        state = json.loads((split / "checkpoints" / "last" / "state.json").read_text())
        assert state["method"]["rank_pattern"], "rank pattern not checkpointed"


def check_adalora_loads_back_unmerged_and_merged(run: Path) -> None:
    """A finished AdaLoRA run loads into a fresh pipeline, and merging it changes no output."""
    from selora.rundir import load_run

    outputs = []
    for merged in (False, True):
        cfg, pipe = load_run(run, merged=merged, device=torch.device("cpu"))
        ids = pipe.tokenizer(["a chest x-ray"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        x = torch.randn(1, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outputs.append(pipe.unet(x, torch.tensor([500]), pipe.text_encoder(ids)[0]).sample)
        E = [p for n, p in pipe.unet.named_parameters() if "lora_E" in n]
        if not merged:  # the loaded adapters are the trained ones, not the initial zeros of E
            assert E and any(bool((p != 0).any()) for p in E)
        else:
            assert not E and not any("lora" in n for n, _ in pipe.unet.named_modules()), "AdaLoRA layers left"
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5), (outputs[0] - outputs[1]).abs().max()


def test_adalora_target_rank_above_its_initial_rank_is_rejected(assets, tmp_path, capsys):
    sets = [a for item in tiny_overrides(assets, method="adalora", lora_rank=8) for a in ("--set", item)]
    assert main(["--config", "montgomery-offline", "--out", str(tmp_path / "run"), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "key 'lora_rank': AdaLoRA prunes from rank 6" in err[0], err


def test_choosing_the_epoch_on_a_validation_split_logs_the_test_loss_too(assets, tmp_path):
    """With eval_split=validation every evaluation records the validation loss (which picks the best
    epoch) and the test loss, so what choosing on the test split would gain can be measured."""
    run = tmp_path / "run"
    cfg = tiny_config(assets, eval_split="validation", validation_fraction=0.25, num_samples=0)
    Trainer(cfg, run, progress=False).run()
    evals = read_records(run)["eval"]
    assert evals and all(e["eval_loss"] > 0 and e["test_loss"] > 0 for e in evals)
    assert all(e["eval_loss"] != e["test_loss"] for e in evals), "the two splits' losses are not distinct"
    plain = tmp_path / "plain"
    Trainer(tiny_config(assets, num_samples=0, epochs=1), plain, progress=False).run()
    assert all("test_loss" not in e for e in read_records(plain)["eval"]), "choosing on test logs it once"
