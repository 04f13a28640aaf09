"""Plotting helpers and the book-wide colours (one colour per method, everywhere in the book)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

__all__ = [
    "METHOD_COLORS",
    "gray_array",
    "image_rows",
    "method_bars",
    "method_color",
    "offline_label",
    "rank_heatmap",
    "rank_map",
    "rank_trajectories",
    "step_plot",
]

#: One colour per method (colour-blind-friendly Okabe–Ito palette); used by every figure.
METHOD_COLORS: dict[str, str] = {
    "selora": "#D55E00",  # vermillion
    "lora": "#0072B2",  # blue
    "adalora": "#009E73",  # green
    "dylora": "#CC79A7",  # purple
    "full": "#000000",  # black
}


def method_color(method: str) -> str:
    """The book's colour for ``method`` (case-insensitive, ``-``/``_`` ignored)."""
    key = method.lower().replace("-", "").replace("_", "")
    if key not in METHOD_COLORS:
        raise KeyError(f"method {method!r}: expected one of {', '.join(METHOD_COLORS)}")
    return METHOD_COLORS[key]


def offline_label(text: str, profile: str) -> str:
    """``text`` with " (offline proxy)" appended when ``profile`` is ``"offline"``."""
    return f"{text} (offline proxy)" if profile == "offline" else text


def step_plot(
    ax: Axes,
    series: Mapping[str, Sequence[float]],
    *,
    logy: bool = False,
    colors: Mapping[str, str] | None = None,
    xlabel: str = "step",
    ylabel: str = "",
) -> Axes:
    """One line per entry of ``series`` (label → values per step, step counted from 1)."""
    for label, values in series.items():
        kw = {"color": colors[label]} if colors and label in colors else {}
        ax.plot(range(1, len(values) + 1), values, label=label, **kw)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    return ax


def rank_trajectories(
    ax: Axes, steps: Sequence[int], ranks: Mapping[str, Sequence[int]], planted: Mapping[str, int] | None = None
) -> Axes:
    """Rank of each layer against the training step, with its planted rank dashed if given.

    steps: the x values (length S); ranks: layer name → S ranks.
    """
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, (name, values) in enumerate(ranks.items()):
        if len(values) != len(steps):
            raise ValueError(f"ranks[{name!r}] has {len(values)} values, expected {len(steps)}")
        color = mcolors.to_hex(cycle[j % len(cycle)])
        label = name if planted is None else f"{name} (planted {planted[name]})"
        ax.step(steps, values, where="post", color=color, label=label)
        if planted is not None:
            ax.axhline(planted[name], color=color, ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("adapter rank")
    ax.legend(frameon=False, fontsize="small")
    return ax


def rank_heatmap(
    ax: Axes, steps: Sequence[int], names: Sequence[str], matrix: np.ndarray, cmap: str = "viridis"
) -> AxesImage:
    """Rank of every layer (rows) over training (columns) as a heatmap; returns the image (for a colorbar).

    steps: the S steps at which ranks were recorded; names: the L row labels; matrix: ranks (L, S).
    Column j spans from steps[j] to steps[j + 1] (the rank holds until the next test). With more than
    ~120 layers only every k-th row is labelled.
    """
    matrix = np.asarray(matrix)
    if matrix.shape != (len(names), len(steps)):
        raise ValueError(f"matrix: expected shape ({len(names)}, {len(steps)}) = (layers, steps), got {matrix.shape}")
    edges = np.append(np.asarray(steps, dtype=float), steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1))
    mesh = ax.pcolormesh(
        edges, np.arange(len(names) + 1), matrix, cmap=cmap, shading="flat", vmin=1, vmax=max(1, int(matrix.max()))
    )
    ax.set_ylim(len(names), 0)  # first layer on top
    every = max(1, len(names) // 120)  # at most ~120 labels; SD v1.5 has several hundred adapted layers
    rows = np.arange(0, len(names), every)
    ax.set_yticks(rows + 0.5, labels=[names[i] for i in rows], fontsize=5 if len(names) > 40 else 7)
    ax.set_xlabel("step")
    return mesh


def rank_map(
    ax: Axes, rows: Sequence[str], cols: Sequence[str], matrix: np.ndarray, cmap: str = "viridis"
) -> AxesImage:
    """Mean final rank per (location, kind of layer) as an annotated grid (the paper's Fig. 3 layout).

    rows: R locations; cols: C kinds; matrix: (R, C), NaN where a location has no such layer (left blank).
    Returns the image (for a colorbar).
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (len(rows), len(cols)):
        raise ValueError(f"matrix: expected shape ({len(rows)}, {len(cols)}) = (locations, kinds), got {matrix.shape}")
    top = max(1.0, float(np.nanmax(matrix)))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=1, vmax=top, aspect="auto")
    for (i, j), v in np.ndenumerate(matrix):
        if not np.isnan(v):
            ax.text(
                j,
                i,
                f"{v:.1f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if v < 1 + 0.6 * (top - 1) else "black",
            )
    ax.set_xticks(range(len(cols)), labels=cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=7)
    return image


def gray_array(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A model image or a decoded scan as an ``(H, W)`` array in [0, 1] for ``imshow(vmin=0, vmax=1)``.

    ``image``: a model image ``(C, H, W)`` in [-1, 1] (any C; channels averaged, then mapped by
    ``(x + 1) / 2``) or an already gray ``(H, W)`` image in [0, 1] (kept). Either result is clipped
    to [0, 1]. A tensor becomes float32 (detached, on the CPU), anything else float64. Any other
    number of dimensions is a ``ValueError``.
    """
    arr = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=float)
    if arr.ndim == 3:
        arr = (arr.mean(0) + 1) / 2
    elif arr.ndim != 2:
        raise ValueError(f"image: expected (C, H, W) in [-1, 1] or (H, W) in [0, 1], got shape {arr.shape}")
    return np.clip(arr, 0, 1)


