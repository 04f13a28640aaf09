"""Shared test settings: one torch thread per test process (two cores are shared)."""

import os

os.environ.setdefault("SELORA_PROFILE", "offline")

import torch  # noqa: E402

torch.set_num_threads(1)
