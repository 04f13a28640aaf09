"""Run profiles: ``paper`` (hub SD v1.5, real Montgomery data, GPU) and ``offline``.

One code path serves both; only where weights and data come from differs.
``SELORA_PROFILE`` wins; otherwise ``paper`` when CUDA is available, else ``offline``.
The offline profile never downloads anything.
"""

from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch

from selora.distributed import default_device

PROFILES = ("offline", "paper")


def profile() -> str:
    """Return the active profile name, ``"offline"`` or ``"paper"``."""
    env = os.environ.get("SELORA_PROFILE", "").strip().lower()
    if env:
        if env not in PROFILES:
            raise ValueError(f"SELORA_PROFILE={env!r}: expected one of {', '.join(PROFILES)}")
        return env
    return "paper" if torch.cuda.is_available() else "offline"


def require_online(what: str) -> None:
    """Raise when ``what`` (a download) is attempted in the offline profile."""
    if profile() == "offline":
        raise RuntimeError(
            f"{what} needs the network, but the profile is 'offline' "
            "(set SELORA_PROFILE=paper on a machine with internet access)"
        )


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count deliberately and return it.

    ``n`` wins, then ``SELORA_THREADS``/``OMP_NUM_THREADS``; otherwise the cores are shared
    evenly among the processes of a ``torchrun`` job (``LOCAL_WORLD_SIZE``), at least one each.
    Default threading on shared cores has been measured to slow small models ~20x.
    """
    if n is None:
        env = os.environ.get("SELORA_THREADS") or os.environ.get("OMP_NUM_THREADS")
        if env:
            n = int(env)
        else:
            procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            n = max(1, (os.cpu_count() or 1) // procs)
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def setup(seed: int = 0) -> dict[str, object]:
    """What the first cell of every chapter calls: seed, set threads, print the run's identity."""
    seed_everything(seed)
    threads = set_threads()
    info: dict[str, object] = {
        "profile": profile(),
        "device": str(default_device()),
        "seed": seed,
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("diffusers", "transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = "not installed"
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    return info