def image_rows(rows: Mapping[str, Sequence], captions: Sequence[str], title: str, width: int = 26) -> Figure:
    """A grid of grayscale images: one labelled row per entry of ``rows`` (label -> images
    ``(C, H, W)`` in [-1, 1]), one column per caption (wrapped underneath the last row), no axes."""
    ncols = len(captions)
    for label, images in rows.items():
        if len(images) != ncols:
            raise ValueError(f"rows[{label!r}] has {len(images)} images, expected {ncols} (one per caption)")
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.9 * ncols + 0.6, 1.9 * len(rows) + 0.9), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c, image in enumerate(images):
            ax = axes[r, c]
            ax.imshow(gray_array(image), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("\n".join(textwrap.wrap(captions[c], width)[:4]), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


REFERENCE_STYLES = ("--", ":", "-.")  # line styles of reference values in :func:`method_bars`, in order


def method_bars(
    ax: Axes, values: Mapping[str, tuple[float, float | None]], reference: Mapping[str, float] | None = None
) -> None:
    """One bar per method (the book's colour) with a ±std error bar, references as grey lines.

    values: ``{method: (mean, std or None)}`` in plotting order; reference: ``{label: value}`` drawn
    as labelled horizontal lines (e.g. the base model, real scans), in :data:`REFERENCE_STYLES` order.
    """
    if not values:
        raise ValueError("values: expected at least one method")
    methods = list(values)
    means = [values[m][0] for m in methods]
    errs = [values[m][1] or 0.0 for m in methods]
    ax.bar(range(len(methods)), means, yerr=errs, capsize=3, color=[method_color(m) for m in methods])
    ax.set_xticks(range(len(methods)), labels=methods)
    for (label, value), style in zip((reference or {}).items(), REFERENCE_STYLES):
        ax.axhline(value, color="0.35", ls=style, lw=1, label=label)
    if reference:
        ax.legend(frameon=False, fontsize=8)
