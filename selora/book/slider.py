"""A slider that works on the static book page: precomputed matplotlib frames behind an HTML range input.

``frame_slider(draw, values, label, initial)`` draws ``draw(v)`` once for every value, keeps each
figure as a small PNG and returns an ``IPython.display.HTML`` object: the frames as base64 ``<img>``
tags, an ``<input type="range">`` and a few lines of inline JavaScript that show the selected frame.
Nothing is loaded from anywhere, so the same output works in the rendered HTML page, in Jupyter and
in Colab; without JavaScript (an untrusted notebook, a notebook viewer) the initial frame is shown.
An ipywidgets slider, by contrast, needs a running kernel and is dead on the static page.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import matplotlib.pyplot as plt
from IPython.display import HTML
from matplotlib.figure import Figure

__all__ = ["frame_slider"]

# Binds every slider of the page not yet bound (idempotent: each slider's copy of the script may run,
# in any order); the frame index is (value - min) / step of the range input.
SCRIPT = """<script>(function () {
  document.querySelectorAll("div.selora-frame-slider:not([data-bound])").forEach(function (box) {
    box.setAttribute("data-bound", "1");
    var input = box.querySelector("input[type=range]"), shown = box.querySelector("output");
    var frames = box.querySelectorAll("img");
    function show() {
      var i = Math.round((Number(input.value) - Number(input.min)) / Number(input.step));
      frames.forEach(function (img, j) { img.style.display = j === i ? "" : "none"; });
      shown.textContent = frames[i].getAttribute("data-value");
    }
    input.addEventListener("input", show);
    show();
  });
})();</script>"""


def _png(draw: Callable[[Any], Figure], value: Any, dpi: int) -> bytes:
    """``draw(value)`` saved as PNG bytes at ``dpi``; the figure is closed (the inline backend must not show it)."""
    fig = draw(value)
    if not isinstance(fig, Figure):
        plt.close("all")
        raise TypeError(f"draw({value!r}) returned {type(fig).__name__}: expected a matplotlib Figure")
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _img(png: bytes, value: Any, label: str, shown: bool) -> str:
    """One frame: an ``<img>`` with the PNG inline, hidden unless ``shown``."""
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    text = html.escape(str(value))
    hidden = "" if shown else ' style="display:none"'
    return f'<img src="{src}" data-value="{text}" alt="{html.escape(label)} = {text}"{hidden}>'


def _positions(values: list[Any]) -> tuple[list[Any], Any]:
    """Positions of the frames on the range input and its step: the values themselves when they are an
    evenly spaced increasing grid of numbers (the slider reads in their units), else their indices."""
    numbers = all(isinstance(v, Real) and not isinstance(v, bool) for v in values)
    if numbers and len(values) == 1:
        return values, 1
    if numbers:
        step = values[1] - values[0]
        if step > 0 and all(abs(b - a - step) <= 1e-9 * step for a, b in zip(values, values[1:])):
            return values, step
    return list(range(len(values))), 1


def frame_slider(
    draw: Callable[[Any], Figure],
    values: Sequence[Any],
    label: str,
    initial: Any = None,
    dpi: int = 72,
) -> HTML:
    """A range slider over ``values`` showing the figure ``draw(value)`` of the selected value.

    draw: value -> a matplotlib ``Figure`` (closed here once saved); values: the V distinct values,
    one frame each (keep V to a couple of dozen: every frame is stored in the notebook, ~20-40 kB
    at the default dpi); label: shown before the slider; initial: the value shown first (default:
    the first). ValueError for no values, repeated values or an ``initial`` not among them.
    """
    values = list(values)
    if not values:
        raise ValueError("values: expected at least one value, got none")
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ValueError(f"values: expected distinct values, {repeated[0]!r} appears twice")
    initial = values[0] if initial is None else initial
    if initial not in values:
        raise ValueError(f"initial={initial!r}: expected one of the values {values!r}")
    positions, step = _positions(values)
    frames = "".join(_img(_png(draw, v, dpi), v, label, v == initial) for v in values)
    slider = (
        f'<input type="range" min="{positions[0]}" max="{positions[-1]}" step="{step}" '
        f'value="{positions[values.index(initial)]}" aria-label="{html.escape(label)}" style="width:min(24em,60%)">'
    )
    head = (
        f'<label style="display:flex;align-items:center;gap:0.6em">{html.escape(label)} {slider} '
        f"<output>{html.escape(str(initial))}</output></label>"
    )
    return HTML(f'<div class="selora-frame-slider">{head}<div>{frames}</div></div>{SCRIPT}')
