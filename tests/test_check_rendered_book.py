"""scripts/check_rendered_book.py against tiny hand-made sites: it must report exactly the planted
problems, pass a clean site, and refuse bad input with exit status 2.

Needs Debian's Chromium (`apt-get install -y chromium`) and the book extra's sphinx-mathjax-offline
(the MathJax the pages load); without them these tests fail, never skip.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import yaml
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from selora.book.slider import frame_slider

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_rendered_book.py"
_spec = importlib.util.spec_from_file_location("check_rendered_book", SCRIPT)
crb = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(crb)

SVG = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><circle cx="5" cy="5" r="4"/></svg>'
MYST_NB_TRACEBACK = """
<div class="cell docutils container"><div class="cell_output docutils container">
<div class="output traceback highlight-ipythontb notranslate"><div class="highlight"><pre>
Traceback (most recent call last)
Cell In[1], line 1
----&gt; 1 1/0
ZeroDivisionError: division by zero
</pre><button class="copybtn" data-tooltip="Copy">Copy to clipboard</button></div></div>
</div></div>"""

# MathJax as the book serves it: the package's files under _static/mathjax, configured as
# _config.yml says (plus the class filter myst-parser adds), math marked up as Sphinx does.
_MATHJAX_SPEC = importlib.util.find_spec("sphinx-mathjax-offline")
assert _MATHJAX_SPEC, "sphinx-mathjax-offline is missing: install the book extra (make install)"
MATHJAX_DIR = Path(_MATHJAX_SPEC.submodule_search_locations[0]) / "static" / "mathjax"
_BOOK_MATHJAX = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]["mathjax3_config"]
MATHJAX_CONFIG = {**_BOOK_MATHJAX, "options": {"processHtmlClass": "tex2jax_process|mathjax_process|math|output_area"}}
MATHJAX = f"<script>window.MathJax = {json.dumps(MATHJAX_CONFIG)}</script>"


def math_section(body: str, src: str = "../_static/mathjax/tex-chtml.js") -> str:
    return (
        f'{MATHJAX}<script defer src="{src}"></script><section class="tex2jax_ignore mathjax_ignore">{body}</section>'
    )


def formula(tex: str, display: bool = False) -> str:
    tag, tex = ("div", rf"\[{tex}\]") if display else ("span", rf"\({tex}\)")
    return f'<{tag} class="math notranslate nohighlight">{tex}</{tag}>'


GOOD_MATH = math_section(
    f"<p>Inline {formula(r'W_0 + BA')} and a display:</p>"
    + formula(r"\begin{pmatrix} a \\ b \end{pmatrix} = \frac{1}{2}", display=True)
    + r"<p>Code may show <code>$$</code> and <code>\begin{align}</code>:</p><pre>\begin{x} $$</pre>"
)

GOOD_BODY = (
    """
<h1 id="good">A good page</h1>
<p>Prose may quote "Traceback (most recent call last)" without being an error output.</p>
<img src="../_images/ok.png" alt="png"> <img src="../_images/ok.svg" alt="svg">
<img src="../_images/ok.png" loading="lazy" style="margin-top:2000px" alt="lazy">
<img src="https://example.invalid/badge.png" alt="external, blocked, ignored">
<a href="other.html">other page</a> <a href="other.html#part-2">anchor on another page</a>
<a href="#good">own anchor</a> <a href="#">top</a> <a href="#made-by-js">id added by a script</a>
<a href="../_static/notes.txt">a static file</a> <a href="../book/">folder with index.html</a>
<a href="https://example.invalid/">external</a> <a href="mailto:someone@example.invalid">mail</a>
<div class="cell_output docutils container"><div class="output stderr"><pre>UserWarning: fine</pre></div></div>
<div class="cell_output docutils container"><table><tr><th>a</th></tr><tr><td>1</td></tr></table>
<p>a | b prose with a pipe is fine</p></div>
<script src="../_static/ok.js"></script>
<script src="https://cdn.example.invalid/lib.js"></script>
<script>console.log("a log line is fine"); console.warn("so is a warning");
  const el = document.createElement("span"); el.id = "made-by-js"; document.body.append(el);</script>
