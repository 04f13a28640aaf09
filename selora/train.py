"""The training command line.

    python -m selora.train --config FILE|NAME --out RUN_DIR [--set key=value ...] [--max-steps N]
    python -m selora.train --resume RUN_DIR [--max-steps N] [--set epochs=...]
    torchrun --nproc_per_node 2 -m selora.train ...          (gloo on CPU, NCCL on GPU)
    accelerate launch --multi_gpu --num_processes 2 -m selora.train ...   (the same process group)

``--max-steps N`` ends training after N optimizer steps in total, as the last epoch does (like
diffusers' ``--max_train_steps``): an evaluation, ``best/``, the final ``adapters.safetensors`` and
``ranks.json``, a checkpoint. ``--resume RUN_DIR`` continues from the newest good checkpoint
(``checkpoints/last``; if a file of it is truncated or corrupt, one line names it and the resume
goes on from ``checkpoints/previous``); a run ended by ``--max-steps`` continues with a larger
``--max-steps`` (or without one, to the configured epochs) exactly as a run straight there would;
a run whose epochs are done, or that already stands at ``--max-steps``, has nothing to do (exit 0).

The loop is :class:`selora.trainer.Trainer`, the run folder :mod:`selora.rundir`, the config
keys :class:`selora.config.TrainConfig`. Exit codes: 0 done, 1 training stopped (non-finite loss,
or a checkpoint that could not be written, e.g. a full disk: the previous one is intact), 2 bad
input (a one-line error naming the option or key; also a resume with no readable checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from selora.checkpoint import CheckpointWriteError
from selora.config import ConfigError, TrainConfig, load_config
from selora.data import DataError
from selora.distributed import close_distributed, default_device
from selora.layout import CONFIG
from selora.profile import profile, set_threads
from selora.trainer import NonFiniteLossError, Trainer

#: Keys that may change when resuming (nothing that changes the model, data or optimisation).
RESUME_KEYS = (
    "epochs",
    "checkpoint_every",
    "eval_every",
    "num_samples",
    "sample_steps",
    "guidance_scale",
    "max_bad_steps",
    "num_workers",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m selora.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="config file or shipped name (montgomery-offline, montgomery-paper, iuxray-paper)")
    ap.add_argument("--out", type=Path, help="run directory to create")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    ap.add_argument(
        "--max-steps",
        type=int,
        help="end training after this many optimizer steps in total (final adapters, ranks.json, best/)",
    )
    ap.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[TrainConfig, Path, bool]:
    """Check the command line and load the config; ConfigError on any problem, before any work."""
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps {args.max_steps}: expected an integer >= 1")
    if args.resume is not None:
        if args.config is not None:
            raise ConfigError("--resume takes the config from RUN_DIR/config.yaml; drop --config")
        if args.out is not None and args.out.resolve() != args.resume.resolve():
            raise ConfigError(f"--out {args.out} differs from --resume {args.resume}; a run resumes in place")
        saved = args.resume / CONFIG
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: not a run directory (no config.yaml)")
        bad = [o.partition("=")[0].strip() for o in args.overrides if o.partition("=")[0].strip() not in RESUME_KEYS]
        if bad:
            raise ConfigError(f"--set {bad[0]}: cannot change when resuming; only {', '.join(RESUME_KEYS)}")
        return load_config(saved, args.overrides), args.resume, True
    if args.config is None or args.out is None:
        raise ConfigError("expected --config FILE and --out RUN_DIR (or --resume RUN_DIR)")
    if args.out.exists() and any(args.out.iterdir()):
        raise ConfigError(f"--out {args.out}: exists and is not empty; use --resume {args.out} to continue it")
    return load_config(args.config, args.overrides), args.out, False


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 done, 1 training stopped (non-finite loss), 2 bad input."""
    args = parse_args(argv)
    try:
        cfg, run_dir, resume = resolve(args)
        threads = set_threads()
        if int(os.environ.get("RANK", "0")) == 0:  # the main process of a torchrun job (or the only one)
            print(
                f"selora.train: profile={profile()} device={default_device().type} threads={threads} "
                f"method={cfg.method} processes={os.environ.get('WORLD_SIZE', '1')} model={cfg.model} "
                f"dataset={cfg.dataset}",
                file=sys.stderr,  # stdout carries only the JSON summary
                flush=True,
            )
        trainer = Trainer(cfg, run_dir, resume=resume, max_steps=args.max_steps, progress=not args.no_progress)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = trainer.run()
    except (NonFiniteLossError, CheckpointWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        close_distributed()
    if trainer.dist.main:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
