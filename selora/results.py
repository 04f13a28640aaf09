"""Published experiment results: the light files of a ``python -m selora.evaluate`` folder, shipped in the package.

An experiment folder holds trained runs (adapters, checkpoints: megabytes each). Chapters 7 and 8
only need what the runs *produced*: ``results.json`` (provenance, per-run metrics, parameter
counts, final ranks per layer), ``results.md``, each run's generated test images and its total
rank over training. ``publish``
copies exactly those into ``selora/assets/results/<name>/`` (so they also reach a Colab install
without a checkout); ``load`` reads them back::

    python -m selora.evaluate --methods selora,lora,adalora,dylora --seeds 0,1,2 --out EXP
    python -m selora.results publish EXP table1          # -> selora/assets/results/table1/
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from selora.io import atomic_dir, read_jsonl
from selora.layout import METRICS, RANK_HISTORY, RESULTS_JSON, RESULTS_MD, TEST_SAMPLES
from selora.paths import ASSETS_DIR

RESULTS_DIR = ASSETS_DIR / "results"
RANK_TOTALS = "total-rank.json"  # published per run: [[step, total rank], ...] after every expansion test
EVAL_CURVE = "eval-curve.json"  # published per run (when it logged any): its evaluation records' losses
EVAL_KEYS = ("step", "epoch", "eval_loss", "test_loss")
_COPIED = (RESULTS_JSON, RESULTS_MD)


@dataclass(frozen=True)
class Experiment:
    """A published (or local) experiment folder: ``results`` is its ``results.json``."""

    root: Path
    results: dict[str, Any]

    @property
    def provenance(self) -> dict[str, Any]:
        return self.results["provenance"]

    @property
    def summary(self) -> dict[str, dict[str, Any]]:
        """Per method: mean ± std over seeds (see :func:`selora.evaluate.summarise`)."""
        return self.results["summary"]

    @property
    def methods(self) -> list[str]:
        return list(self.summary)

    def run(self, method: str, seed: int) -> dict[str, Any]:
        """The ``evaluation.json`` record of one (method, seed); KeyError naming what exists."""
        for r in self.results["runs"]:
            if r["method"] == method and r["seed"] == seed:
                return r
        have = sorted((r["method"], r["seed"]) for r in self.results["runs"])
        raise KeyError(f"{self.root.name}: no run ({method!r}, {seed}); have {have}")

    def samples(self, method: str, seed: int) -> torch.Tensor:
        """The run's generated test images as float (N, 1, R, R) in [-1, 1], in prompt order."""
        path = self.root / self.run(method, seed)["run_dir"] / TEST_SAMPLES
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (publish the experiment again)")
        return load_file(str(path))["images"].float() / 127.5 - 1

    def total_rank_history(self, method: str, seed: int) -> tuple[list[int], list[int]]:
        """``(steps, total rank)`` of one run after every expansion test (step 0 first)."""
        path = self.root / self.run(method, seed)["run_dir"] / RANK_TOTALS
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (publish the experiment again)")
        pairs = json.loads(path.read_text(encoding="utf-8"))
        return [s for s, _ in pairs], [r for _, r in pairs]

    def eval_curve(self, method: str, seed: int) -> list[dict[str, float]]:
        """One run's evaluations in order: ``{"step", "epoch", "eval_loss"}`` (the loss on the split
        the best epoch is chosen on) and ``"test_loss"`` when that split was not the test split."""
        path = self.root / self.run(method, seed)["run_dir"] / EVAL_CURVE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (published before eval curves were; publish it again)")
        return json.loads(path.read_text(encoding="utf-8"))

    def per_seed(self, method: str, key: str) -> dict[int, float]:
        """``{seed: value}`` over the runs of ``method``: a metric (``r["metrics"][key]``) or a run
        number such as ``total_rank``, ``trainable``, ``train_seconds``; KeyError naming what exists."""
        runs = sorted((r for r in self.results["runs"] if r["method"] == method), key=lambda r: r["seed"])
        if not runs:
            have = sorted({r["method"] for r in self.results["runs"]})
            raise KeyError(f"{self.root.name}: no runs of {method!r}; have {have}")
        out = {}
        for r in runs:
            if key in r["metrics"]:
                out[r["seed"]] = r["metrics"][key]
            elif isinstance(r.get(key), (int, float)):
                out[r["seed"]] = r[key]
            else:
                numbers = sorted(k for k, v in r.items() if isinstance(v, (int, float)))
                raise KeyError(
                    f"{self.root.name}: {key!r} is neither a metric {sorted(r['metrics'])} nor a run number {numbers}"
                )
        return out

    def final_ranks(self, method: str = "selora") -> dict[int, dict[str, int]]:
        """``{seed: {layer: rank}}`` of the evaluated (best) checkpoint of every run of ``method``."""
        return {r["seed"]: r["ranks"] for r in self.results["runs"] if r["method"] == method}


