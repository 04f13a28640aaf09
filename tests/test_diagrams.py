"""The Part I pictures draw what the chapters say: Eq. 2's shapes and zero/random entries, the loop's test."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle

from selora.book import diagrams


def _cells(ax, role: str) -> int:
    color, hatch, _ = diagrams.EXPANSION_ROLES[role]
    return sum(
        1
        for p in ax.patches
        if isinstance(p, Rectangle) and p.get_facecolor() == to_rgba(color) and p.get_hatch() in (hatch, None)
    )


def test_expansion_figure_draws_eq2_shapes():
    r, d_in, d_out = 2, 5, 4
    fig = diagrams.expansion_figure(r, d_in, d_out)
    before, after = fig.axes
    assert _cells(before, "trained") == r * (d_in + d_out) and _cells(before, "K") == 0
    assert _cells(after, "trained") == r * (d_in + d_out), "the old entries are kept"
    assert _cells(after, "K") == d_in, "A gains one row K of d_in entries"
    assert _cells(after, "zero") == d_out, "B gains one zero column of d_out entries"
    plt.close(fig)


def test_training_loop_figure_names_the_interval_and_the_test():
    fig = diagrams.training_loop_figure(interval=25)
    text = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "\u03c4 = 25" in text and "FI_exp / FI_orig \u2265 \u03bb" in text
    plt.close(fig)
