"""Plotting helpers and the book-wide colours (one colour per method, everywhere in the book)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

__all__ = ["METHOD_COLORS", "method_color", "offline_label", "step_plot", "rank_trajectories"]

#: One colour per method (colour-blind-friendly Okabe–Ito palette); used by every figure.
METHOD_COLORS: dict[str, str] = {
    "selora": "#D55E00",   # vermillion
    "lora": "#0072B2",     # blue
    "adalora": "#009E73",  # green
    "dylora": "#CC79A7",   # purple
    "full": "#000000",     # black
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


def step_plot(ax: Axes, series: Mapping[str, Sequence[float]], *, logy: bool = False,
              colors: Mapping[str, str] | None = None, xlabel: str = "step",
              ylabel: str = "") -> Axes:
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


def rank_trajectories(ax: Axes, steps: Sequence[int], ranks: Mapping[str, Sequence[int]],
                      planted: Mapping[str, int] | None = None) -> Axes:
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
