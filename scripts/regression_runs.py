"""Fixed-seed offline runs of the four methods: the trainer's behaviour, recorded.

    python scripts/regression_runs.py --out DIR             run them into DIR/<method>/
    python scripts/regression_runs.py --compare A B         bitwise comparison of two such folders
    python scripts/regression_runs.py --gaps DIR            largest relative gaps of DIR's runs to the reference
    python scripts/regression_runs.py --update-reference    rewrite tests/data/regression/ (when a
                                                             change is MEANT to alter results)

Each run is ``python -m selora.train`` (the CLI, so the recording does not depend on the package's
internals) on the shipped mini SD and the phantom set: :data:`SETTINGS` (30 steps, an expansion test
every 5 steps at lambda = 1.05, an evaluation after every epoch, no sample grids), one torch thread.
``tests/test_regression.py`` re-runs them and checks them against the committed reference with
tolerances that hold across CPUs (ranks equal, tensors close).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO / "tests" / "data" / "regression"
METHODS = ("selora", "lora", "dylora", "adalora")
#: ``--set`` items of every run (30 optimizer steps: 3 epochs of the 13-step phantom train split, capped).
SETTINGS = ("epochs=3", "interval=5", "threshold=1.05", "eval_every=1", "num_samples=0")
MAX_STEPS = 30
#: The files a run leaves that describe its result (compared bitwise by ``--compare``).
RESULT_FILES = (
    "checkpoints/last/adapters.safetensors",
    "checkpoints/last/ranks.json",
    "metrics.jsonl",
    "rank_history.jsonl",
)


def run_method(method: str, out: Path) -> Path:
    """Train ``method`` into ``out / method`` with :data:`SETTINGS`; returns the run folder."""
    run = out / method
    env = {**os.environ, "SELORA_PROFILE": "offline", "SELORA_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [
        sys.executable,
        "-m",
        "selora.train",
        "--config",
        "montgomery-offline",
        "--out",
        str(run),
        "--max-steps",
        str(MAX_STEPS),
        "--no-progress",
        "--set",
        f"method={method}",
    ]
    for item in SETTINGS:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return run


def digests(run: Path) -> dict[str, str]:
    """sha256 of every file of :data:`RESULT_FILES` in ``run``."""
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest() for name in RESULT_FILES}


def compare(a: Path, b: Path) -> list[str]:
    """The result files that differ between two folders of runs (empty: bitwise equal)."""
    return [f"{m}/{name}" for m in METHODS for name, d in digests(a / m).items() if digests(b / m)[name] != d]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _loss_gap(ref: Path, got: Path) -> float:
    """Largest relative gap of the recorded losses (metrics.jsonl)."""
    pairs = zip(_jsonl(ref / "metrics.jsonl"), _jsonl(got / "metrics.jsonl"))
    keys = ("loss", "eval_loss", "reg")
    return max((_rel(g[k], r[k]) for r, g in pairs for k in keys if isinstance(r.get(k), float)), default=0.0)


def _ratio_gap(ref_hist: list[dict], got_hist: list[dict]) -> float:
    """Largest relative gap of the finite FI-ratios of the expansion tests (rank_history.jsonl)."""
    pairs = zip(ref_hist, got_hist)
    gaps = (_rel(g["ratios"][n], x) for r, g in pairs for n, x in r.get("ratios", {}).items() if math.isfinite(x))
    return max(gaps, default=0.0)


def _tensor_gap(ref: Path, got: Path) -> float:
    """Largest relative (Frobenius) gap of the final adapter tensors."""
    a, b = load_file(str(ref / "adapters.safetensors")), load_file(str(got / RESULT_FILES[0]))
    gaps = ((b[k] - t).norm() / t.norm().clamp_min(1e-12) for k, t in a.items() if b[k].shape == t.shape)
    return max((g.item() for g in gaps), default=0.0)


def gaps(runs: Path, reference: Path = REFERENCE_DIR) -> dict[str, float]:
    """Largest relative gaps of ``runs/<method>`` to the reference over the four methods: adapter tensors
    (Frobenius), recorded losses, FI-ratios; and whether every rank history is the same (1.0) or not (0.0).
    How far another kernel set lands (``scripts/kernel_spread.py exec avx2 -- ... --out DIR``)."""
    out = {"tensor": 0.0, "loss": 0.0, "ratio": 0.0, "same_ranks": 1.0}
    for method in METHODS:
        ref, got = reference / method, runs / method
        ref_hist, got_hist = _jsonl(ref / "rank_history.jsonl"), _jsonl(got / "rank_history.jsonl")
        if [h["ranks"] for h in ref_hist] != [h["ranks"] for h in got_hist]:
            out["same_ranks"] = 0.0
        out["tensor"] = max(out["tensor"], _tensor_gap(ref, got))
        out["loss"] = max(out["loss"], _loss_gap(ref, got))
        out["ratio"] = max(out["ratio"], _ratio_gap(ref_hist, got_hist))
    return out


def update_reference(dest: Path = REFERENCE_DIR) -> None:
    """Run every method and keep its adapters, ranks and records in ``dest`` (replaced whole)."""
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "staged"
        for method in METHODS:
            run = run_method(method, Path(tmp) / "runs")
            (staged / method).mkdir(parents=True)
            for name in RESULT_FILES:
                shutil.copy(run / name, staged / method / Path(name).name)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(staged, dest)
    (dest / "settings.json").write_text(json.dumps({"settings": SETTINGS, "max_steps": MAX_STEPS}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="run the four methods into this folder")
    group.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two folders of runs")
    group.add_argument("--gaps", type=Path, metavar="DIR", help="largest gaps of a folder of runs to the reference")
    group.add_argument("--update-reference", action="store_true", help=f"rewrite {REFERENCE_DIR.relative_to(REPO)}")
    args = ap.parse_args(argv)
    if args.update_reference:
        update_reference()
        print(f"wrote {REFERENCE_DIR.relative_to(REPO)}")
        return 0
    if args.gaps:
        print(json.dumps(gaps(args.gaps), indent=1))
        return 0
    if args.compare:
        differ = compare(*args.compare)
        print("bitwise equal" if not differ else "differ: " + ", ".join(differ))
        return 1 if differ else 0
    for method in METHODS:
        run_method(method, args.out)
        print(method, json.dumps(digests(args.out / method)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
