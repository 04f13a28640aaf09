"""The Table 1 counterpart: every (method, seed) trained by the same trainer, sampled on the test split, scored.

    python -m selora.evaluate --methods selora,lora,adalora,dylora --seeds 0,1,2 --out DIR
        [--config montgomery-offline] [--set key=value ...] [--limit N] [--batch 8] [--no-progress]

For each (method, seed) the run ``DIR/runs/<method>-seed<seed>/`` is trained with
:class:`selora.trainer.Trainer` (config + ``--set`` + ``method=<method>`` + ``seed=<seed>``; an
interrupted run is resumed), its best adapters (lowest held-out loss) are loaded, one image is
generated per test-split prompt (image i with the generator seed ``10^5 · seed + i``), and two
metrics are computed against the real test images (:func:`selora.metrics.evaluate`), chosen by the
runs' data and model, not by the profile (:func:`selora.held_out.metric_profile`): FID / CLIP
score for real data on a real model, the validated proxies for the phantom data or the mini SD
(so phantom images are never scored with FID on a GPU). Writes::

    DIR/runs/<method>-seed<seed>/evaluation.json   that run's result, with its final rank per layer (re-used later)
    DIR/runs/<method>-seed<seed>/test-samples.png  the generated test images with their prompts
    DIR/runs/<method>-seed<seed>/test-samples.safetensors  {"images": uint8 (N, 1, R, R)} (prompts in evaluation.json)
    DIR/results.json   per run, mean ± std per method (sample std over seeds), provenance
    DIR/results.md     the same as a markdown table

Trainable parameters are the adapters of the evaluated checkpoint (SeLoRA: at its grown rank;
AdaLoRA: its allocated initial-rank tensors), absolute and as a fraction of the frozen UNet + text
encoder. Exit codes: 0 done, 1 a run stopped on non-finite losses, 2 bad input or a missing extra
(FID needs the ``paper`` extra; checked before any work).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from selora.checkpoint import read_adapters
from selora.config import ConfigError, TrainConfig, load_config
from selora.data import open_dataset
from selora.data.errors import DataError
from selora.extras import MissingExtraError, require_extra
from selora.held_out import metric_profile
from selora.io import atomic_save_safetensors, atomic_write_text
from selora.layout import (
    BEST,
    CONFIG,
    RANKS,
    RESULTS_JSON,
    RESULTS_MD,
    RUN_RESULT,
    RUNS,
    STATE_JSON,
    TEST_SAMPLES,
    TEST_SAMPLES_GRID,
)
from selora.methods import METHODS
from selora.metrics import LABELS, evaluate, images_from_pil
from selora.params import adapter_counts
from selora.profile import profile as active_profile
from selora.profile import set_threads
from selora.provenance import metric_provenance, provenance
from selora.rundir import adapters_path, load_run, run_config
from selora.sample import generate, image_grid
from selora.stats import mean_std
from selora.trainer import NonFiniteLossError, Trainer

SAMPLE_SEED_STRIDE = 100_000  # generator seed of test image i in a run of seed s: s * stride + i
#: Per-run numbers summarised as mean ± std per method (besides the metrics).
SUMMARY_KEYS = ("trainable", "trainable_fraction", "total_rank", "train_seconds", "sample_seconds")

#: ``fn(generated (N, 1, H, W), prompts, real (M, 1, H, W)) -> {metric name: value}``.
MetricFn = Callable[[torch.Tensor, list[str], torch.Tensor], dict[str, float]]


# -- small helpers ------------------------------------------------------------------------------
def parse_list(text: str, what: str, cast: Callable[[str], Any] = str) -> list:
    """``"a,b,c"`` -> ``[cast(a), cast(b), cast(c)]``; ConfigError naming ``what`` when empty or repeated."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        values = [cast(x) for x in items]
    except ValueError:
        raise ConfigError(f"{what} {text}: expected a comma-separated list of {cast.__name__}") from None
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"{what} {text}: expected a non-empty comma-separated list without repeats")
    return values


