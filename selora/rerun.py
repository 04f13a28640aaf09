"""Re-running one (method, seed) of a published experiment, and how far the re-run lands from it.

A published experiment (:mod:`selora.results`) records the config, overrides and thread count it was
made with, so one of its runs can be made again with the documented command::

    python -m selora.evaluate --methods lora --seeds 0 --config montgomery-offline --out OUT --no-progress
    python -m selora.results publish OUT table1-check

On another CPU the re-run is not bitwise the same: torch, oneDNN and MKL pick kernels by instruction set,
float32 sums round differently in the last bit, and hundreds of optimizer steps and a sampling chain
amplify that. :func:`gaps` measures the distance in the quantities a reader compares (metrics, the
held-out loss curve, the test images); ``tests/test_results.py`` holds it to tolerances derived from
the spread measured across kernel sets (``scripts/kernel_spread.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from selora.results import Experiment

#: How a metric's re-run gap is measured: ``relative`` for a distance (positive, scale-free: the Fréchet
#: proxy), ``absolute`` for a score near 0 whose sign matters (the alignment proxy is a difference).
METRIC_GAP = {"fid_proxy": "relative", "alignment_proxy": "absolute"}


def rerun_command(exp: Experiment, method: str, seed: int, out: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that re-make ``(method, seed)`` of ``exp`` into ``out``."""
    prov = exp.provenance
    cmd = [sys.executable, "-m", "selora.evaluate", "--methods", method, "--seeds", str(seed), "--out", str(out)]
    cmd += ["--config", prov["config"], "--no-progress", *(a for o in prov["overrides"] for a in ("--set", o))]
    env = {"SELORA_PROFILE": prov["profile"], "SELORA_THREADS": str(prov["threads"]), "PYTHONHASHSEED": "0"}
    return cmd, {**os.environ, **env}


def _metric_gap(name: str, published: float, fresh: float) -> float:
    if METRIC_GAP.get(name, "relative") == "absolute":
        return abs(fresh - published)
    return abs(fresh - published) / abs(published)


def image_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference in uint8 grey levels of two image batches in [-1, 1], (N, C, H, W)."""
    return ((a - b).abs() * 127.5).round().mean().item()


def eval_curve_gap(published: list[dict], fresh: list[dict]) -> list[float]:
    """Relative gap of the held-out loss at each evaluation (the published curve's steps, in order)."""
    if [r["step"] for r in published] != [r["step"] for r in fresh]:
        raise ValueError(f"eval curves at different steps: {[r['step'] for r in fresh]}")
    return [abs(f["eval_loss"] - p["eval_loss"]) / abs(p["eval_loss"]) for p, f in zip(published, fresh)]


def gaps(published: Experiment, fresh: Experiment, method: str, seed: int, fresh_seed: int | None = None) -> dict:
    """How far ``fresh``'s ``(method, fresh_seed)`` (default: the same seed) lies from ``published``'s
    ``(method, seed)``, one number per compared quantity: each metric (:data:`METRIC_GAP`), the largest
    relative held-out-loss gap over the eval curve, and the test images' mean grey-level gap."""
    other = seed if fresh_seed is None else fresh_seed
    record, again = published.run(method, seed), fresh.run(method, other)
    out = {f"metric:{k}": _metric_gap(k, v, again["metrics"][k]) for k, v in record["metrics"].items()}
    out["eval_loss"] = max(eval_curve_gap(published.eval_curve(method, seed), fresh.eval_curve(method, other)))
    out["images"] = image_gap(fresh.samples(method, other), published.samples(method, seed))
    return out
