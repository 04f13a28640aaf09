"""A training run's folder: its layout, its records, and loading a finished run for sampling.

config.yaml            the resolved config          metrics.jsonl      train/eval records
rank_history.jsonl     step -> rank per layer       samples/           grids per evaluation
checkpoints/last/      newest resumable state       best/              best adapters (eval loss)
checkpoints/previous/  the checkpoint before it     checkpoints/last.bad/  a bad ``last`` set aside
adapters.safetensors   final adapters               ranks.json         final layer -> rank

Checkpoints (:mod:`selora.checkpoint`) are written every ``checkpoint_every`` steps, after each
epoch and at the end; the two newest are kept. A resume reads ``last`` and, if a file of it is
truncated or corrupt, falls back to ``previous`` (``last`` is then moved to ``last.bad`` and
``previous`` to ``last``); the records are cut back to the lengths the checkpoint used stored.
``adapters.safetensors``/``ranks.json`` are written when the run ends (its last epoch or
``--max-steps``); a run continued past a ``--max-steps`` end drops them until it ends again, so
they always belong to the checkpoint in ``last``. Hidden ``.*.tmp``/``.*.del`` entries are
temporaries of interrupted writes (removed on resume).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from selora.checkpoint import load_adapter_tensors, read_adapters, write_failure
from selora.config import TrainConfig, load_config
from selora.distributed import default_device
from selora.io import atomic_write_text, read_jsonl
from selora.layout import BAD as BAD  # the names of a run folder's parts, also used as rundir.<NAME>
from selora.layout import BEST, CHECKPOINTS, CONFIG, FINAL_ADAPTERS, LAST, METRICS, PREVIOUS, RANK_HISTORY
from selora.layout import FINAL_RANKS as FINAL_RANKS
from selora.layout import SAMPLES as SAMPLES
from selora.models import load_pipeline
from selora.pipeline import add_adapters


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line to ``path``. A failed write (a full disk) raises
    :class:`~selora.checkpoint.CheckpointWriteError` naming ``path``, the file cut back to the
    records before it (no half line)."""
    line = memoryview((json.dumps(record) + "\n").encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            while line:
                line = line[os.write(fd, line) :]
        except OSError as err:
            os.ftruncate(fd, size)
            raise write_failure(path, err) from None
    finally:
        os.close(fd)


def count_lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else 0


def truncate_lines(path: Path, n: int) -> None:
    """Keep the first ``n`` lines of ``path`` (records written after a checkpoint are dropped)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    atomic_write_text(path, "".join(lines[:n]))


def remove_temporaries(run_dir: Path | str) -> list[Path]:
    """Delete the hidden temporaries an interrupted write left in ``run_dir`` and its checkpoints
    folder (one process writes a run, so none is in use); returns them."""
    run_dir = Path(run_dir)
    found = [p for folder in (run_dir, run_dir / CHECKPOINTS) for p in folder.glob(".*.tmp")]
    found += list((run_dir / CHECKPOINTS).glob(".*.del"))
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return found


def read_records(run_dir: Path | str) -> dict[str, list[dict]]:
    """A run's records: ``{"train": [...], "eval": [...], "ranks": [...]}`` from metrics.jsonl and
    rank_history.jsonl (train: step, batch, epoch, loss, lr, total_rank; skipped batches have
    ``loss`` None; ranks: step, ranks per layer, expanded, ratios)."""
    run_dir = Path(run_dir)
    metrics, history = read_jsonl(run_dir / METRICS), read_jsonl(run_dir / RANK_HISTORY)
    return {
        "train": [r for r in metrics if r["kind"] == "train"],
        "eval": [r for r in metrics if r["kind"] == "eval"],
        "ranks": history,
    }


def run_config(run_dir: Path | str) -> TrainConfig:
    """The resolved config a run directory was trained with."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no {CONFIG})")
    return load_config(path)


def adapters_path(run_dir: Path | str, adapters: str = "best") -> Path:
    """The adapter file of ``best`` (falls back to ``last``) or ``last`` (the final adapters of an
    ended run, else the latest checkpoint's: ``checkpoints/last``, else ``checkpoints/previous``)."""
    run_dir = Path(run_dir)
    candidates = [run_dir / BEST / FINAL_ADAPTERS] if adapters == "best" else []
    candidates += [run_dir / FINAL_ADAPTERS, run_dir / LAST / FINAL_ADAPTERS, run_dir / PREVIOUS / FINAL_ADAPTERS]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no adapters (best/, adapters.safetensors or checkpoints/last/)")
    return path


def load_run(run_dir: Path | str, adapters: str = "best", merged: bool = False, device: torch.device | None = None):
    """``(config, pipeline with the run's adapters)``; ``adapters`` = ``best`` or ``last`` (:func:`adapters_path`).

    ``merged=True`` folds W0 + s B A into plain Linears.
    """
    cfg = run_config(run_dir)
    path = adapters_path(run_dir, adapters)
    pipe = load_pipeline(cfg.model, torch.float32, device or default_device())
    model = add_adapters(pipe, cfg, total_steps=1)  # a schedule over steps is unused when only loading
    load_adapter_tensors(model.adapters, read_adapters(path), where=str(path))
    if merged:
        model.adapters.merge()
    model.requires_grad_(False)
    return cfg, pipe
