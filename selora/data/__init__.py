"""Data: the Montgomery CXR set (real download or a procedural phantom in the same layout) and IU X-ray.

``montgomery_root()`` is what the trainer and the chapters call: in the offline profile it
writes the phantom set into ``selora.paths.cache_dir("data", ...)`` on first use; in the paper
profile it downloads the real set there (NLM's terms: never redistribute or commit its files).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from selora.data.errors import DataError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from selora.config import TrainConfig

# Re-exports load lazily (PEP 562) so ``python -m selora.data.phantom`` / ``.montgomery`` run cleanly.
_EXPORTS = {
    "IUXrayDataset": "iuxray",
    "scan_iuxray": "iuxray",
    "PROMPT_FORMAT": "montgomery",
    "Case": "montgomery",
    "MontgomeryDataset": "montgomery",
    "download_montgomery": "montgomery",
    "make_prompt": "montgomery",
    "parse_readings": "montgomery",
    "scan": "montgomery",
    "split_indices": "montgomery",
    "summarise": "montgomery",
    "make_phantom_set": "phantom",
}


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"selora.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'selora.data' has no attribute {name!r}")


def montgomery_root(profile: str | None = None, phantom_size: tuple[int, int] | None = None) -> Path:
    """The Montgomery data root (the folder holding ``MontgomerySet/``), made on first use.

    ``profile`` defaults to ``selora.profile()``: ``"offline"`` -> the phantom set (seed 0,
    ``phantom_size`` = (width, height), default 256x312) under ``cache_dir("data",
    "montgomery-phantom-WxH")``; ``"paper"`` -> the real set downloaded under
    ``cache_dir("data", "montgomery")``.
    """
    from selora.data.montgomery import download_montgomery
    from selora.data.phantom import DEFAULT_SIZE, make_phantom_set
    from selora.paths import cache_dir
    from selora.profile import profile as active_profile

    name = profile or active_profile()
    if name == "offline":
        w, h = phantom_size or DEFAULT_SIZE
        root = cache_dir("data", f"montgomery-phantom-{w}x{h}")
        if not (root / "MontgomerySet").is_dir():
            try:
                make_phantom_set(root, seed=0, size=(w, h))
            except OSError:  # another process finished it first
                if not (root / "MontgomerySet").is_dir():
                    raise
        return root
    if name == "paper":
        root = cache_dir("data", "montgomery")
        download_montgomery(root)
        return root
    raise DataError(f"profile={name!r}: expected 'offline' or 'paper'")


def open_dataset(cfg: TrainConfig, split: str) -> Dataset:
    """The map-style data set of ``split`` of ``cfg.dataset`` (items: ``"image"`` ``(1, R, R)`` in
    [-1, 1] at ``cfg.resolution``, ``"prompt"``); the Montgomery root is made or downloaded on first use."""
    if cfg.dataset == "iuxray":
        from selora.data.iuxray import IUXrayDataset

        return IUXrayDataset(cfg.data_root, split, size=cfg.resolution, seed=cfg.split_seed)
    from selora.data.montgomery import MontgomeryDataset

    root = cfg.data_root
    if root is None:
        root = montgomery_root("offline" if cfg.dataset == "montgomery-phantom" else "paper")
    return MontgomeryDataset(root, split, size=cfg.resolution, seed=cfg.split_seed, validation=cfg.validation_fraction)


def split_prompts(cfg: TrainConfig, split: str) -> list[str]:
    """The prompts of ``split`` of the run's data set, in data-set order."""
    ds = open_dataset(cfg, split)
    return [ds[i]["prompt"] for i in range(len(ds))]


__all__ = [
    "PROMPT_FORMAT",
    "Case",
    "DataError",
    "IUXrayDataset",
    "MontgomeryDataset",
    "download_montgomery",
    "make_phantom_set",
    "make_prompt",
    "montgomery_root",
    "open_dataset",
    "parse_readings",
    "scan",
    "scan_iuxray",
    "split_indices",
    "split_prompts",
    "summarise",
]
