"""The captioned shapes domain: one object (shape, tone, size, stripes, one of nine cells) on a dark
background, at SIZE px, and uncaptioned generic images (gradients, soft ellipses, gratings) for the VAE.

Coordinates are drawn on a 64-unit canvas and scaled to SIZE. Everything is gray, like a radiograph:
objects differ in tone, not hue. Two builds with hues measured why: the x8 VAE (1.7 M parameters)
returned every hue as a gray (a judge read the hue of 23 % of its reconstructions, chance 14 %), with
and without a loss term on colour, while tones, shapes and positions came through.
"""

from __future__ import annotations

import numpy as np

SIZE = 128  # pixels
UNIT = SIZE / 64  # pixels per canvas unit
TONES = {"white": 0.95, "light": 0.75, "gray": 0.55, "dark": 0.35}  # the object's brightness; background <= 0.15
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (5.5, 7.5), "large": (10.5, 13.0)}  # radius range in canvas units
# Width of a stripe along x + y (canvas units): 7 makes bands ~10 px across, more than one latent cell
# (8 px); the first 128 px build's 3 (~4 px) came through the VAE for 70 % of striped objects and
# through the UNet for none.
STRIPE = 7
ROWS = {"upper": 15.0, "middle": 32.0, "lower": 49.0}  # y of the cell centre, canvas units
COLS = {"left": 15.0, "center": 32.0, "right": 49.0}
# How a cell is named in a caption; several phrasings per cell so the words, not one template, matter.
POSITION_PHRASES = {
    ("upper", "left"): ("in the upper left", "at the top left"),
    ("upper", "center"): ("at the top", "in the upper middle"),
    ("upper", "right"): ("in the upper right", "at the top right"),
    ("middle", "left"): ("on the left", "in the left middle"),
    ("middle", "center"): ("in the center", "in the middle"),
    ("middle", "right"): ("on the right", "in the right middle"),
    ("lower", "left"): ("in the lower left", "at the bottom left"),
    ("lower", "center"): ("at the bottom", "in the lower middle"),
    ("lower", "right"): ("in the lower right", "at the bottom right"),
}
# What a caption of this domain can state: attribute -> its classes.
ATTRIBUTES = {
    "shape": SHAPES,
    "tone": tuple(TONES),
    "size": tuple(SIZES),
    "row": tuple(ROWS),
    "col": tuple(COLS),
    "striped": ("plain", "striped"),
}


def _grid(supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in canvas units of a supersampled SIZE x SIZE image."""
    c = (np.arange(SIZE * supersample) + 0.5) / supersample / UNIT
    return np.meshgrid(c, c, indexing="ij")


YY, XX = _grid()


def _downsample(a: np.ndarray) -> np.ndarray:
    """Average 2x2 supersampled pixels: (2S, 2S) -> (S, S) antialiased coverage."""
    return a.reshape(SIZE, 2, SIZE, 2).mean(axis=(1, 3))


def shape_mask(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    """Antialiased coverage in [0, 1] of ``shape`` with centre (cy, cx) and radius r (canvas units); (S, S)."""
    dy, dx = YY - cy, XX - cx
    if shape == "circle":
        m = dx**2 + dy**2 <= r**2
    elif shape == "square":
        m = np.maximum(abs(dx), abs(dy)) <= 0.85 * r
    elif shape == "triangle":  # apex up, base at +0.8 r
        m = (dy <= 0.8 * r) & (abs(dx) <= (dy + r) / 1.8)
    elif shape == "cross":
        m = ((abs(dx) <= r / 3) & (abs(dy) <= r)) | ((abs(dy) <= r / 3) & (abs(dx) <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return _downsample(m.astype(np.float32))


def draw_attributes(rng: np.random.Generator) -> dict[str, str]:
    """One random object: a class of every attribute, stripes 30 % of the time."""
    attrs = {k: v[rng.integers(len(v))] for k, v in ATTRIBUTES.items() if k != "striped"}
    attrs["striped"] = "striped" if rng.random() < 0.3 else "plain"
    return attrs


def render(attrs: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """The image of ``attrs`` on a dark background: float32 (3, S, S) in [0, 1]."""
    lo, hi = SIZES[attrs["size"]]
    r = rng.uniform(lo, hi)
    cy = ROWS[attrs["row"]] + rng.uniform(-3, 3)
    cx = COLS[attrs["col"]] + rng.uniform(-3, 3)
    cover = shape_mask(attrs["shape"], cy, cx, r)
    if attrs["striped"] == "striped":  # dark diagonal bands across the object, ~10 px wide
        cover = cover * _downsample(np.where(((XX + YY) // STRIPE) % 2 == 0, 1.0, 0.25).astype(np.float32))
    tone = np.clip(TONES[attrs["tone"]] + rng.normal(0, 0.02), 0, 1)
    background = rng.uniform(0.0, 0.15)
    img = background + cover * (tone - background)
    return np.repeat(img[None], 3, axis=0).astype(np.float32)


def caption(attrs: dict[str, str], rng: np.random.Generator, drop: float = 0.15) -> str:
    """A caption naming the object; size, tone, stripes and position each left out with probability ``drop``."""
    words = []
    if rng.random() >= drop:
        words.append(attrs["size"])
    if attrs["striped"] == "striped" and rng.random() >= drop:
        words.append("striped")
    if rng.random() >= drop:
        words.append(attrs["tone"])
    words.append(attrs["shape"])
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    if rng.random() >= drop:
        phrases = POSITION_PHRASES[(attrs["row"], attrs["col"])]
        text += " " + phrases[rng.integers(len(phrases))]
    return text


_PHRASE_CELL = {phrase: cell for cell, phrases in POSITION_PHRASES.items() for phrase in phrases}


def stated(text: str) -> dict[str, str]:
    """The attributes a caption of this domain states (a plain object states no stripes)."""
    words = text.split()
    out = {k: c for k in ("shape", "tone", "size") for c in ATTRIBUTES[k] if c in words}
    if "striped" in words:
        out["striped"] = "striped"
    for phrase, (row, col) in _PHRASE_CELL.items():
        if text.endswith(" " + phrase):
            out["row"], out["col"] = row, col
    return out


def generic_image(rng: np.random.Generator) -> np.ndarray:
    """An uncaptioned gray image for the VAE: gradient, soft ellipses, maybe a grating; (3, S, S) in [0, 1]."""
    y, x = YY[::2, ::2] / 64, XX[::2, ::2] / 64
    img = rng.uniform(0, 0.6) + rng.uniform(-0.3, 0.3) * (x if rng.random() < 0.5 else y)
    for _ in range(rng.integers(2, 9)):
        cy, cx = rng.uniform(0, 1, 2)
        ay, ax = rng.uniform(0.04, 0.35, 2)
        theta = rng.uniform(0, np.pi)
        u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
        d = (u / ax) ** 2 + (v / ay) ** 2
        alpha = 0.5 - 0.5 * np.tanh((d - 1) * rng.uniform(1.5, 15))  # soft or sharp edge
        img = img + alpha * (rng.uniform(0, 1) - img) * rng.uniform(0.3, 1.0)
    if rng.random() < 0.4:  # a grating, from wide bands to rib-like stripes
        f, phi = rng.uniform(1, 24), rng.uniform(0, np.pi)
        img = img + rng.uniform(0.05, 0.25) * np.sin(2 * np.pi * f * (x * np.cos(phi) + y * np.sin(phi)))
    img = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
    return np.repeat(img[None], 3, axis=0).astype(np.float32)
