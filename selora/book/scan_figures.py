"""Figures of the data chapter: case grids with prompts, the resize/crop, token lengths."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from selora.book.viz import gray_array


def case_grid(images: Sequence, prompts: Sequence[str], ncols: int, title: str, width: int = 30) -> Figure:
    """Images in a grid (gray, no axes) with each prompt wrapped underneath."""
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, prompt in zip(axes.flat, images, prompts):
        ax.imshow(gray_array(image), cmap="gray", vmin=0, vmax=1)
        ax.set_title("\n".join(textwrap.wrap(prompt, width)[:4]), fontsize=7, y=-0.02, va="top")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def crop_figure(raw: np.ndarray, model_input: torch.Tensor, title: str) -> Figure:
    """The decoded scan with the centre-crop window drawn on it, beside the model input."""
    h, w = raw.shape
    side = min(h, w)
    fig, (a, b) = plt.subplots(1, 2, figsize=(6.4, 3.6), gridspec_kw={"width_ratios": [w / h, 1]})
    a.imshow(raw, cmap="gray", vmin=0, vmax=1)
    a.add_patch(Rectangle(((w - side) / 2, (h - side) / 2), side, side, fill=False, ec="#D55E00", lw=2))
    a.set_title(f"decoded {w}x{h} px, window = shortest side", fontsize=8)
    size = model_input.shape[-1]
    b.imshow(gray_array(model_input), cmap="gray", vmin=0, vmax=1)
    b.set_title(f"model input {size}x{size}, values in [-1, 1]", fontsize=8)
    for ax in (a, b):
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def token_length_hist(lengths: Sequence[int], limit: int, title: str) -> Figure:
    """Histogram of prompt lengths in CLIP tokens (start/end included) against the context limit."""
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    top = max(max(lengths), limit) + 2
    ax.hist(lengths, bins=np.arange(0, top + 1, 1), color="#0072B2")
    ax.axvline(limit + 0.5, color="#D55E00", ls="--", label=f"context limit: {limit} positions")
    ax.set_xlabel("prompt length in CLIP tokens (incl. start and end)")
    ax.set_ylabel("prompts")
    ax.legend(frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
