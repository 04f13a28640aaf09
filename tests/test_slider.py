"""selora.book.slider: precomputed matplotlib frames behind an HTML range input (works on a static page)."""

import base64
import io
import re
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
from PIL import Image

from selora.book.slider import frame_slider


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def parse(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    return parser


def draw_bar(value: float):
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.bar([0], [value])
    ax.set_ylim(0, 10)
    ax.set_title(f"value {value}")
    return fig


def test_one_png_frame_per_value_and_only_the_initial_one_visible():
    before = plt.get_fignums()
    html = frame_slider(draw_bar, [1, 2, 3, 4], "height", initial=3).data
    assert plt.get_fignums() == before, "frame_slider left figures open (the inline backend would show them)"
    tags = parse(html)
    imgs = [a for t, a in tags.tags if t == "img"]
    assert [a["data-value"] for a in imgs] == ["1", "2", "3", "4"]
    pngs = [base64.b64decode(a["src"].removeprefix("data:image/png;base64,")) for a in imgs]
    assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    assert len(set(pngs)) == 4, "frames for different values are identical"
    with Image.open(io.BytesIO(pngs[0])) as im:
        assert im.size == (2 * 72, int(1.5 * 72)), "frames are not drawn at the default dpi"
    visible = [a["data-value"] for a in imgs if "display:none" not in a.get("style", "").replace(" ", "")]
    assert visible == ["3"], "the initial frame is not the one shown without JavaScript"
    assert "height" in re.sub(r"<[^>]+>", " ", html)


def test_range_input_spans_an_evenly_spaced_grid_in_its_own_units():
    tags = parse(frame_slider(draw_bar, range(0, 101, 25), "step", initial=50, dpi=20).data)
    (slider,) = [a for t, a in tags.tags if t == "input"]
    assert slider["type"] == "range"
    assert (slider["min"], slider["max"], slider["step"], slider["value"]) == ("0", "100", "25", "50")


def test_unevenly_spaced_or_non_numeric_values_slide_by_index():
    tags = parse(frame_slider(draw_bar, [1, 2, 4, 8], "r", initial=4, dpi=20).data)
    (slider,) = [a for t, a in tags.tags if t == "input"]
    assert (slider["min"], slider["max"], slider["step"], slider["value"]) == ("0", "3", "1", "2")
    tags = parse(frame_slider(lambda s: draw_bar(len(s)), ["a", "bb"], "word", dpi=20).data)
    (slider,) = [a for t, a in tags.tags if t == "input"]
    assert (slider["min"], slider["max"], slider["value"]) == ("0", "1", "0"), "initial should default to the first"


def test_javascript_is_inline_and_loads_nothing():
    html = frame_slider(draw_bar, [1, 2], "v", dpi=20).data
    tags = parse(html)
    scripts = [a for t, a in tags.tags if t == "script"]
    assert len(scripts) == 1 and "src" not in scripts[0], "the slider's script must be inline"
    code = "".join(tags.scripts)
    assert "addEventListener" in code and "input" in code
    assert not re.search(r"https?:|//cdn|import\(|fetch\(|XMLHttpRequest", code), "the script loads something"
    assert not [a for t, a in tags.tags if t == "link"]


@pytest.mark.parametrize(
    "values, initial, message",
    [
        ([], None, r"values: expected at least one value, got none"),
        ([1, 2, 3], 5, r"initial=5: expected one of the values \[1, 2, 3\]"),
        ([1, 1, 2], None, r"values: expected distinct values, 1 appears twice"),
    ],
)
def test_bad_values_or_initial_are_a_clear_value_error(values, initial, message):
    with pytest.raises(ValueError, match=message):
        frame_slider(draw_bar, values, "v", initial=initial, dpi=20)


def test_draw_must_return_a_figure():
    with pytest.raises(TypeError, match=r"draw\(1\) returned NoneType: expected a matplotlib Figure"):
        frame_slider(lambda v: None, [1, 2], "v", dpi=20)