def load(name: str | Path) -> Experiment:
    """A published experiment by name (``selora/assets/results/<name>``) or any experiment folder."""
    root = Path(name) if Path(name).is_dir() else RESULTS_DIR / str(name)
    path = root / RESULTS_JSON
    if not path.is_file():
        published = sorted(p.name for p in RESULTS_DIR.iterdir()) if RESULTS_DIR.is_dir() else []
        raise FileNotFoundError(f"{path}: no {RESULTS_JSON} (published experiments: {published or 'none'})")
    return Experiment(root, json.loads(path.read_text(encoding="utf-8")))


def publish(experiment: Path | str, name: str, dest_root: Path | str = RESULTS_DIR) -> Path:
    """Copy ``results.json``, ``results.md`` and every run's test images into ``dest_root/name``,
    with each run's total rank after every expansion test (``total-rank.json``, from its rank history)
    and its evaluation losses (``eval-curve.json``, from its ``metrics.jsonl`` when there is one).

    The destination is replaced as a whole (never half-written). Runs without ``ranks`` in their
    record (an experiment made before ranks were recorded) are an error, since chapters need them.
    """
    src = load(experiment)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name {name!r}: expected a plain folder name")
    missing = [f"{r['method']}-seed{r['seed']}" for r in src.results["runs"] if "ranks" not in r]
    if missing:
        raise ValueError(f"{src.root}: runs {missing} have no per-layer ranks; re-evaluate them")
    dest = Path(dest_root) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dest) as tmp:
        for file in _COPIED:
            shutil.copy2(src.root / file, tmp / file)
        for r in src.results["runs"]:
            (tmp / r["run_dir"]).mkdir(parents=True)
            shutil.copy2(src.root / r["run_dir"] / TEST_SAMPLES, tmp / r["run_dir"] / TEST_SAMPLES)
            history = src.root / r["run_dir"] / RANK_HISTORY
            if not history.is_file():
                raise FileNotFoundError(f"{history}: missing (the run's rank history; publish needs the trained runs)")
            totals = [[rec["step"], sum(rec["ranks"].values())] for rec in read_jsonl(history)]
            (tmp / r["run_dir"] / RANK_TOTALS).write_text(json.dumps(totals), encoding="utf-8")
            log = src.root / r["run_dir"] / METRICS
            if log.is_file():
                evals = [e for e in read_jsonl(log) if e.get("kind") == "eval"]
                curve = [{k: e[k] for k in EVAL_KEYS if k in e} for e in evals]
                (tmp / r["run_dir"] / EVAL_CURVE).write_text(json.dumps(curve), encoding="utf-8")
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m selora.results", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish", help="copy an experiment's results into the package assets")
    p.add_argument("experiment", type=Path, help="a python -m selora.evaluate --out folder")
    p.add_argument("name", help="published name, e.g. table1")
    p.add_argument("--dest", type=Path, default=RESULTS_DIR, help="folder of published experiments")
    args = ap.parse_args(argv)
    try:
        dest = publish(args.experiment, args.name, args.dest)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"published {args.experiment} -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
