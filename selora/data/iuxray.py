"""IU X-ray (Indiana University chest X-rays, the paper's first data set): loader only.

Two layouts are recognised under ``root``:

* Open-i release: ``ecgen-radiology/*.xml`` (one report each) + ``NLMCXR_png/<image id>.png``.
  The XML carries no view label: the first ``parentImage`` of a report is taken as the frontal
  view unless an ``indiana_projections.csv`` lies in ``root`` (then its labels are used).
* CSV variant: ``indiana_reports.csv`` (uid, findings, ...) + ``indiana_projections.csv``
  (uid, filename, projection) + the PNGs in ``images/images_normalized/``, ``images/`` or ``root``.

Frontal views only; the prompt is the report's FINDINGS text (reports without findings are
skipped); split 80/16/4 train/validation/test **by report**, so no study crosses splits.
"""

from __future__ import annotations

import csv
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from selora.data.cache import ImageStack
from selora.data.errors import DataError
from selora.data.split import grouped_split

SPLITS = {"train": 0.80, "validation": 0.16, "test": 0.04}
REPORTS_CSV, PROJECTIONS_CSV = "indiana_reports.csv", "indiana_projections.csv"
KEY_RE = re.compile(r"^(?:CXR)?(\d+)(?:_\d+)?_(IM-\d+-\d+)", re.I)


@dataclass(frozen=True)
class Study:
    """One frontal image of one report."""

    uid: str  # report id; the split groups by it
    image: Path
    findings: str

    @property
    def prompt(self) -> str:
        """The text condition: the findings, whitespace collapsed."""
        return self.findings


def _clean(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of ``path`` as dicts; a missing column is a one-line error."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
            return list(reader)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _frontal_from_csv(path: Path) -> dict[str, list[str]]:
    """uid -> frontal file names, from a projections CSV."""
    out: dict[str, list[str]] = {}
    for row in _read_csv(path, ("uid", "filename", "projection")):
        if row["projection"].strip().lower() == "frontal":
            out.setdefault(row["uid"].strip(), []).append(row["filename"].strip())
    return out


def _image_key(name: str) -> str:
    """Shared key of both layouts' names: ``CXR1_1_IM-0001-4001`` ~ ``1_IM-0001-4001.dcm.png`` -> ``1_IM-0001-4001``."""
    match = KEY_RE.search(name)
    return f"{match.group(1)}_{match.group(2)}" if match else name.split(".")[0]


def load_openi(root: Path) -> list[Study]:
    """Studies of the Open-i XML + PNG layout."""
    frontal_csv = root / PROJECTIONS_CSV
    frontal_keys = None
    if frontal_csv.is_file():
        frontal_keys = {_image_key(f) for names in _frontal_from_csv(frontal_csv).values() for f in names}
    studies = []
    for xml in sorted((root / "ecgen-radiology").glob("*.xml")):
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as err:
            raise DataError(f"{xml}: not well-formed XML ({err}); expected an Open-i report") from None
        findings = _clean(next((a.text for a in tree.iter("AbstractText") if a.get("Label") == "FINDINGS"), ""))
        ids = [img.get("id") for img in tree.iter("parentImage") if img.get("id")]
        if frontal_keys is not None:
            ids = [i for i in ids if _image_key(i) in frontal_keys]
        else:
            ids = ids[:1]
        if findings:
            studies += [Study(xml.stem, root / "NLMCXR_png" / f"{i}.png", findings) for i in ids]
    return studies


def load_csv(root: Path) -> list[Study]:
    """Studies of the CSV variant (reports CSV + projections CSV + images)."""
    folders = [root / "images" / "images_normalized", root / "images", root]
    folder = next((f for f in folders if f.is_dir() and any(f.glob("*.png"))), root)
    frontal = _frontal_from_csv(root / PROJECTIONS_CSV)
    studies = []
    for row in _read_csv(root / REPORTS_CSV, ("uid", "findings")):
        uid, findings = row["uid"].strip(), _clean(row["findings"])
        if findings:
            studies += [Study(uid, folder / name, findings) for name in frontal.get(uid, [])]
    return studies


def scan_iuxray(root: Path | str) -> list[Study]:
    """Frontal studies with findings under ``root`` (either layout), images checked to exist."""
    root = Path(root)
    if (root / "ecgen-radiology").is_dir():
        studies = load_openi(root)
    elif (root / REPORTS_CSV).is_file() and (root / PROJECTIONS_CSV).is_file():
        studies = load_csv(root)
    else:
        raise DataError(
            f"{root}: no IU X-ray layout found; expected ecgen-radiology/ + NLMCXR_png/ (Open-i) "
            f"or {REPORTS_CSV} + {PROJECTIONS_CSV} + images/ (CSV variant)"
        )
    missing = [s for s in studies if not s.image.is_file()]
    if missing:
        warnings.warn(
            f"{root}: {len(missing)} referenced image(s) missing, e.g. {missing[0].image}; skipped", stacklevel=2
        )
    studies = [s for s in studies if s.image.is_file()]
    if not studies:
        raise DataError(f"{root}: no frontal image with a FINDINGS text")
    return studies


def split_studies(studies: Sequence[Study], seed: int = 0) -> dict[str, list[int]]:
    """80/16/4 train/validation/test by report id, deterministic in ``seed``."""
    return grouped_split([s.uid for s in studies], SPLITS, seed)


class IUXrayDataset(Dataset):
    """Map-style IU X-ray set; ``ds[i]`` = ``{"image": (1, size, size) in [-1, 1], "prompt", "uid"}``."""

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        size: int = 224,
        seed: int = 0,
        cache: bool = True,
        cache_dir: Path | str | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
        all_studies = scan_iuxray(root)
        self.studies = [all_studies[i] for i in split_studies(all_studies, seed)[split]]
        self.pixels = ImageStack(
            [s.image for s in self.studies], size, f"iuxray-{split}", cache, cache_dir, dtype=torch.float16
        )  # ~3,300 images: half the memory, ~1e-3 precision
        self.from_cache, self.cache_path = self.pixels.from_cache, self.pixels.path

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> dict:
        study = self.studies[i]
        return {"image": self.pixels[i], "prompt": study.prompt, "uid": study.uid}