"""
    + GOOD_MATH
)


def slider_html(values: list[int]) -> str:
    """A real frame slider (selora.book.slider) over ``values``: one tiny figure per value."""

    def draw(v: int):
        fig, ax = plt.subplots(figsize=(1, 1))
        ax.bar([0], [v])
        ax.set_ylim(0, max(values))
        return fig

    return frame_slider(draw, values, "v", dpi=20).data


SLIDER = slider_html([1, 2, 3])
DEAD_SLIDER = SLIDER[: SLIDER.index("<script>")]  # the frames and the input, but no script
OTHER_BODY = '<h1>Other</h1><h2 id="part-2">Part 2</h2><a href="good.html">back</a>' + SLIDER + slider_html([5])

BAD_PAGES = {
    "error": MYST_NB_TRACEBACK,
    "broken-image": '<img src="../_images/missing.png"><img src="../_images/corrupt.png">',
    "broken-link": '<a href="nowhere.html">x</a> <a href="good.html#no-such-anchor">y</a>',
    "console-error": '<script>console.error("boom from the page")</script>',
    "page-error": '<script>throw new Error("uncaught on purpose")</script>',
    "missing-resource": '<p>text</p><script src="../_static/missing.js"></script>',
    "raw-table": '<div class="cell_output docutils container"><p>| a | b |\n|---|---:|\n| 1 | 2 |</p></div>',
    "math-error": math_section(
        formula(r"\frac{1}", display=True) + formula(r"x + \nosuchmacro") + formula(r"\frac{1}{2", display=True)
    ),
    "raw-tex": math_section(r"<p>Energy $$E = mc^2$$ left as text.</p><p>\begin{align} a \end{align}</p>"),
    "cdn-mathjax": math_section(formula("x^2"), src="https://cdn.example.invalid/mathjax/tex-chtml.js"),
    "control-char": "<p>This page renders fine; its source has a backspace and a tab in markdown.</p>",
    "dead-slider": SLIDER + DEAD_SLIDER,
    "wide-code": '<div class="cell_input"><pre style="width: 20em; white-space: pre; overflow-x: auto">short = 1\n'
    + "long_name = some_function(first_argument, second_argument, third_argument, fourth_argument)</pre></div>"
    '<div class="cell_input"><pre style="width: 20em; white-space: pre-wrap">wrapped = some_function(first_argument, '
    "second_argument, third_argument, fourth_argument)</pre></div>",
}
# Chapter sources (the toc's paths under the toc's folder); every other page gets a clean .md.
CONTROL_CHAR_NOTEBOOK = {
    "cells": [
        {"cell_type": "markdown", "source": ["# Title\n", "Clean prose.\n"]},
        # what a normal Python string makes of "\\begin" (a backspace) and "\\tau" (a tab)
        {"cell_type": "markdown", "source": ["$$\n", "\x08egin{pmatrix} \tau \\end{pmatrix}\n", "$$"]},
        {"cell_type": "code", "source": ["x = '\t'  # code may hold a tab"]},
    ]
}
EXPECTED_BAD = sorted(
    [
        "PROBLEM book/error: cell error output: ZeroDivisionError: division by zero",
        "PROBLEM book/broken-image: broken image: ../_images/missing.png (HTTP 404)",
        "PROBLEM book/broken-image: broken image: ../_images/corrupt.png (did not decode, naturalWidth 0)",
        "PROBLEM book/broken-link: broken link: nowhere.html (no such file)",
        "PROBLEM book/broken-link: broken link: good.html#no-such-anchor "
        "(no element with id 'no-such-anchor' in good.html)",
        "PROBLEM book/console-error: console error: boom from the page",
        "PROBLEM book/page-error: page error: Error: uncaught on purpose",
        "PROBLEM book/missing-resource: resource failed: /_static/missing.js (HTTP 404)",
        "PROBLEM book/raw-table: raw markdown table: a cell output shows a table as text: "
        "| a | b | |---|---:| | 1 | 2 |",
        "PROBLEM book/missing: missing page: book/missing.html is not in the HTML folder (listed in the toc)",
        "PROBLEM book/math-error: MathJax error: Missing argument for \\frac in: \\frac{1}",
        "PROBLEM book/math-error: math not typeset: 1 of 3 formula(s), first: \\[\\frac{1}{2\\]",
        "PROBLEM book/math-error: MathJax error: Undefined control sequence \\nosuchmacro in: x + \\nosuchmacro",
        "PROBLEM book/raw-tex: raw TeX: the page shows TeX source as text: Energy $$E = mc^2$$ left as text.",
        "PROBLEM book/raw-tex: raw TeX: the page shows TeX source as text: \\begin{align} a \\end{align}",
        "PROBLEM book/cdn-mathjax: math not typeset: MathJax did not load; 1 formula(s) left as TeX",
        "PROBLEM book/control-char: control character: control-char.ipynb markdown cell 1: U+0008 backspace, "
        "a Python '\\b' (\\begin, \\beta, \\bar?) in '$$\\n\\x08egin{pmatrix} \\t'",
        "PROBLEM book/control-char: control character: control-char.ipynb markdown cell 1: U+0009 tab, "
        "a Python '\\t' (\\tau, \\theta, \\times, \\text, \\top?) in '\\x08egin{pmatrix} \\tau \\\\end{pmatrix'",
        "PROBLEM book/dead-slider: frame slider: slider 2 of 2: moving it from 1 to 3 does not change the image",
        "PROBLEM book/wide-code: code wider than the page: scroll sideways to read: "
        "long_name = some_function(first_argument, second_argument, third_argument, fourt",
    ]
)


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(crb.DEFAULT_CHROMIUM).is_file():
        pytest.fail(
            f"{crb.DEFAULT_CHROMIUM} missing: the render check needs Debian's Chromium "
            "(apt-get update && apt-get install -y chromium)"
        )
    return crb.DEFAULT_CHROMIUM


def page(body: str) -> str:
    head = '<head><meta charset="utf-8"><title>t</title></head>'
    return f"<!DOCTYPE html><html>{head}<body>{body}</body></html>"


def make_site(root: Path, pages: dict[str, str]) -> tuple[Path, Path]:
    """Write ``root/html/book/<name>.html`` for each page plus assets; the toc lists good, other,
    every page given and ``book/missing`` when it is in ``pages`` as None. Returns (html, toc)."""
    html = root / "html"
    (html / "book").mkdir(parents=True)
    (root / "book").mkdir()
    (html / "_images").mkdir()
    (html / "_static").mkdir()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(html / "_images" / "ok.png")
    (html / "_images" / "ok.svg").write_text(SVG)
    (html / "_images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (html / "_static" / "ok.js").write_text("window.okLoaded = true;")
    (html / "_static" / "notes.txt").write_text("notes")
    (html / "_static" / "mathjax").symlink_to(MATHJAX_DIR, target_is_directory=True)
    (html / "book" / "index.html").write_text(page("<p>folder index</p>"))
    for name, body in pages.items():
        if body is not None:
            (html / "book" / f"{name}.html").write_text(page(body))
        if name == "control-char":
            (root / "book" / f"{name}.ipynb").write_text(json.dumps(CONTROL_CHAR_NOTEBOOK))
        else:
            (root / "book" / f"{name}.md").write_text(f"# {name}\n\nClean markdown.\n")
    chapters = "".join(f"      - file: book/{name}\n" for name in pages if name != "good")
    toc = root / "_toc.yml"
    toc.write_text(f"format: jb-book\nroot: book/good\nparts:\n  - caption: Part\n    chapters:\n{chapters}")
    return html, toc


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_reports_exactly_the_planted_problems(tmp_path: Path, chromium: str) -> None:
    pages = {"good": GOOD_BODY, "other": OTHER_BODY, **BAD_PAGES, "missing": None}
    html, toc = make_site(tmp_path, pages)
    shots = tmp_path / "shots"
    proc = run("--html", str(html), "--toc", str(toc), "--screenshots", str(shots))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    problems = sorted(line for line in proc.stdout.splitlines() if line.startswith("PROBLEM "))
    assert problems == EXPECTED_BAD, proc.stdout
    assert "FAILED: 20 problem(s) on 14 of 16 page(s)" in proc.stdout
    table = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if line.startswith("book/")}
    assert table["book/good"] == "ok" and table["book/other"] == "ok"
    assert table["book/error"] == "FAIL" and table["book/missing"] == "FAIL"
    assert not (shots / "book-missing.png").exists()
    assert (shots / "book-error.png").is_file()


def test_clean_site_passes_with_screenshots(tmp_path: Path, chromium: str) -> None:
    html, toc = make_site(tmp_path, {"good": GOOD_BODY, "other": OTHER_BODY})
    proc = run("--html", str(html), "--toc", str(toc))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PROBLEM" not in proc.stdout
    assert "OK: 2 page(s) checked" in proc.stdout
    good = next(line.split() for line in proc.stdout.splitlines() if line.startswith("book/good"))
    # columns: verdict, problems, images (3 same-site), links (9), stderr outputs (1)
    assert good[1:6] == ["ok", "0", "3", "9", "1"], good
    for name in ("book-good", "book-other"):  # default folder: <html>/../screenshots
        with Image.open(tmp_path / "screenshots" / f"{name}.png") as shot:
            assert shot.width == crb.VIEWPORT["width"]
            assert len(set(shot.convert("L").getdata())) > 2, f"{name} screenshot is blank"
    with Image.open(tmp_path / "screenshots" / "book-good.png") as shot:
        assert shot.height > 2000, "screenshot is not full-page (the lazy image sits 2000px down)"


def test_toc_pages_walks_parts_chapters_and_sections(tmp_path: Path) -> None:
    toc = tmp_path / "_toc.yml"
    toc.write_text(
        "format: jb-book\nroot: book/intro\nparts:\n  - caption: A\n    chapters:\n"
        "      - file: book/01-a.ipynb\n        sections:\n          - file: book/01b\n"
        "          - url: https://example.invalid\n  - caption: B\n    chapters:\n"
        "      - file: book/02-b\n"
    )
    assert crb.toc_pages(toc) == ["book/intro", "book/01-a", "book/01b", "book/02-b"]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no-html", "HTML folder not found"),
        ("bad-toc", "expected a mapping with a 'root' document path"),
        ("no-toc", "table of contents not found"),
        ("no-chromium", "Chromium not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: str, expected: str) -> None:
    html, toc = make_site(tmp_path, {"good": OTHER_BODY})
    args = {
        "no-html": ["--html", str(tmp_path / "nope")],
        "bad-toc": ["--toc", str(tmp_path / "bad.yml")],
        "no-toc": ["--toc", str(tmp_path / "absent.yml")],
        "no-chromium": ["--chromium", str(tmp_path / "no-browser")],
    }[case]
    (tmp_path / "bad.yml").write_text("- just\n- a list\n")
    base = {"--html": str(html), "--toc": str(toc)}
    base.update(dict(zip(args[::2], args[1::2])))
    proc = run(*[x for kv in base.items() for x in kv])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_source_problems_read_markdown_files_and_notebooks(tmp_path: Path) -> None:
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# Intro\n\n$$\x0crac{1}{2}$$\n", encoding="utf-8")
    (tmp_path / "book" / "broken.ipynb").write_text("{not json", encoding="utf-8")
    assert [str(p) for p in crb.source_problems(tmp_path, "book/intro")] == [
        "PROBLEM book/intro: control character: intro.md file: U+000C form feed, a Python '\\f' (\\frac?) "
        "in '# Intro\\n\\n$$\\x0crac{1}{2}$$\\n'"
    ]
    assert [str(p) for p in crb.source_problems(tmp_path, "book/broken")] == [
        "PROBLEM book/broken: unreadable source: broken.ipynb: not a notebook (JSONDecodeError)"
    ]
    assert [str(p) for p in crb.source_problems(tmp_path, "book/absent")] == [
        f"PROBLEM book/absent: missing source: no book/absent{{.ipynb,.md,.rst,.py}} under {tmp_path}"
    ]