def metric_fn(cfg: TrainConfig) -> MetricFn:
    """The two metrics of runs with config ``cfg``: those of :func:`selora.held_out.metric_profile`."""
    return partial(evaluate, profile=metric_profile(cfg))


# -- one run ------------------------------------------------------------------------------------
def run_name(method: str, seed: int) -> str:
    """The folder name of one run under ``DIR/runs/``: ``<method>-seed<seed>``."""
    return f"{method}-seed{seed}"


def check_run_config(cfg: TrainConfig, run_dir: Path) -> None:
    """ConfigError when ``run_dir`` exists and was trained with a different config (never mixed silently)."""
    if not (run_dir / CONFIG).is_file():
        return
    saved, now = run_config(run_dir).to_dict(), cfg.to_dict()
    diff = [k for k in now if saved.get(k) != now[k]]
    if diff:
        raise ConfigError(
            f"{run_dir.name}: trained with a different config ({diff[0]}: {saved.get(diff[0])!r} there, "
            f"{now[diff[0]]!r} now); use a new --out"
        )


def train_run(cfg: TrainConfig, run_dir: Path, progress: bool) -> dict[str, Any]:
    """Train ``run_dir`` to the end, resuming an interrupted run; ``{"train_seconds", "resumed"}``
    (a resumed run's time covers only this process's part)."""
    check_run_config(cfg, run_dir)
    resume = (run_dir / CONFIG).is_file()
    start = time.perf_counter()
    Trainer(cfg, run_dir, resume=resume, progress=progress).run()
    return {"train_seconds": time.perf_counter() - start, "resumed": resume}


def held_out_split(cfg: TrainConfig, limit: int | None) -> tuple[list[str], torch.Tensor]:
    """Prompts and real images ``(N, 1, R, R)`` in [-1, 1] of the test split (first ``limit``)."""
    ds = open_dataset(cfg, "test")
    n = len(ds) if limit is None else min(limit, len(ds))
    items = [ds[i] for i in range(n)]
    return [it["prompt"] for it in items], torch.stack([it["image"].float() for it in items])


def evaluate_run(
    cfg: TrainConfig, run_dir: Path, metrics: MetricFn, limit: int | None = None, batch: int = 8, progress: bool = True
) -> dict[str, Any]:
    """Train, sample the test split and score one (method, seed); writes ``run_dir/evaluation.json``."""
    timing = train_run(cfg, run_dir, progress)
    _, pipe = load_run(run_dir, adapters="best")
    prompts, real = held_out_split(cfg, limit)
    start = time.perf_counter()
    images = generate(
        pipe,
        prompts,
        cfg.resolution,
        cfg.sample_steps,
        cfg.guidance_scale,
        seed=cfg.seed * SAMPLE_SEED_STRIDE,
        batch=batch,
        progress=progress,
    )
    sample_seconds = time.perf_counter() - start
    image_grid(images, prompts, cols=min(8, len(images))).save(run_dir / TEST_SAMPLES_GRID)
    generated = images_from_pil(images)
    pixels = ((generated + 1) * 127.5).round().to(torch.uint8).contiguous()
    atomic_save_safetensors({"images": pixels}, run_dir / TEST_SAMPLES)
    scores = metrics(generated, prompts, real)
    state = json.loads((run_dir / BEST / STATE_JSON).read_text(encoding="utf-8"))
    ranks = json.loads((run_dir / BEST / RANKS).read_text(encoding="utf-8"))
    counts = adapter_counts(read_adapters(adapters_path(run_dir, "best")), pipe)  # the adapters load_run loaded
    result = {
        "method": cfg.method,
        "seed": cfg.seed,
        "run_dir": f"{RUNS}/{run_dir.name}",
        "metrics": {k: float(v) for k, v in scores.items()},
        "trainable": counts["total"]["trainable"],
        "trainable_fraction": counts["total"]["fraction"],
        "parameters": counts,
        "total_rank": sum(ranks.values()),
        "ranks": ranks,
        "best": {"epoch": state["epoch"], "step": state["step"], "eval_loss": state["eval_loss"]},
        "num_test_images": len(prompts),
        "prompts": prompts,
        **timing,
        "sample_seconds": sample_seconds,
    }
    atomic_write_text(run_dir / RUN_RESULT, json.dumps(result, indent=1))
    return result


