"""selora.results: publishing an experiment's light files and loading them back; the committed table reproduces."""

from __future__ import annotations

import json
import math
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from selora import layout, rerun, results
from selora.config import RETIRED_KEYS


def _fake_experiment(root, with_ranks=True):
    """An experiment folder shaped like python -m selora.evaluate's output (two runs, heavy files too)."""
    runs = []
    for method, seed in (("selora", 0), ("lora", 0)):
        run_dir = root / "runs" / f"{method}-seed{seed}"
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "adapters.safetensors").write_bytes(b"heavy")  # must not be published
        history = [
            {"step": 0, "ranks": {"unet.a": 1, "unet.b": 1}},
            {"step": 10, "ranks": {"unet.a": 2, "unet.b": 1}},
            {"step": 20, "ranks": {"unet.a": 3, "unet.b": 2 + seed}},
        ]
        (run_dir / "rank_history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        if method == "selora":  # a run that logged evaluations (with the test loss: chosen on validation)
            log = [
                {"kind": "train", "step": 5, "loss": 0.3},
                {"kind": "eval", "step": 10, "epoch": 1, "eval_loss": 0.2, "test_loss": 0.25, "samples": "x.png"},
            ]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        pixels = torch.full((3, 1, 4, 4), 10 * (seed + len(method)), dtype=torch.uint8)
        save_file({"images": pixels}, str(run_dir / layout.TEST_SAMPLES))
        record = {"method": method, "seed": seed, "run_dir": f"runs/{run_dir.name}", "metrics": {"fid_proxy": 1.0}}
        if with_ranks:
            record["ranks"] = {"unet.a": 2 if method == "selora" else 4}
        runs.append(record)
    (root / "results.json").write_text(json.dumps({"provenance": {"profile": "offline"}, "summary": {}, "runs": runs}))
    (root / "results.md").write_text("# table\n")
    return root


def test_publish_copies_only_results_and_samples_and_load_reads_them(tmp_path):
    src = _fake_experiment(tmp_path / "exp")
    dest = results.publish(src, "demo", tmp_path / "published")
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == [
        "results.json",
        "results.md",
        "runs/lora-seed0/test-samples.safetensors",
        "runs/lora-seed0/total-rank.json",
        "runs/selora-seed0/eval-curve.json",
        "runs/selora-seed0/test-samples.safetensors",
        "runs/selora-seed0/total-rank.json",
    ]
    exp = results.load(dest)
    assert exp.run("lora", 0)["ranks"] == {"unet.a": 4}
    assert exp.final_ranks("selora") == {0: {"unet.a": 2}}
    images = exp.samples("selora", 0)
    assert images.shape == (3, 1, 4, 4) and images.dtype == torch.float32
    assert torch.allclose(images, torch.full_like(images, 60 / 127.5 - 1))
    assert exp.total_rank_history("selora", 0) == ([0, 10, 20], [2, 3, 5])
    assert exp.eval_curve("selora", 0) == [{"step": 10, "epoch": 1, "eval_loss": 0.2, "test_loss": 0.25}]
    with pytest.raises(FileNotFoundError, match="eval-curve.json: missing"):
        exp.eval_curve("lora", 0)
    with pytest.raises(KeyError, match="no run \\('dylora', 0\\)"):
        exp.run("dylora", 0)


def test_per_seed_reads_metrics_and_run_numbers_in_seed_order(tmp_path):
    root = _fake_experiment(tmp_path / "exp")
    data = json.loads((root / "results.json").read_text())
    extra = dict(data["runs"][0], seed=2, metrics={"fid_proxy": 3.5}, total_rank=7)
    data["runs"] = [extra] + [dict(r, total_rank=5) for r in data["runs"]]  # seed 2 listed first
    (root / "results.json").write_text(json.dumps(data))
    exp = results.load(root)
    assert exp.per_seed("selora", "fid_proxy") == {0: 1.0, 2: 3.5}
    assert list(exp.per_seed("selora", "total_rank").items()) == [(0, 5), (2, 7)]
    assert exp.per_seed("lora", "fid_proxy") == {0: 1.0}
    with pytest.raises(KeyError, match="no runs of 'dylora'; have \\['lora', 'selora'\\]"):
        exp.per_seed("dylora", "fid_proxy")
    with pytest.raises(KeyError, match="'clip' is neither a metric \\['fid_proxy'\\]"):
        exp.per_seed("selora", "clip")


def test_publish_replaces_a_previous_version_whole(tmp_path):
    src = _fake_experiment(tmp_path / "exp")
    dest = results.publish(src, "demo", tmp_path / "published")
    (dest / "stale.txt").write_text("old")
    results.publish(src, "demo", tmp_path / "published")
    assert not (dest / "stale.txt").exists()
    assert not [p for p in (tmp_path / "published").iterdir() if p.name != "demo"], "no temporary folder left"


def test_publish_and_load_reject_bad_input_clearly(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        results.load(tmp_path)
    src = _fake_experiment(tmp_path / "exp", with_ranks=False)
    with pytest.raises(ValueError, match="no per-layer ranks"):
        results.publish(src, "demo", tmp_path / "published")
    assert not (tmp_path / "published" / "demo").exists(), "nothing half-written"
    src = _fake_experiment(tmp_path / "exp2")
    (src / "runs" / "lora-seed0" / "rank_history.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="rank_history.jsonl: missing"):
        results.publish(src, "demo", tmp_path / "published")
    assert not (tmp_path / "published" / "demo").exists(), "nothing half-written"
    assert results.main(["publish", str(tmp_path / "nowhere"), "x", "--dest", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


#: The re-run checks' tolerances, one per quantity of :func:`selora.rerun.gaps` (metric gaps: the Fréchet
#: proxy relative, the alignment proxy absolute; ``eval_loss``: the largest relative gap over the held-out loss
#: curve; ``images``: mean |difference| of the test images in grey levels), and where they come from.
#: ``scripts/kernel_spread.py`` re-ran Table 1's LoRA seed 0 with the documented commands under every kernel
#: set one AVX-512 Xeon can select (native AVX-512 with FP16/BF16 kernels; AVX2 only; SSE4.1 level: no AVX or
#: FMA in torch, oneDNN, MKL or numpy) and recorded each gap to the published run in
#: tests/data/kernel-spread.json. Its native run reproduces, to the last digit, the 1.3 % Fréchet gap first
#: reported from an AVX-512 + AMX Xeon (fid_proxy 278.77 vs 282.51), so that report is one of the recorded
#: gaps. 780 optimizer steps and a 20-step sampling chain amplify last-bit differences: the held-out loss gap
#: grows from ~1e-8 at the first evaluation to up to 3e-4 at the last, the samples move by 1.4-3.5 grey
#: levels on average (up to ~50 in a few pixels), the Fréchet proxy by 1.2-3.2 % and the alignment proxy by
#: 0.4-3.4 (a score whose seeds lie -7..+4 apart: too chaotic to pin tighter). Every tolerance is at least
#: SPREAD_FACTOR x the largest recorded gap (test_rerun_tolerances_cover_the_measured_kernel_spread). A run of
#: another seed still fails: its held-out loss curve and its images lie >200x and >4x beyond their tolerances
#: (test_rerun_tolerances_tell_seeds_apart); the metrics' tolerances are honest, not tight.
RERUN_TOLERANCE = {"metric:fid_proxy": 0.10, "metric:alignment_proxy": 10.5, "eval_loss": 1e-3, "images": 11.0}
SPREAD_FACTOR = 3
SPREAD_FILE = Path(__file__).parent / "data" / "kernel-spread.json"
#: The quantities that tell any two seeds apart; the metrics tell some seeds apart only (see above).
STABLE = {"eval_loss", "images"}


def _outside_tolerance(gaps: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in gaps.items() if not v <= RERUN_TOLERANCE[k]}


def test_rerun_tolerances_cover_the_measured_kernel_spread():
    spread = json.loads(SPREAD_FILE.read_text(encoding="utf-8"))
    kernel_sets = {r["kernel_set"] for r in spread["runs"]}
    assert {"native", "avx2", "sse41"} <= kernel_sets, kernel_sets
    assert spread["max"].keys() == RERUN_TOLERANCE.keys()
    for key, gap in spread["max"].items():
        assert gap == max(r["gaps"][key] for r in spread["runs"]), key
        assert RERUN_TOLERANCE[key] >= SPREAD_FACTOR * gap, (key, gap)


def test_rerun_tolerances_tell_seeds_apart():
    """A run of another seed (data order, initial adapters, noise: a different run) fails the re-run check on
    the stable quantities, for every method of the published Table 1; the Fréchet proxy tells the re-run
    LoRA seed 0 from LoRA's other seeds too."""
    exp = results.load("table1")
    for method in exp.methods:
        seeds = sorted(exp.per_seed(method, "fid_proxy"))
        for i, seed in enumerate(seeds):
            for other in seeds[i + 1 :]:
                outside = _outside_tolerance(rerun.gaps(exp, exp, method, seed, other))
                assert outside.keys() >= STABLE, (method, seed, other, outside)
    for other in (1, 2):
        assert "metric:fid_proxy" in _outside_tolerance(rerun.gaps(exp, exp, "lora", 0, other)), other


# A guard against a hung subprocess, not a speed check: natively the re-run takes minutes, under the
# SSE4.1-level kernel set (`make test-kernels`) 23+ minutes alone on an idle core (measured, 2026-12), and
# a 25-minute guard failed both re-runs of that leg on a machine shared with other work.
RERUN_TIMEOUT_S = 4 * 3600


def _rerun_published(tmp_path, name: str, method: str, seed: int):
    """Re-run one (method, seed) of the published experiment ``name`` with the documented commands
    (:func:`selora.rerun.rerun_command`, then ``publish``); returns ``(published experiment, its record, fresh
    experiment, fresh record)`` after checking the provenance."""
    exp = results.load(name)
    prov = exp.provenance
    cmd, env = rerun.rerun_command(exp, method, seed, tmp_path / "check")
    env = {**env, "SELORA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RERUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = results.load(results.publish(tmp_path / "check", f"{name}-check", tmp_path / "published"))
    for key in ("profile", "model", "dataset", "num_test_images", "metrics", "threads"):
        assert fresh.provenance[key] == prov[key], key
    published = {k: v for k, v in prov["resolved_config"].items() if k not in RETIRED_KEYS}  # keys since removed
    assert {k: fresh.provenance["resolved_config"].get(k) for k in published} == published
    return exp, exp.run(method, seed), fresh, fresh.run(method, seed)


def _assert_same_run(exp, record, fresh, again, method: str, seed: int) -> None:
    """What no CPU's rounding may change is equal; the rest within :data:`RERUN_TOLERANCE`."""
    for key in ("prompts", "ranks", "total_rank", "trainable", "parameters", "num_test_images"):
        assert again[key] == record[key], key
    assert again["best"]["epoch"] == record["best"]["epoch"]
    assert again["metrics"].keys() == record["metrics"].keys()
    assert fresh.total_rank_history(method, seed) == exp.total_rank_history(method, seed)
    assert fresh.final_ranks(method) == {seed: record["ranks"]}
    assert not _outside_tolerance(rerun.gaps(exp, fresh, method, seed)), RERUN_TOLERANCE


@pytest.mark.slow
def test_a_published_table1_cell_reproduces(tmp_path):
    """One (method, seed) of the shipped Table 1, re-run with the documented commands (train + sample
    + score with ``python -m selora.evaluate``, then ``python -m selora.results publish``), matches
    what is shipped: the record, the rank history, and within :data:`RERUN_TOLERANCE` the metrics, the
    held-out loss curve and the published test images.

    LoRA seed 0: no expansion decision can flip on a different CPU's float rounding, so the run is
    comparable beyond this machine. Training is ~3/4 of the time (780 steps), sampling ~1/8, so one run
    feeds every check below. The data cache is this test's own (a fresh phantom set, as in a fresh clone).
    """
    _assert_same_run(*_rerun_published(tmp_path, "table1", "lora", 0), "lora", 0)


@pytest.mark.slow
def test_a_published_signal_test_cell_reproduces(tmp_path):
    """Chapter 9's experiment (criterion: signal), SeLoRA seed 0, re-run with the documented commands.

    Its expansion decisions compare p-values with alpha: on another CPU a p-value that lies within
    float rounding of alpha could flip one decision, after which the run legitimately diverges. The
    rank history is therefore compared up to its first difference (at least the first test must agree;
    a later difference is reported as a warning); everything else is compared, with
    :data:`RERUN_TOLERANCE`, when the whole history agrees, as it does on the machine that made the experiment.
    """
    exp, record, fresh, again = _rerun_published(tmp_path, "signal-test", "selora", 0)
    assert fresh.provenance["resolved_config"]["criterion"] == "signal"
    published, history = exp.total_rank_history("selora", 0), fresh.total_rank_history("selora", 0)
    assert history and all(math.isfinite(v) for v in again["metrics"].values()), "a complete run, finite metrics"
    if history != published:
        first = next(i for i, (a, b) in enumerate(zip(history + [None], published + [None])) if a != b)
        assert first > 0, f"the first expansion test already differs: {history[:1]} vs {published[:1]}"
        warnings.warn(
            f"signal-test re-run: rank history differs from test {first} on (a flipped decision)", stacklevel=1
        )
        return
    _assert_same_run(exp, record, fresh, again, "selora", 0)
