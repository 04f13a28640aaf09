"""Figures of chapter 5 for the DRR stand-in scans: how one is made (CT slice, lobe labels, projection)
and a sheet of generated scans with their readings."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from selora.book.scan_figures import case_grid
from selora.data.ct import LOBES, ChestCT
from selora.data.drr import DEFAULT_SIZE, build_scene, render
from selora.data.images import read_gray
from selora.data.montgomery import scan
from selora.data.phantom import Patient

LOBE_COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#CC79A7", "#D55E00"]  # five lobes, then the heart


def _coronal(volume: np.ndarray, y: int) -> np.ndarray:
    """The coronal slice at index ``y`` of an (X, Y, Z) volume as an image: head up, patient's right on the left."""
    return volume[:, y, :].T[::-1]


def how_made_figure(ct: ChestCT, seed: int = 0) -> Figure:
    """Three panels: a coronal CT slice (attenuation), its lobe and heart labels, and a DRR of an
    average patient without findings (``seed`` draws the exposure)."""
    labels = np.zeros(ct.labels.shape, np.int64)
    for i, name in enumerate([*LOBES.values(), "heart"], start=1):
        labels[ct.mask(name).numpy()] = i
    y = int(np.argmax((labels > 0).sum(axis=(0, 2))))  # the slice with the most lung and heart
    aspect = ct.spacing[2] / ct.spacing[0]
    fig, axes = plt.subplots(1, 3, figsize=(10, 4.2))
    axes[0].imshow(_coronal(ct.water.numpy(), y), cmap="gray", vmin=0, vmax=1.4, aspect=aspect)
    axes[0].set_title("CT, coronal slice: attenuation / water", fontsize=8)
    axes[1].imshow(_coronal(ct.water.numpy(), y), cmap="gray", vmin=0, vmax=1.4, aspect=aspect)
    shown = np.ma.masked_equal(_coronal(labels, y), 0)
    axes[1].imshow(shown, cmap=ListedColormap(LOBE_COLOURS), vmin=1, vmax=6, alpha=0.6, aspect=aspect)
    axes[1].set_title("labels: 5 lung lobes and the heart", fontsize=8)
    plain = Patient("M", 45, "M", {"width": 1.0, "depth": 1.0, "height": 1.0, "bone": 1.5, "breast": 0.0, "warp": 0})
    pixels, _ = render(plain, build_scene(ct), DEFAULT_SIZE, np.random.default_rng(seed))
    axes[2].imshow(pixels / 4095, cmap="gray", vmin=0, vmax=1)
    axes[2].set_title("projection: 1 - exp(-k x sum of attenuation)", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("A stand-in scan: a chest CT projected along the antero-posterior axis", fontsize=10)
    fig.tight_layout()
    return fig


def scan_sheet(root: Path | str, n: int = 12, ncols: int = 6) -> Figure:
    """The first ``n`` scans of a written set (abnormal first), decoded as the loader decodes them, with prompts."""
    cases = sorted(scan(Path(root)), key=lambda c: not c.abnormal)[:n]
    images = [read_gray(c.image)[0] for c in cases]
    return case_grid(images, [c.prompt for c in cases], ncols, "Generated stand-in scans (DRRs) and their prompts")
