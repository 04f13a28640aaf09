"""Tuberculosis findings drawn in 3D into the chest CT, in the lobe and side a reading names.

Every finding changes the per-scan attenuation volumes (:class:`Volumes`) on the CT's working grid
before projection, so it is projected with the anatomy: an infiltrate is denser where it is
thicker, a cavity's air shows through its rim, an effusion's meniscus comes from a fluid level
that rises towards the chest wall. Where a reading puts it (TotalSegmentator lobes: upper lobes
10 (left) and 12 (right), middle lobe 13, lower lobes 11 and 14; heart 51):

- ``infiltrate``: patchy consolidation in the upper part of the upper lobe;
- ``cavity``: an air sphere with a dense wall inside such a consolidation;
- ``scarring``: fibrotic streaks from the apex towards the hilum, with an apical cap;
- ``granuloma``: a small calcified nodule in the middle third of the lung;
- ``effusion``: fluid filling the lung base up to a level that rises laterally (meniscus);
- ``thickening``: a soft-tissue rind along the lateral pleura;
- ``adenopathy``: enlarged nodes at the hilum;
- ``cardiomegaly``: the heart enlarged about its centre (side ignored).

Sides are the patient's (``"right"``, ``"left"``, ``"bilateral"``). Coordinates are mm on the
working grid: x from the patient's right to left, y posterior to anterior, z feet to head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

SIDES = ("right", "left")
WATER = 1.0  # attenuation of fluid and soft tissue relative to water


@dataclass
class Thorax:
    """The CT's anatomy on the working grid, shared by every scan (tensors (X, Y, Z)).

    ``coords``: (x, y, z) mm of every voxel centre; ``lungs``/``lobes``: bool masks by side and by
    (side, lobe); ``heart``: bool; ``spacing``: mm per voxel.
    """

    coords: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    lungs: dict[str, torch.Tensor]
    lobes: dict[tuple[str, str], torch.Tensor]
    heart: torch.Tensor
    spacing: tuple[float, float, float]
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # derived masks, computed once

    def once(self, key: tuple, make: Callable[[], object]):
        """``make()``, computed on the first call with ``key`` and kept: scans share the anatomy."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def extent(self, side: str) -> tuple[float, float]:
        """(lowest, highest) z in mm of the lung on ``side``."""

        def make() -> tuple[float, float]:
            z = self.coords[2][self.lungs[side]]
            return float(z.min()), float(z.max())

        return self.once(("extent", side), make)

    def band(self, side: str, lo: float, hi: float) -> torch.Tensor:
        """Voxels of the ``side`` lung between height fractions ``lo`` and ``hi`` (0 base, 1 apex)."""

        def make() -> torch.Tensor:
            z0, z1 = self.extent(side)
            z = self.coords[2]
            return self.lungs[side] & (z >= z0 + lo * (z1 - z0)) & (z <= z0 + hi * (z1 - z0))

        return self.once(("band", side, lo, hi), make)

    def eroded(self, key: tuple, mask: Callable[[], torch.Tensor], steps: int) -> torch.Tensor:
        """The mask made by ``mask()`` (named by ``key``) shrunk by ``steps`` voxels, kept."""
        return self.once(("eroded", *key, steps), lambda: _erode(mask(), steps))

    def hilum(self, side: str) -> tuple[float, float, float]:
        """The hilum of ``side``: where the lung's medial border lies at 55-65 % of its height (the median
        over the border's voxels), in mm."""

        def make() -> tuple[float, float, float]:
            band = self.band(side, 0.55, 0.65)
            x = self.coords[0]
            if side == "right":  # the right lung lies at small x: its medial border is its largest x
                edge = torch.where(band, x, torch.full_like(x, -1e9)).amax(0)
            else:
                edge = torch.where(band, x, torch.full_like(x, 1e9)).amin(0)
            found = band.any(0)  # (Y, Z) lines that cross the band
            y, z = (c[0][found] for c in self.coords[1:])
            return float(edge[found].median()), float(y.median()), float(z.median())

        return self.once(("hilum", side), make)

    def box(self, centre: Sequence[float], radius: float) -> tuple[slice, slice, slice]:
        """Index slices of the voxels within ``radius`` mm (per axis) of ``centre``."""
        return tuple(
            slice(max(0, int((c - radius) / s)), max(0, int((c + radius) / s) + 2))
            for c, s in zip(centre, self.spacing)
        )


@dataclass
class Volumes:
    """The per-scan volumes a finding changes: ``water`` and ``bone`` attenuation, ``heart`` occupancy."""

    water: torch.Tensor
    bone: torch.Tensor
    heart: torch.Tensor

    def fill(self, amount: torch.Tensor, box: tuple[slice, ...] = (slice(None),) * 3, target: float = WATER) -> None:
        """Move attenuation towards ``target`` by ``amount`` in [0, 1] per voxel of ``box``."""
        water = self.water[box]
        water += amount * (target - water)