# -- the experiment -----------------------------------------------------------------------------
def summarise(runs: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method: mean ± std over its runs of every metric and of :data:`SUMMARY_KEYS`."""
    out = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        row = {"seeds": [r["seed"] for r in mine]}
        row["metrics"] = {k: mean_std([r["metrics"][k] for r in mine]) for k in mine[0]["metrics"]}
        row.update({k: mean_std([float(r[k]) for r in mine]) for k in SUMMARY_KEYS})
        out[method] = row
    return out


def _pm(stat: dict[str, Any], digits: int) -> str:
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def summary_table(summary: dict[str, dict[str, Any]], reference: dict[str, dict[str, float]] | None = None) -> str:
    """The per-method markdown table (mean ± std over seeds) of :func:`summarise`'s ``summary``.

    ``reference``: extra rows ``{label: {metric: value}}`` (e.g. the base model, real scans) shown
    below the methods with their metrics only.
    """
    keys = list(next(iter(summary.values()))["metrics"])
    head = [
        "method",
        "seeds",
        *(LABELS.get(k, k) for k in keys),
        "trainable params",
        "% of base",
        "total rank",
        "train time (s)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in summary.items():
        cells = [
            method,
            ",".join(map(str, row["seeds"])),
            *(_pm(row["metrics"][k], 2) for k in keys),
            f"{row['trainable']['mean']:,.0f}",
            f"{100 * row['trainable_fraction']['mean']:.3f}",
            f"{row['total_rank']['mean']:.0f}",
            f"{row['train_seconds']['mean']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for label, values in (reference or {}).items():
        missing = [k for k in keys if k not in values]
        if missing:
            raise KeyError(f"reference[{label!r}]: no value for {missing[0]!r}")
        lines.append("| " + " | ".join([label, "", *(f"{values[k]:.2f}" for k in keys), "", "", "", ""]) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: the per-method table (mean ± std over seeds) and the provenance."""
    summary, prov = results["summary"], results["provenance"]
    lines = [summary_table(summary)]
    metrics = prov.get("metric_profile", prov["profile"])
    note = {
        "offline": "phantom data or mini SD: proxy metrics, not comparable with the paper's FID / CLIP score.",
        "paper": "real data: FID and CLIP score.",
    }.get(metrics, "metrics passed by the caller.")
    git = prov["git"] or {}
    info = [
        f"- profile: {prov['profile']} ({note})",
        f"- base model: {prov['model']['model']} ("
        + (
            f"hub id {prov['model']['hub_id']})"
            if "hub_id" in prov["model"]
            else f"folder sha256 {prov['model']['sha256']})"
        ),
        f"- data: {prov['dataset']}, sha256 {prov['data_sha256']}",
        f"- seeds: {', '.join(map(str, prov['seeds']))}; test images per run: {prov['num_test_images']}",
        f"- git commit: {git.get('commit', 'unknown')}" + (" (uncommitted changes)" if git.get("dirty") else ""),
        f"- metrics: {json.dumps(prov['metrics'])}",
        "- mean ± sample std over seeds; trainable parameters = adapters of the evaluated (best) checkpoint",
    ]
    return (
        "# Results: methods × seeds on the test split\n\n"
        + "\n".join(lines)
        + "\n\n## Provenance\n\n"
        + "\n".join(info)
        + "\n"
    )


def run_configs(
    config: str, overrides: Sequence[str], methods: Sequence[str], seeds: Sequence[int]
) -> dict[tuple[str, int], TrainConfig]:
    """The validated config of every (method, seed); every problem is a ConfigError before any work."""
    taken = [o for o in overrides if o.partition("=")[0].strip() in ("method", "seed")]
    if taken:
        raise ConfigError(f"--set {taken[0]}: method and seed are set by --methods and --seeds")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method {unknown[0]!r}; expected some of {', '.join(METHODS)}")
    if any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds: expected integers >= 0, got {list(seeds)}")
    return {(m, s): load_config(config, [*overrides, f"method={m}", f"seed={s}"]) for m in methods for s in seeds}


def run_experiment(
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path | str,
    config: str = "montgomery-offline",
    overrides: Sequence[str] = (),
    limit: int | None = None,
    batch: int = 8,
    metrics: MetricFn | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every (method, seed) through :func:`evaluate_run`, then ``results.json`` and ``results.md`` in ``out``.

    ``metrics`` defaults to :func:`metric_fn` of the runs' config (FID / CLIP score for real data,
    the proxies for phantom data or the mini SD; refused before any work when FID / CLIP score are
    due but the profile is offline, or without the ``paper`` extra FID needs). A run whose
    ``evaluation.json`` exists is not redone (so an interrupted experiment continues).
    """
    if limit is not None and limit < 2:
        raise ConfigError(f"--limit {limit}: expected at least 2 test images (a Fréchet distance needs two)")
    if batch < 1:
        raise ConfigError(f"--batch {batch}: expected an integer >= 1")
    configs = run_configs(config, overrides, methods, seeds)
    first = next(iter(configs.values()))  # the runs differ only in method and seed
    kind = metric_profile(first) if metrics is None else None
    if kind == "paper" and active_profile() == "offline":
        raise ConfigError(
            f"dataset={first.dataset} model={first.model}: real data is scored with FID / CLIP score, "
            "whose weights need the network, but the profile is 'offline' (set SELORA_PROFILE=paper)"
        )
    if kind == "paper":
        require_extra("paper", "FID")
    out = Path(out)
    for (method, seed), cfg in configs.items():
        check_run_config(cfg, out / RUNS / run_name(method, seed))
    (out / RUNS).mkdir(parents=True, exist_ok=True)
    metrics = metrics or metric_fn(first)
    runs = []
    for (method, seed), cfg in configs.items():
        run_dir = out / RUNS / run_name(method, seed)
        done = run_dir / RUN_RESULT
        if done.is_file():
            runs.append(json.loads(done.read_text(encoding="utf-8")))
            continue
        runs.append(evaluate_run(cfg, run_dir, metrics, limit, batch, progress))
    prov = provenance(first, methods, seeds, config, overrides, limit)
    prov["metric_profile"] = kind or "custom"  # whose metrics scored the runs (not the active profile)
    if kind is not None:
        prov["metrics"] = metric_provenance(kind)
    results = {
        "provenance": prov,
        "summary": summarise(runs, methods),
        "runs": runs,
    }
    atomic_write_text(out / RESULTS_JSON, json.dumps(results, indent=1))
    atomic_write_text(out / RESULTS_MD, markdown(results))
    return results


# -- command line -------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """CLI (module docstring): 0 done, 1 a run stopped (non-finite loss), 2 bad input."""
    ap = argparse.ArgumentParser(prog="python -m selora.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="selora,lora,adalora,dylora", help="comma-separated methods")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--out", type=Path, required=True, help="experiment folder (created; re-runs continue it)")
    ap.add_argument("--config", default="montgomery-offline", help="config file or shipped name")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key for every run (repeatable)",
    )
    ap.add_argument("--limit", type=int, help="only the first N test images (smoke runs)")
    ap.add_argument("--batch", type=int, default=8, help="images generated per pipeline call")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        methods = parse_list(args.methods, "--methods")
        seeds = parse_list(args.seeds, "--seeds", int)
        set_threads()
        results = run_experiment(
            methods, seeds, args.out, args.config, args.overrides, args.limit, args.batch, progress=not args.no_progress
        )
    except (ConfigError, DataError, FileNotFoundError, MissingExtraError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print((args.out / RESULTS_MD).read_text(encoding="utf-8"))
    print(
        json.dumps(
            {m: {k: round(v["mean"], 4) for k, v in row["metrics"].items()} for m, row in results["summary"].items()}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
