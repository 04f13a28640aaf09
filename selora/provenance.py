"""Where the numbers of ``python -m selora.evaluate`` come from: the source commit, the data and
base-model digests, the metric weights, the resolved config and the library versions.

Everything returned is JSON-ready and free of absolute paths (:func:`provenance`).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diffusers
import peft
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save

import selora
from selora.config import TrainConfig
from selora.data import open_dataset
from selora.distributed import default_device
from selora.metrics import CLIP_MODEL_ID, LABELS
from selora.models import CLIP_TEXT_LEVEL, MINI_SD_DIR, SD15_MODEL_ID, without_clip_text_level
from selora.paths import repo_root
from selora.profile import profile as active_profile
from selora.proxies import load_proxy

__all__ = ["data_sha256", "folder_sha256", "git_commit", "metric_provenance", "model_provenance", "provenance"]


def _hashed_bytes(path: Path) -> bytes:
    """``path``'s bytes; a ``.safetensors`` file naming CLIP's ``text_model.`` level (transformers 4's and
    the hub's naming) as the file transformers 5 writes for the same tensors (the level dropped)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            if any(k.startswith(CLIP_TEXT_LEVEL) for k in f.keys()):
                return save(without_clip_text_level(load_file(str(path))), f.metadata())
    return path.read_bytes()


def folder_sha256(folder: Path) -> str:
    """sha256 over (relative path, bytes) of every file under ``folder``, in sorted order; hex. One text
    encoder has one digest whichever transformers major's naming its file uses (:func:`_hashed_bytes`)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(_hashed_bytes(path))
    return digest.hexdigest()


def data_sha256(cfg: TrainConfig) -> str:
    """sha256 of what the runs see: per split (train, ``eval_split``) the prompts and the
    preprocessed images ``(1, R, R)`` as float32 bytes, in data-set order; hex."""
    digest = hashlib.sha256()
    for split in ("train", cfg.eval_split):
        ds = open_dataset(cfg, split)
        digest.update(f"{split}:{len(ds)}\0".encode())
        for i in range(len(ds)):
            item = ds[i]
            digest.update(item["prompt"].encode() + b"\0")
            digest.update(item["image"].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def git_commit() -> dict[str, Any] | None:
    """``{"commit": hex, "dirty": bool}`` of the source checkout, or None outside a git checkout."""
    root = repo_root()
    if root is None:
        return None

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], check=False, cwd=root, capture_output=True, text=True, timeout=30)

    try:
        head, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def model_provenance(cfg: TrainConfig) -> dict[str, Any]:
    """The base model: hub id (paper) or the shipped / local folder's name and content hash."""
    if cfg.model == "sd-v1-5":
        return {"model": "sd-v1-5", "hub_id": SD15_MODEL_ID}
    folder = MINI_SD_DIR if cfg.model == "mini-sd" else Path(cfg.model)
    return {"model": cfg.model if cfg.model == "mini-sd" else folder.name, "sha256": folder_sha256(folder)}


def metric_provenance(profile: str) -> dict[str, Any]:
    """Which weights the metrics used: the shipped proxies' content hashes, or the paper's models."""
    if profile == "offline":
        return {
            kind: {"label": LABELS[key], "fingerprint": load_proxy(kind).fingerprint}
            for kind, key in (("frechet", "fid_proxy"), ("alignment", "alignment_proxy"))
        }
    return {"fid": "torchmetrics FrechetInceptionDistance(feature=2048), 299 px bilinear", "clip_score": CLIP_MODEL_ID}


def _portable(value: Any) -> Any:
    """An absolute path (a local model or data folder) reduced to its last part; anything else as is."""
    return Path(value).name if isinstance(value, str) and Path(value).is_absolute() else value


def provenance(
    cfg: TrainConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    config: str,
    overrides: Sequence[str],
    limit: int | None,
) -> dict[str, Any]:
    """Everything needed to say where the numbers come from (no absolute paths)."""
    name = active_profile()
    values = {k: _portable(v) for k, v in cfg.to_dict().items() if k not in ("method", "seed")}
    overrides = [f"{k}={_portable(v)}" for k, _, v in (o.partition("=") for o in overrides)]
    return {
        "profile": name,
        "model": model_provenance(cfg),
        "dataset": cfg.dataset,
        "data_sha256": data_sha256(cfg),
        "methods": list(methods),
        "seeds": list(seeds),
        "config": Path(config).name,
        "overrides": list(overrides),
        "resolved_config": values,
        "num_test_images": min(len(open_dataset(cfg, "test")), limit or math.inf),
        "metrics": metric_provenance(name),
        "git": git_commit(),
        "versions": {
            "selora": selora.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "device": default_device().type,
        "threads": torch.get_num_threads(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
