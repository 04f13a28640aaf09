"""Pictures of the method for Part I: the factors growing (Eq. 2) and the training loop with its test step.

Both are drawn with plain matplotlib patches, so a chapter shows the shape of an idea before its
equations (house style) without carrying the drawing code.
"""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Rectangle

from selora.book.viz import METHOD_COLORS

__all__ = ["EXPANSION_ROLES", "expansion_figure", "training_loop_figure"]

#: What each kind of entry is right after an expansion: (colour, hatch, legend text).
EXPANSION_ROLES: dict[str, tuple[str, str, str]] = {
    "trained": (METHOD_COLORS["lora"], "", "trained entries (kept bit for bit)"),
    "K": ("#E69F00", "", "new row K: random, no gradient on the first step"),
    "zero": ("white", "///", "new column: zero, gets gradient s G\u1d40(xK\u1d40) at once"),
}


def _matrix(ax: Axes, x0: float, y0: float, rows: list[str], cols: int, cell: float) -> None:
    """A grid of ``len(rows) x cols`` cells with its top-left corner at (x0, y0); ``rows[i]`` is the
    role of row i, or ``"col:<role>"`` for a row whose last column alone has ``<role>``."""
    for i, role in enumerate(rows):
        for j in range(cols):
            kind = role
            if role.startswith("col:"):
                kind = role[4:] if j == cols - 1 else "trained"
            color, hatch, _ = EXPANSION_ROLES[kind]
            ax.add_patch(
                Rectangle(
                    (x0 + j * cell, y0 - (i + 1) * cell),
                    cell,
                    cell,
                    facecolor=color,
                    hatch=hatch,
                    edgecolor="0.3",
                    lw=0.6,
                )
            )


def _panel(ax: Axes, rank: int, d_in: int, d_out: int, grown: bool, cell: float = 1.0) -> None:
    """A (r, d_in) and B (d_out, r) of one adapter, or the same grown by one rank (Eq. 2)."""
    r = rank + grown
    a_rows = ["trained"] * rank + (["K"] if grown else [])
    b_rows = ["col:zero" if grown else "trained"] * d_out
    _matrix(ax, 0, d_out, a_rows, d_in, cell)
    _matrix(ax, d_in + 2, d_out, b_rows, r, cell)
    a_name = "[A; K]" if grown else "A"
    b_name = "[B, 0]" if grown else "B"
    ax.text(d_in / 2, d_out + 0.5, f"{a_name}  ({r} \u00d7 d_in)", ha="center", va="bottom")
    ax.text(d_in + 2 + r / 2, d_out + 0.5, f"{b_name}  (d_out \u00d7 {r})", ha="center", va="bottom")
    ax.set_xlim(-0.5, d_in + 3 + rank + 1.5)
    ax.set_ylim(-0.5, d_out + 2)
    ax.set_aspect("equal")
    ax.axis("off")


def expansion_figure(rank: int = 2, d_in: int = 8, d_out: int = 6) -> Figure:
    """Eq. 2 in the PEFT layout: ``A`` ``(r, d_in)`` gains the row K, ``B`` ``(d_out, r)`` a zero column.

    Left: the adapter before; right: after one expansion, coloured by :data:`EXPANSION_ROLES`.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    _panel(axes[0], rank, d_in, d_out, grown=False)
    axes[0].set_title(f"rank {rank}: update s\u00b7BA")
    _panel(axes[1], rank, d_in, d_out, grown=True)
    axes[1].set_title(f"rank {rank + 1}: s\u00b7[B, 0][A; K] = s\u00b7BA, the output is unchanged")
    handles = [Patch(facecolor=c, hatch=h, edgecolor="0.3", label=t) for c, h, t in EXPANSION_ROLES.values()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize="small")
    fig.suptitle("Expansion adds a random row to A and a zero column to B", fontweight="bold")
    fig.tight_layout(rect=(0, 0.08, 1, 0.93))
    return fig


#: Boxes of the training loop: (key, text, x, y); the test branch sits to the right.
LOOP_BOXES: tuple[tuple[str, str, float, float], ...] = (
    ("forward", "forward + loss\n(test step: hooks keep x, g)", 0.0, 3.0),
    ("backward", "loss.backward()", 0.0, 2.0),
    ("step", "optimizer.step()", 0.0, 1.0),
    ("test", "step % \u03c4 == 0 ?", 0.0, 0.0),
    ("score", "per layer: FI_orig, FI_exp\nof the adapter and [A; K], [B, 0]", 3.2, 0.0),
    ("grow", "FI_exp / FI_orig \u2265 \u03bb and r < cap:\nexpand by K, swap into the optimizer", 3.2, 1.5),
)


def _box(ax: Axes, text: str, x: float, y: float, color: str) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (x - 1.25, y - 0.32), 2.5, 0.64, boxstyle="round,pad=0.05", facecolor=color, edgecolor="0.3", lw=0.8
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize="small")


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], rad: float = 0.0) -> None:
    ax.add_patch(
        FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="0.2", connectionstyle=f"arc3,rad={rad}")
    )


def training_loop_figure(interval: int = 40) -> Figure:
    """Algorithm 1 as a loop: every step trains; every ``interval``-th step (tau) also tests and may grow."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    pos = {key: (x, y) for key, _, x, y in LOOP_BOXES}
    for key, text, x, y in LOOP_BOXES:
        color = "#FBE3D6" if key in ("score", "grow") else "#DCE9F5"
        _box(ax, text, x, y, color)
    for a, b in (("forward", "backward"), ("backward", "step"), ("step", "test")):
        _arrow(ax, (pos[a][0], pos[a][1] - 0.38), (pos[b][0], pos[b][1] + 0.38))
    _arrow(ax, (pos["test"][0] + 1.3, 0.0), (pos["score"][0] - 1.3, 0.0))
    ax.text(1.6, 0.08, "yes", ha="center", va="bottom")
    _arrow(ax, (pos["score"][0], 0.38), (pos["grow"][0], 1.5 - 0.38))
    _arrow(ax, (pos["test"][0] - 1.3, 0.0), (pos["forward"][0] - 1.3, 3.0), rad=-0.5)
    ax.text(-2.2, 1.5, "no:\nnext\nstep", ha="center", va="center")
    _arrow(ax, (pos["grow"][0], 1.5 + 0.38), (pos["forward"][0] + 1.3, 3.0), rad=0.3)
    ax.text(2.9, 2.75, "next step", ha="left", va="center")
    ax.text(
        1.1,
        -0.75,
        f"one step in \u03c4 = {interval} is a test step; its own backward feeds the scores (no extra pass)",
        ha="center",
        va="top",
        fontsize="small",
    )
    ax.set_xlim(-2.8, 4.8)
    ax.set_ylim(-1.1, 3.5)
    ax.axis("off")
    ax.set_title("Algorithm 1: a plain training loop with a test every \u03c4 steps")
    fig.tight_layout()
    return fig
