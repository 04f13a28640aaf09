"""Captioned radiographs of other views of the chest CT: lateral and oblique, facing left or right.

They give the pretrained mini SD radiograph texture (bone, lung, soft tissue, detector noise) from
the same CT as the stand-in scans, but never the frontal view the fine-tune learns and never a
finding (every patient is normal; captions name only the view and the facing side), as SD v1.5 had
seen radiographs but not Montgomery's frontal TB scans and their readings.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from selora.data.drr import Scene, View, random_patient, render_view
from selora.data.images import resize_center_crop
from selora.minisd.shapes import SIZE

RENDER_SIZE = (128, 156)  # width, height: the stand-in scans' size, cropped to SIZE as the loader does
# view -> (yaw range in degrees for a patient facing left (mirrored for right), rays' depth mm, dose)
VIEWS = {"lateral": ((82.0, 98.0), 420.0, 0.75), "oblique": ((35.0, 55.0), 380.0, 0.85)}
FACING = ("left", "right")
ATTRIBUTES = {"view": tuple(VIEWS), "facing": FACING}
PHRASES = {
    "lateral": ("a lateral chest radiograph", "a lateral radiograph of the chest", "a lateral view of the chest"),
    "oblique": ("an oblique chest radiograph", "an oblique radiograph of the chest", "an oblique view of the chest"),
}


def draw_attributes(rng: np.random.Generator) -> dict[str, str]:
    """A random view and facing side."""
    return {"view": tuple(VIEWS)[rng.integers(len(VIEWS))], "facing": FACING[rng.integers(len(FACING))]}


def render(attrs: dict[str, str], scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A normal patient radiographed from ``attrs``' view: float32 (3, SIZE, SIZE) in [0, 1], gray."""
    (lo, hi), depth, dose = VIEWS[attrs["view"]]
    yaw = rng.uniform(lo, hi) * (1 if attrs["facing"] == "left" else -1)
    patient = random_patient(rng, abnormal=False)
    with torch.no_grad():
        pixels = render_view(patient, scene, RENDER_SIZE, rng, View(yaw, depth, dose))
    gray = (resize_center_crop(torch.from_numpy(pixels / 4095.0), SIZE) + 1) / 2
    return gray.expand(3, -1, -1).numpy().astype(np.float32)


def caption(attrs: dict[str, str], rng: np.random.Generator, drop: float = 0.15) -> str:
    """``"a lateral chest radiograph, patient facing left"``; the facing side left out with probability ``drop``."""
    phrases = PHRASES[attrs["view"]]
    text = phrases[rng.integers(len(phrases))]
    if rng.random() >= drop:
        text += f", patient facing {attrs['facing']}" if rng.random() < 0.5 else f", facing {attrs['facing']}"
    return text


def stated(text: str) -> dict[str, str]:
    """The attributes a caption of this domain states."""
    words = text.replace(",", " ").split()
    view = next((word for word in words if word in VIEWS), None)
    out = {} if view is None else {"view": view}
    for side in FACING:
        if text.endswith("facing " + side):
            out["facing"] = side
    return out


def render_set(n: int, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, str]]]:
    """``n`` random views: uint8 images (n, 3, SIZE, SIZE) and their attributes."""
    attrs = [draw_attributes(rng) for _ in range(n)]
    seeds = rng.integers(2**62, size=n)
    imgs = np.stack(
        [
            np.round(render(a, scene, np.random.default_rng(int(s))) * 255).astype(np.uint8)
            for a, s in zip(tqdm(attrs, desc="views", leave=False), seeds)
        ]
    )
    return imgs, attrs