def _erode(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """``mask`` shrunk by ``steps`` voxels (3 x 3 x 3 minimum filter), bool; computed in its bounding box."""
    idx = torch.nonzero(mask)
    box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0).values, idx.max(0).values))
    m = F.pad(mask[box].float()[None, None], (1,) * 6)
    for _ in range(steps):
        m = -F.max_pool3d(-m, 3, stride=1, padding=1)
    out = torch.zeros_like(mask)
    out[box] = m[0, 0, 1:-1, 1:-1, 1:-1] > 0.5
    return out


def _pick(mask: torch.Tensor, th: Thorax, rng: np.random.Generator) -> tuple[float, float, float]:
    """A random voxel of ``mask`` (its centre in mm)."""
    idx = torch.nonzero(mask)
    i, j, k = idx[int(rng.integers(len(idx)))].tolist()
    return tuple(float(c[i, j, k]) for c in th.coords)


def _local(th: Thorax, box: tuple[slice, ...]) -> tuple[torch.Tensor, ...]:
    """The coordinates (x, y, z) of the voxels of ``box``."""
    return tuple(c[box] for c in th.coords)


def _ball(th: Thorax, box, centre, radius: float, scale=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Soft occupancy in [0, 1] over ``box`` of a ball (an ellipsoid: radii ``radius`` x ``scale``), edge one voxel."""
    dist = sum(((c - p) / s) ** 2 for c, p, s in zip(_local(th, box), centre, scale)).sqrt()
    return ((radius - dist) / th.spacing[0] + 0.5).clamp(0.0, 1.0)


def _smooth_noise(shape: torch.Size, rng: np.random.Generator, cells: int) -> torch.Tensor:
    """A smooth random field in [0, 1] of ``shape``: ``cells`` random values per axis, interpolated."""
    coarse = torch.from_numpy(rng.random((1, 1, cells, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]


def _upper_zone(th: Thorax, side: str, steps: int = 2) -> torch.Tensor:
    """Upper-lobe voxels in the top 45 % of the lung, ``steps`` voxels from the lobe's surface."""
    lobe = th.eroded(("upper", side), lambda: th.lobes[(side, "upper")], steps)
    return th.once(("upper zone", side, steps), lambda: lobe & th.band(side, 0.55, 0.97))


def _consolidation(vol: Volumes, th: Thorax, side: str, centre, rng: np.random.Generator, strength: float) -> None:
    """Patchy air-space opacity around ``centre``: a few blurred blobs, broken up by smooth noise, in the lung."""
    box = th.box(centre, 60.0)
    blobs = torch.zeros_like(vol.water[box])
    for _ in range(6):
        at = tuple(p + d for p, d in zip(centre, rng.normal(0, (12, 10, 14))))
        blobs = torch.maximum(blobs, _ball(th, box, at, float(rng.uniform(18, 28)), (1.0, 0.9, 1.2)))
    patchy = (2.0 * _smooth_noise(blobs.shape, rng, 6) - 0.3).clamp(0.0, 1.0)
    vol.fill(strength * blobs * patchy * th.lungs[side][box], box)


def _infiltrate(vol: Volumes, th: Thorax, side: str, rng: np.random.Generator) -> None:
    _consolidation(vol, th, side, _pick(_upper_zone(th, side), th, rng), rng, float(rng.uniform(0.8, 0.95)))


def _cavity(vol: Volumes, th: Thorax, side: str, rng: np.random.Generator) -> None:
    """A thick-walled air cavity (radius 10-15 mm, wall 3-4 mm) in a consolidation."""
    centre = _pick(_upper_zone(th, side, 4), th, rng)
    _consolidation(vol, th, side, centre, rng, 0.45)
    r = float(rng.uniform(10, 15))
    box = th.box(centre, r + 6)
    vol.fill(_ball(th, box, centre, r + float(rng.uniform(3, 4))), box)
    vol.water[box] *= 1.0 - _ball(th, box, centre, r)


def _scarring(vol: Volumes, th: Thorax, side: str, rng: np.random.Generator) -> None:
    """Streaks (2.5 mm thick) from apical points towards the hilum, and a pleural cap over the apex."""
    hilum = np.array(th.hilum(side))
    lung = th.lungs[side]
    for _ in range(int(rng.integers(4, 7))):
        start = np.array(_pick(th.band(side, 0.8, 0.97), th, rng))
        d = (hilum - start) * rng.uniform(0.5, 0.8)
        box = th.box(start + d / 2, float(np.abs(d).max()) / 2 + 6)
        x, y, z = (c - p for c, p in zip(_local(th, box), start))
        t = ((x * d[0] + y * d[1] + z * d[2]) / float(d @ d)).clamp(0.0, 1.0)
        dist = ((x - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (z - t * d[2]) ** 2).sqrt()
        vol.fill(0.9 * ((2.5 - dist) / th.spacing[0] + 0.5).clamp(0.0, 1.0) * lung[box], box)
    cap = th.once(("cap", side), lambda: lung & ~th.eroded(("lung", side), lambda: lung, 2) & th.band(side, 0.85, 1.0))
    vol.fill(0.9 * cap.float())


def _granuloma(vol: Volumes, th: Thorax, side: str, rng: np.random.Generator) -> None:
    """A calcified nodule, radius 6-8 mm, in the middle third of the lung."""
    zone = th.once(("mid", side), lambda: _erode(th.band(side, 0.35, 0.6), 3))
    centre = _pick(zone, th, rng)
    r = float(rng.uniform(6, 8))
    box = th.box(centre, r + 4)
    ball = _ball(th, box, centre, r)
    vol.fill(ball, box)
    vol.bone[box] += 1.2 * ball


def _effusion(vol: Volumes, th: Thorax, side: str, rng: np.random.Generator) -> None:
    """Fluid filling the lung up to a level 25-60 mm above its lowest point, 15-35 mm higher at the chest wall."""
    lung = th.lungs[side]

    def lateral() -> torch.Tensor:  # 0 at the lung's medial edge, 1 at its lateral edge, squared
        x = th.coords[0]
        xs = x[lung]
        medial, outer = (xs.max(), xs.min()) if side == "right" else (xs.min(), xs.max())
        return ((x - medial) / (outer - medial)).clamp(0.0, 1.0) ** 2

    level = (
        th.extent(side)[0] + float(rng.uniform(25, 60)) + float(rng.uniform(15, 35)) * th.once(("lat", side), lateral)
    )
    vol.fill(((level - th.coords[2]) / th.spacing[2] + 0.5).clamp(0.0, 1.0) * lung)


def _thickening(vol: Volumes, th: Thorax, side: str, rng: np.random.Generator) -> None:
    """A 3-6 mm soft-tissue rind inside the lateral pleura, from 15 % to 90 % of the lung's height."""
    lung = th.lungs[side]
    steps = int(rng.integers(1, 3))

    def rind() -> torch.Tensor:
        x = th.coords[0]
        centre = float(x[lung].mean())
        lateral = (x < centre - 20) if side == "right" else (x > centre + 20)
        return lung & ~th.eroded(("lung", side), lambda: lung, steps) & lateral & th.band(side, 0.15, 0.9)

    vol.fill(th.once(("rind", side, steps), rind).float())


def _adenopathy(vol: Volumes, th: Thorax, side: str, rng: np.random.Generator) -> None:
    """Lobulated hilar nodes: two or three soft-tissue ellipsoids (radius 12-18 mm) at and lateral to the hilum."""
    hx, hy, hz = th.hilum(side)
    out = 1.0 if side == "left" else -1.0  # towards the chest wall
    for _ in range(int(rng.integers(2, 4))):
        at = (hx + out * float(rng.uniform(10, 22)), hy + float(rng.normal(0, 6)), hz + float(rng.normal(0, 12)))
        r = float(rng.uniform(12, 18))
        box = th.box(at, 1.3 * r + 3)
        vol.fill(_ball(th, box, at, r, (1.0, 1.0, 1.3)), box)


def _cardiomegaly(vol: Volumes, th: Thorax, side: str, rng: np.random.Generator) -> None:
    """The heart scaled about its centre (x 1.2-1.35, y and z 1.1-1.2); what it covers becomes soft tissue."""
    heart = th.heart.float()
    centre = th.once(("heart centre",), lambda: [float((c * heart).sum() / heart.sum()) for c in th.coords])
    grow = (float(rng.uniform(1.2, 1.35)), float(rng.uniform(1.1, 1.2)), float(rng.uniform(1.1, 1.2)))
    box = th.box(centre, 110.0)
    shape = torch.tensor(heart.shape, dtype=torch.float32)
    spacing = torch.tensor(th.spacing)
    # Sample the heart at points pulled towards its centre: p -> centre + (p - centre) / grow.
    pts = torch.stack([(c - p) / g + p for c, p, g in zip(_local(th, box), centre, grow)], dim=-1)
    norm = pts / (shape * spacing) * 2 - 1  # voxel centres sit at (index + 0.5) x spacing
    big = F.grid_sample(heart[None, None], norm.flip(-1)[None], align_corners=False)[0, 0].clamp(0.0, 1.0)
    vol.fill(big * (vol.bone[box] == 0), box)
    vol.heart[box] = torch.maximum(vol.heart[box], big)


DRAW = {
    "infiltrate": _infiltrate,
    "cavity": _cavity,
    "scarring": _scarring,
    "granuloma": _granuloma,
    "effusion": _effusion,
    "thickening": _thickening,
    "adenopathy": _adenopathy,
    "cardiomegaly": _cardiomegaly,
}


def draw_finding(vol: Volumes, th: Thorax, kind: str, side: str, rng: np.random.Generator) -> None:
    """Draw finding ``kind`` on ``side`` (``"bilateral"``: both) into ``vol`` in place."""
    if kind == "cardiomegaly":
        _cardiomegaly(vol, th, side, rng)
        return
    for s in SIDES if side == "bilateral" else (side,):
        DRAW[kind](vol, th, s, rng)
