"""What a training checkpoint holds and how a run comes back from one.

:class:`Checkpointer` writes a :class:`~selora.trainer.Trainer`'s state (counters, optimizer,
schedule, scaler, RNG, the method's own state) with :mod:`selora.checkpoint` into the run folder
(:mod:`selora.rundir`: ``checkpoints/last`` and ``checkpoints/previous``), restores it, keeps the
best adapters and writes the final ones. A failed write leaves the checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
from selora.io import atomic_save_safetensors


@dataclass
class Progress:
    """Where a run is: optimizer ``step``s taken, ``epoch``, ``batch`` within it, batches drawn in
    total (``attempt``, skipped ones included) and non-finite steps in a row (``bad``)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    attempt: int = 0
    bad: int = 0


class Checkpointer:
    """Checkpoints of a :class:`~selora.trainer.Trainer` (main process writes, every process reads).

    ``trainer`` is typed ``Any``: the trainer imports this module, so this one does not import it.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def save(self) -> None:
        """Write ``checkpoints/last`` atomically (main process; the one it replaces becomes
        ``checkpoints/previous``) and wait for it on every process. A failed write raises
        CheckpointWriteError on every process, the checkpoints left as they were."""
        tr = self.trainer
        error = None
        if tr.dist.main:
            tensors, opt_meta = optimizer_to_files(tr.optimizer)
            method_tensors, method_meta = split_tensors(tr.adapters.state_dict(), "method")
            rng_t, rng_meta = rng_states({"train": tr.gen, **tr.adapters.generators()})
            state = {
                **asdict(tr.at),
                "best": tr.best,
                "finished": tr.finished,
                "stopped_at": tr.stopped_at,
                "eval_step": tr.eval_step,
                "world": tr.dist.world,
                "records": {
                    "metrics": rundir.count_lines(tr.metrics_path),
                    "ranks": rundir.count_lines(tr.ranks_path),
                },
                "optimizer": opt_meta,
                "lr_schedule": tr.lr_schedule.state_dict(),
                "scaler": tr.scaler.state_dict(),
                "method": method_meta,
                "rng": rng_meta,
            }
            try:
                write_checkpoint(
                    tr.run_dir / rundir.LAST,
                    adapter_tensors(tr.adapters),
                    tr.adapters.ranks(),
                    {**tensors, **method_tensors, **rng_t},
                    state,
                    previous=tr.run_dir / rundir.PREVIOUS,
                )
            except CheckpointWriteError as err:
                error = self._write_error(err)
        if tr.dist.all_sum(torch.tensor([float(error is not None)])).item():  # also the barrier
            raise error or CheckpointWriteError("the main process could not write the checkpoint; see its error")

    def _write_error(self, err: CheckpointWriteError) -> CheckpointWriteError:
        """``err`` with what is still intact: the newest checkpoint and its step."""
        tr = self.trainer
        kept = find_checkpoint(tr.run_dir / rundir.LAST, tr.run_dir / rundir.PREVIOUS)
        try:
            step = json.loads((kept / STATE_JSON).read_text(encoding="utf-8"))["step"] if kept else None
        except (OSError, ValueError, KeyError):
            step = "?"
        where = err.target or tr.run_dir / rundir.LAST
        note = f"the previous checkpoint {kept} (step {step}) is intact" if kept else "there is no earlier checkpoint"
        return CheckpointWriteError(
            f"{err.reason} while writing {where} (step {tr.at.step}); {note}", err.reason, err.target
        )

    def _write_output(self, target: Path, write: Callable[[], Any]) -> None:
        """Run ``write`` (of ``target``, main process), a failed write raised as CheckpointWriteError."""
        try:
            write()
        except Exception as err:
            failure = write_failure(target, err)
            if failure is None:
                raise
            raise self._write_error(failure) from err

    def restore(self) -> None:
        """Resume from the newest good checkpoint (``checkpoints/last``, else ``previous``, saying so
        in one line): the method's state first (SeLoRA grows its layers and swaps the optimizer's
        parameters), then adapter values, optimizer, schedule, RNG, counters; the records are cut
        back to the checkpoint's."""
        tr = self.trainer
        last, previous = tr.run_dir / rundir.LAST, tr.run_dir / rundir.PREVIOUS
        if not any(p.exists() for p in checkpoint_candidates(last, previous)):
            raise ConfigError(f"--resume {tr.run_dir}: no checkpoint in {rundir.LAST}")
        try:
            found, (adapters, tensors, state), problems = read_latest_checkpoint(last, previous)
        except CheckpointError as err:
            raise ConfigError(f"--resume {tr.run_dir}: no usable checkpoint: {err}") from None
        if problems and tr.dist.main:
            print(f"warning: {'; '.join(problems)}; resuming from {found} (step {state['step']})", file=sys.stderr)
        tr.adapters.load_state_dict(join_tensors(state["method"], tensors))
        load_adapter_tensors(tr.adapters, adapters, where=str(found))
        optimizer_from_files(tr.optimizer, tensors, state["optimizer"])
        tr.lr_schedule.load_state_dict(state["lr_schedule"])
        tr.scaler.load_state_dict(state["scaler"])
        set_rng_states(tensors, state["rng"], {"train": tr.gen, **tr.adapters.generators()})
        tr.at = Progress(**{key: state[key] for key in asdict(tr.at)})
        tr.best, tr.finished = state["best"], state["finished"]
        tr.stopped_at, tr.eval_step = state.get("stopped_at"), state.get("eval_step")
        tr.dist.barrier()  # every process has read the checkpoint before the main one moves it
        if tr.dist.main:
            rundir.remove_temporaries(tr.run_dir)
            if found != last:  # the good one becomes last again; a bad last is kept aside
                bad = tr.run_dir / rundir.BAD
                if last.exists():
                    if bad.exists():
                        shutil.rmtree(bad)
                    os.replace(last, bad)
                os.replace(found, last)
            rundir.truncate_lines(tr.metrics_path, state["records"]["metrics"])
            rundir.truncate_lines(tr.ranks_path, state["records"]["ranks"])
        tr.dist.barrier()

    def save_best(self, record: dict) -> None:
        tr = self.trainer
        if tr.best is not None and record["eval_loss"] >= tr.best["eval_loss"]:
            return
        tr.best = {"eval_loss": record["eval_loss"], "step": tr.at.step, "epoch": tr.at.epoch}
        if tr.dist.main:
            best, tensors, ranks = tr.run_dir / rundir.BEST, adapter_tensors(tr.adapters), tr.adapters.ranks()
            self._write_output(best, lambda: write_checkpoint(best, tensors, ranks, state=tr.best))

    def write_final(self) -> None:
        """The final ``adapters.safetensors`` and ``ranks.json`` (main process)."""
        tr = self.trainer
        if tr.dist.main:
            final, ranks = tr.run_dir / rundir.FINAL_ADAPTERS, tr.run_dir / rundir.FINAL_RANKS
            self._write_output(final, lambda: atomic_save_safetensors(adapter_tensors(tr.adapters), final))
            self._write_output(ranks, lambda: write_json(ranks, tr.adapters.ranks()))

    def start_run_dir(self) -> None:
        """A fresh run directory: the resolved config, empty records, the rank history's step 0."""
        tr = self.trainer
        tr.run_dir.mkdir(parents=True, exist_ok=True)
        (tr.run_dir / rundir.CONFIG).write_text(tr.cfg.to_yaml(), encoding="utf-8")
        for path in (tr.metrics_path, tr.ranks_path):
            rundir.truncate_lines(path, 0)
        rundir.append_record(tr.ranks_path, {"step": 0, "ranks": tr.adapters.ranks()})

    def finish(self) -> None:
        """The last epoch is done: final adapters, then the checkpoint marked finished."""
        tr = self.trainer
        tr.finished, tr.stopped_at = True, None
        self.write_final()
        self.save()

    def end_at_max_steps(self) -> None:
        """End at ``max_steps`` like at the last epoch: evaluation (unless one ran at this step) and
        best/, final adapters, then the checkpoint marked ``stopped_at``; nothing if that is done."""
        tr = self.trainer
        if tr.stopped_at == tr.at.step:
            return
        if tr.eval_step != tr.at.step:
            tr.evaluate()
        tr.stopped_at = tr.at.step
        self.write_final()
        self.save()

    def reopen(self) -> None:
        """Training goes on past a ``--max-steps`` end: its final adapters no longer belong to ``last``."""
        tr = self.trainer
        if tr.stopped_at is None:
            return
        tr.stopped_at = None
        if tr.dist.main:
            for name in (rundir.FINAL_ADAPTERS, rundir.FINAL_RANKS):
                (tr.run_dir / name).unlink(missing_ok=True)
