"""A run's state (:class:`RunState`) and its checkpoints (:class:`Checkpointer`).

The trainer owns one :class:`RunState` and decides what goes in it; :class:`Checkpointer` writes
it, with the training parts it is given (adapters, optimizer, schedule, scaler, RNG), through
:mod:`selora.checkpoint` into the run folder (:mod:`selora.rundir`: ``checkpoints/last`` and
``checkpoints/previous``), reads it back, and writes ``best/`` and the final adapters. A failed
write leaves the checkpoints as they were. The state's fields are stored at the top level of
``state.json``, as before :class:`RunState` existed, so older checkpoints resume.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from selora import rundir
from selora.checkpoint import (
    STATE_JSON,
    CheckpointError,
    CheckpointWriteError,
    adapter_tensors,
    checkpoint_candidates,
    find_checkpoint,
    join_tensors,
    load_adapter_tensors,
    optimizer_from_files,
    optimizer_to_files,
    read_latest_checkpoint,
    rng_states,
    set_rng_states,
    split_tensors,
    write_checkpoint,
    write_failure,
    write_json,
)
from selora.config import ConfigError
from selora.distributed import Dist
from selora.io import atomic_save_safetensors
from selora.methods import Adapters


@dataclass
class RunState:
    """Where a run is. Counters: optimizer ``step``s taken, ``epoch``, ``batch`` within it, batches
    drawn in total (``attempt``, skipped ones included), non-finite steps in a row (``bad``).
    ``best``: ``{"eval_loss", "step", "epoch"}`` of the lowest held-out loss so far; ``finished``:
    every epoch done; ``stopped_at``: the step at which ``--max-steps`` ended the run (final
    adapters written; None while it goes on); ``eval_step``: the step of the latest evaluation."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    attempt: int = 0
    bad: int = 0
    best: dict[str, Any] | None = None
    finished: bool = False
    stopped_at: int | None = None
    eval_step: int | None = None

    def counters(self) -> dict[str, int]:
        """``{"step", "epoch", "batch", "attempt", "bad"}``."""
        return {key: getattr(self, key) for key in ("step", "epoch", "batch", "attempt", "bad")}

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> RunState:
        """The state stored in a checkpoint's ``state.json`` (``stopped_at``/``eval_step`` may be absent)."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


@dataclass
class TrainingParts:
    """What a checkpoint holds besides the :class:`RunState`: the adapters (with the method's own
    state and generators), the optimizer, its schedule, the gradient scaler and the trainer's
    generator (noise, timesteps, latent samples, prompt dropout)."""

    adapters: Adapters
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator

    def generators(self) -> dict[str, torch.Generator]:
        return {"train": self.generator, **self.adapters.generators()}


class Checkpointer:
    """The checkpoints of the run in ``run_dir`` (the main process of ``dist`` writes, every process reads)."""

    def __init__(self, run_dir: Path, dist: Dist, parts: TrainingParts) -> None:
        self.run_dir, self.dist, self.parts = Path(run_dir), dist, parts
        self.metrics_path, self.ranks_path = self.run_dir / rundir.METRICS, self.run_dir / rundir.RANK_HISTORY

    def save(self, state: RunState) -> None:
        """Write ``checkpoints/last`` atomically (main process; the one it replaces becomes
        ``checkpoints/previous``) and wait for it on every process. A failed write raises
        CheckpointWriteError on every process, the checkpoints left as they were."""
        parts, error = self.parts, None
        if self.dist.main:
            tensors, opt_meta = optimizer_to_files(parts.optimizer)
            method_tensors, method_meta = split_tensors(parts.adapters.state_dict(), "method")
            rng_t, rng_meta = rng_states(parts.generators())
            saved = {
                **asdict(state),
                "world": self.dist.world,
                "records": {
                    "metrics": rundir.count_lines(self.metrics_path),
                    "ranks": rundir.count_lines(self.ranks_path),
                },
                "optimizer": opt_meta,
                "lr_schedule": parts.lr_schedule.state_dict(),
                "scaler": parts.scaler.state_dict(),
                "method": method_meta,
                "rng": rng_meta,
            }
            try:
                write_checkpoint(
                    self.run_dir / rundir.LAST,
                    adapter_tensors(parts.adapters),
                    parts.adapters.ranks(),
                    {**tensors, **method_tensors, **rng_t},
                    saved,
                    previous=self.run_dir / rundir.PREVIOUS,
                )
            except CheckpointWriteError as err:
                error = self._write_error(err, state.step)
        if self.dist.all_sum(torch.tensor([float(error is not None)])).item():  # also the barrier
            raise error or CheckpointWriteError("the main process could not write the checkpoint; see its error")

    def _write_error(self, err: CheckpointWriteError, step: int) -> CheckpointWriteError:
        """``err`` (while at ``step``) with what is still intact: the newest checkpoint and its step."""
        kept = find_checkpoint(self.run_dir / rundir.LAST, self.run_dir / rundir.PREVIOUS)
        try:
            at = json.loads((kept / STATE_JSON).read_text(encoding="utf-8"))["step"] if kept else None
        except (OSError, ValueError, KeyError):
            at = "?"
        where = err.target or self.run_dir / rundir.LAST
        note = f"the previous checkpoint {kept} (step {at}) is intact" if kept else "there is no earlier checkpoint"
        return CheckpointWriteError(f"{err.reason} while writing {where} (step {step}); {note}", err.reason, err.target)

    def _write_output(self, target: Path, step: int, write: Callable[[], Any]) -> None:
        """Run ``write`` (of ``target``, main process), a failed write raised as CheckpointWriteError."""
        try:
            write()
        except Exception as err:
            failure = write_failure(target, err)
            if failure is None:
                raise
            raise self._write_error(failure, step) from err

    def restore(self) -> RunState:
        """The state of the newest good checkpoint (``checkpoints/last``, else ``previous``, saying
        so in one line), its training parts loaded: the method's state first (SeLoRA grows its
        layers and swaps the optimizer's parameters), then adapter values, optimizer, schedule,
        RNG; the records are cut back to the checkpoint's."""
        parts, run_dir = self.parts, self.run_dir
        last, previous = run_dir / rundir.LAST, run_dir / rundir.PREVIOUS
        if not any(p.exists() for p in checkpoint_candidates(last, previous)):
            raise ConfigError(f"--resume {run_dir}: no checkpoint in {rundir.LAST}")
        try:
            found, (adapters, tensors, saved), problems = read_latest_checkpoint(last, previous)
        except CheckpointError as err:
            raise ConfigError(f"--resume {run_dir}: no usable checkpoint: {err}") from None
        if problems and self.dist.main:
            print(f"warning: {'; '.join(problems)}; resuming from {found} (step {saved['step']})", file=sys.stderr)
        parts.adapters.load_state_dict(join_tensors(saved["method"], tensors))
        load_adapter_tensors(parts.adapters, adapters, where=str(found))
        optimizer_from_files(parts.optimizer, tensors, saved["optimizer"])
        parts.lr_schedule.load_state_dict(saved["lr_schedule"])
        parts.scaler.load_state_dict(saved["scaler"])
        set_rng_states(tensors, saved["rng"], parts.generators())
        self.dist.barrier()  # every process has read the checkpoint before the main one moves it
        if self.dist.main:
            rundir.remove_temporaries(run_dir)
            if found != last:  # the good one becomes last again; a bad last is kept aside
                bad = run_dir / rundir.BAD
                if last.exists():
                    if bad.exists():
                        shutil.rmtree(bad)
                    os.replace(last, bad)
                os.replace(found, last)
            rundir.truncate_lines(self.metrics_path, saved["records"]["metrics"])
            rundir.truncate_lines(self.ranks_path, saved["records"]["ranks"])
        self.dist.barrier()
        return RunState.from_json(saved)

    def write_best(self, best: dict[str, Any]) -> None:
        """The current adapters into ``best/`` with ``best`` (eval loss, step, epoch) as its state (main process)."""
        if self.dist.main:
            adapters, folder = self.parts.adapters, self.run_dir / rundir.BEST
            tensors, ranks = adapter_tensors(adapters), adapters.ranks()
            self._write_output(folder, best["step"], lambda: write_checkpoint(folder, tensors, ranks, state=best))

    def write_final(self, step: int) -> None:
        """The final ``adapters.safetensors`` and ``ranks.json`` (main process)."""
        if self.dist.main:
            adapters = self.parts.adapters
            final, ranks = self.run_dir / rundir.FINAL_ADAPTERS, self.run_dir / rundir.FINAL_RANKS
            self._write_output(final, step, lambda: atomic_save_safetensors(adapter_tensors(adapters), final))
            self._write_output(ranks, step, lambda: write_json(ranks, adapters.ranks()))

    def drop_final(self) -> None:
        """Training goes on past a ``--max-steps`` end: its final adapters no longer belong to ``last``."""
        if self.dist.main:
            for name in (rundir.FINAL_ADAPTERS, rundir.FINAL_RANKS):
                (self.run_dir / name).unlink(missing_ok=True)

    def start_run_dir(self, config_yaml: str) -> None:
        """A fresh run folder (main process): the resolved config, empty records, the rank history's step 0."""
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / rundir.CONFIG).write_text(config_yaml, encoding="utf-8")
            for path in (self.metrics_path, self.ranks_path):
                rundir.truncate_lines(path, 0)
            rundir.append_record(self.ranks_path, {"step": 0, "ranks": self.parts.adapters.ranks()})
