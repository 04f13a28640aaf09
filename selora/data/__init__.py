"""Data: the Montgomery CXR set (real download or a procedural phantom in the same layout) and IU X-ray.

:data:`DATASETS` (:mod:`selora.data.registry`) lists the data sets a config can name;
:func:`open_dataset` opens a split of the one a config names.

``montgomery_root()`` is what the trainer and the chapters call: in the offline profile it
writes the phantom set into ``selora.paths.cache_dir("data", ...)`` on first use; in the paper
profile it downloads the real set there (NLM's terms: never redistribute or commit its files).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from selora.data.errors import DataError
from selora.data.registry import DATASETS, DataConfig, DataSet, montgomery_root

if TYPE_CHECKING:
    from torch.utils.data import Dataset

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


def open_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The map-style data set of ``split`` of ``cfg.dataset`` (:data:`DATASETS`; items: ``"image"``
    ``(1, R, R)`` in [-1, 1] at ``cfg.resolution``, ``"prompt"``); a Montgomery root is made or
    downloaded on first use."""
    return DATASETS[cfg.dataset].open(cfg, split)


def split_prompts(cfg: DataConfig, split: str) -> list[str]:
    """The prompts of ``split`` of the run's data set, in data-set order."""
    ds = open_dataset(cfg, split)
    return [ds[i]["prompt"] for i in range(len(ds))]


__all__ = [
    "DATASETS",
    "PROMPT_FORMAT",
    "Case",
    "DataError",
    "DataSet",
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
