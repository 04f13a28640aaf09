r"""Open the rendered book in headless Chromium and check every page as a reader would see it.

    python scripts/check_rendered_book.py [--html _build/html] [--toc _toc.yml]
                                          [--screenshots _build/screenshots] [--chromium PATH]

Serves the HTML folder from a local http.server on 127.0.0.1 (a free port), visits every page
listed in the table of contents and fails on: a missing page, a rendered cell error output, a broken
same-site link or anchor, an image that did not load, a same-site resource that failed (HTTP >= 400),
console errors, uncaught page errors and a frame slider (``selora.book.slider``) whose image does not
change when it is moved. Requests to other hosts are blocked (the verdict must not
depend on the network), so fonts/CDN/launch-button targets never count, and MathJax has to come
from the build itself (the book's sphinx-mathjax-offline extension puts it in ``_static/mathjax``).
A full-page screenshot of every page goes to ``<screenshots>/<page>.png`` (toc path with "/" as
"-", e.g. book-intro.png).

Math: once MathJax has finished typesetting, a page fails on a formula MathJax rendered as an error
(TeX syntax, an undefined macro), on a formula left untypeset (e.g. MathJax did not load) and on raw
``$$`` or ``\begin{`` in its text outside code and math. The chapter sources (the toc's paths,
relative to the toc's folder) fail on a control character in a markdown cell, which is what a
Python escape makes of LaTeX written in a normal string: "\begin" holds a backspace, "\frac" a form
feed, "\rho" a carriage return, "\vec" a vertical tab, "\tau", "\theta", "\times", "\text" a tab.
Tabs count: this book indents markdown with spaces, so a tab in a markdown cell has only ever been
such an escape. ("\nabla" holds a newline, which no check can tell from a real one.)

Exit status: 0 all pages fine (a summary table is printed), 1 problems found (one line each, then the
table and a count), 2 bad input (missing folder/file, no Chromium).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from selora.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHROMIUM = "/usr/bin/chromium"  # Debian's `chromium` package; playwright cannot download here
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}
PAGE_TIMEOUT_MS = 30_000
IMAGE_TIMEOUT_MS = 10_000
IDLE_TIMEOUT_MS = 5_000
MATH_TIMEOUT_MS = 20_000
SOURCE_SUFFIXES = (".ipynb", ".md", ".rst", ".py")

# myst-nb 1.4 renders an error output as <div class="output traceback ...">; the other selectors
# cover nbconvert-style markup (.output_error) and a generic .output.error.
CELL_ERROR_JS = """() => {
  const hits = new Set([...document.querySelectorAll(
      '.output.traceback, .output.error, .output_error, .cell_output .traceback')]);
  for (const el of document.querySelectorAll('.cell_output, .output_area, .output')) {
    if (el.textContent.includes('Traceback (most recent call last)')
        && !el.querySelector('.cell_output, .output_area, .output')) hits.add(el);
  }
  const outer = [...hits].filter(el => ![...hits].some(o => o !== el && o.contains(el)));
  return outer.map(el => {
    const text = (el.querySelector('pre') || el).textContent;  // not the copy button's label
    const lines = text.split('\\n').map(s => s.trim()).filter(Boolean);
    return lines.length ? lines[lines.length - 1] : '(empty traceback)';
  });
}"""

STDERR_JS = "() => document.querySelectorAll('.cell_output .output.stderr').length"

# A markdown table that reached the page as text (e.g. a text/markdown output rendered as
# CommonMark, which has no tables): a paragraph of a cell output holding a "|---|" delimiter row.
# Code cells (inputs) wider than their column: the reader would have to scroll sideways to read them.
WIDE_CODE_JS = """() => [...document.querySelectorAll('div.cell_input pre')]
  .filter(pre => pre.scrollWidth > pre.clientWidth + 1)
  .map(pre => pre.textContent.split('\\n').reduce((a, b) => (b.length > a.length ? b : a), '').slice(0, 80))"""

RAW_TABLE_JS = """() => [...document.querySelectorAll('.cell_output p')]
  .filter(p => /\\|\\s*:?-{3,}:?\\s*\\|/.test(p.textContent))
  .map(p => p.textContent.replace(/\\s+/g, ' ').trim().slice(0, 80))"""

# Force lazy images to load, then wait until each one decodes (or fails, or times out).
IMAGES_JS = """async (timeoutMs) => {
  const imgs = [...document.images];
  imgs.forEach(img => { if (img.loading === 'lazy') img.loading = 'eager'; });
  return Promise.all(imgs.map(async img => {
    let decoded = true;
    try {
      await Promise.race([img.decode(), new Promise((_, reject) =>
          setTimeout(() => reject(new Error('timeout')), timeoutMs))]);
    } catch (e) { decoded = false; }
    const url = img.currentSrc || img.src;
    const svg = /\\.svg([?#]|$)/i.test(url) || url.startsWith('data:image/svg');
    return {url: url, attr: img.getAttribute('src') || '',
            ok: decoded && (img.naturalWidth > 0 || svg)};
  }));
}"""

# Wait until MathJax has typeset the page, then list [kind, detail] for every formula it rendered as
# an error (the TeX error message and the formula's source) and for the formulas (Sphinx marks them
# with class "math") that hold no typeset output.
MATH_JS = """async (timeoutMs) => {
  const formulas = [...document.querySelectorAll('.math')];
  const mj = window.MathJax;
  if (!(mj && mj.startup && mj.startup.promise)) {
    return formulas.length ? [['math not typeset',
        `MathJax did not load; ${formulas.length} formula(s) left as TeX`]] : [];
  }
  try {
    await Promise.race([mj.startup.promise, new Promise((_, reject) =>
        setTimeout(() => reject(new Error(`not done after ${timeoutMs} ms`)), timeoutMs))]);
  } catch (e) { return [['math not typeset', `MathJax failed: ${e.message || e}`]]; }
  const found = [];
  for (const item of mj.startup.document.math) {
    item.root.walkTree(node => {
      if (node.isKind('merror')) {
        const message = node.attributes.get('data-mjx-error') || 'error';
        found.push(['MathJax error', `${message} in: ${item.math.replace(/\\s+/g, ' ').trim().slice(0, 120)}`]);
      }
    });
  }
  const bare = formulas.filter(el => !el.querySelector('mjx-container'));
  if (bare.length) {
    const first = bare[0].textContent.replace(/\\s+/g, ' ').trim().slice(0, 80);
    found.push(['math not typeset', `${bare.length} of ${formulas.length} formula(s), first: ${first}`]);
  }
  return found;
}"""

# Text a reader sees as raw TeX: "$$" or "\begin{" in a text node outside code and typeset math.
RAW_TEX_JS = """() => {
  const skip = 'pre, code, kbd, samp, script, style, textarea, template, .math, mjx-container';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const hits = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.textContent;
    if ((text.includes('$$') || text.includes('\\\\begin{')) && !node.parentElement.closest(skip)) {
      hits.push(text.replace(/\\s+/g, ' ').trim().slice(0, 80));
    }
  }
  return hits;
}"""

# Move every frame slider (selora.book.slider) to another value and back; one line for each slider whose
# visible image did not change (or that does not show exactly one frame).
SLIDERS_JS = """() => {
  const boxes = [...document.querySelectorAll('div.selora-frame-slider')];
  const found = [];
  boxes.forEach((box, n) => {
    const input = box.querySelector('input[type=range]');
    const shown = () => [...box.querySelectorAll('img')].filter(img => getComputedStyle(img).display !== 'none');
    const move = value => { input.value = value; input.dispatchEvent(new Event('input', {bubbles: true})); };
    const before = shown(), old = input.value;
    const target = Number(old) === Number(input.max) ? input.min : input.max;
    move(target);
    const after = shown();
    move(old);
    const which = `slider ${n + 1} of ${boxes.length}`;
    if (before.length !== 1) found.push(`${which}: ${before.length} frames visible, expected 1`);
    else if (target !== old && (after.length !== 1 || after[0] === before[0]))
      found.push(`${which}: moving it from ${old} to ${target} does not change the image`);
  });
  return found;
}"""

LINKS_JS = """() => [...document.querySelectorAll('a[href]')].map(
    a => ({href: a.getAttribute('href'), url: a.href}))"""

ELEMENT_EXISTS_JS = """(name) => !!document.getElementById(name)
    || document.getElementsByName(name).length > 0"""


@dataclass(frozen=True)
class Problem:
    """One thing a reader would notice: ``page`` (toc path), ``kind``, human-readable ``detail``."""

    page: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"PROBLEM {self.page}: {self.kind}: {self.detail}"


@dataclass
class PageResult:
    """What was seen on one page (counts feed the summary table)."""

    page: str
    seconds: float = 0.0
    images: int = 0
    links: int = 0
    stderr_outputs: int = 0
    screenshot: Path | None = None
    problems: list[Problem] = field(default_factory=list)


# Control characters a Python escape leaves in LaTeX (module docstring), named by the macros they ate.
CONTROL_CHARS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
CONTROL_NAMES = {
    "\a": "bell, a Python '\\a' (\\alpha?)",
    "\b": "backspace, a Python '\\b' (\\begin, \\beta, \\bar?)",
    "\t": "tab, a Python '\\t' (\\tau, \\theta, \\times, \\text, \\top?)",
    "\v": "vertical tab, a Python '\\v' (\\vec, \\varepsilon?)",
    "\f": "form feed, a Python '\\f' (\\frac?)",
    "\r": "carriage return, a Python '\\r' (\\rho, \\right?)",
}


class InputError(Exception):
    """Bad command-line input (missing folder/file, malformed toc, no browser): exit status 2."""


# ---------------------------------------------------------------------------------------- toc
def _read_toc(toc_file: Path) -> dict:
    """The parsed ``_toc.yml``; InputError for a missing or malformed file."""
    if not toc_file.is_file():
        raise InputError(f"{toc_file}: table of contents not found (expected a _toc.yml file)")
    try:
        toc = yaml.safe_load(toc_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{toc_file}: not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(toc, dict) or not isinstance(toc.get("root"), str):
        raise InputError(f"{toc_file}: expected a mapping with a 'root' document path")
    return toc


def _toc_files(entries: object) -> Iterator[str]:
    """The ``file`` of every entry below ``entries`` (sections, chapters, parts, subtrees), in order."""
    for entry in entries or []:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("file"), str):
            yield entry["file"]
        for key in ("sections", "chapters", "parts"):
            yield from _toc_files(entry.get(key))
        for sub in entry.get("subtrees") or []:
            yield from _toc_files(sub.get("entries") if isinstance(sub, dict) else None)


def _without_suffix(path: str) -> str:
    for suffix in SOURCE_SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return path


def toc_pages(toc_file: Path) -> list[str]:
    """Document paths (no suffix, root first, in order) listed in a Jupyter Book 1.x ``_toc.yml``."""
    toc = _read_toc(toc_file)
    pages: list[str] = []
    for path in (toc["root"], *_toc_files([toc])):
        if _without_suffix(path) not in pages:
            pages.append(_without_suffix(path))
    return pages


# ------------------------------------------------------------------------------------- server
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class LocalServer:
    """Serve ``directory`` on 127.0.0.1 (free port) from a background thread; use as a context."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


# -------------------------------------------------------------------------------------- links
class _AnchorParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value and (key == "id" or (key == "name" and tag == "a")):
                self.names.add(value)


@functools.cache
def anchors_in(html_file: Path) -> frozenset[str]:
    """Every ``id`` (and ``<a name>``) in a static HTML file."""
    parser = _AnchorParser()
    parser.feed(html_file.read_text(encoding="utf-8", errors="replace"))
    return frozenset(parser.names)


def local_target(html_dir: Path, url_path: str) -> Path | None:
    """The file under ``html_dir`` that a same-site URL path resolves to, or None if there is none."""
    target = (html_dir / unquote(url_path).lstrip("/")).resolve()
    if url_path.endswith("/") or target.is_dir():
        target = target / "index.html"
    if not target.is_relative_to(html_dir.resolve()) or not target.is_file():
        return None
    return target


# ------------------------------------------------------------------------------------ sources
def source_file(book_dir: Path, page: str) -> Path | None:
    """The source of toc page ``page`` under ``book_dir`` (the first suffix that exists), or None."""
    for suffix in SOURCE_SUFFIXES:
        if (book_dir / f"{page}{suffix}").is_file():
            return book_dir / f"{page}{suffix}"
    return None


def markdown_parts(source: Path) -> list[tuple[str, str]]:
    """(where, text) of the markdown in a chapter source: each markdown cell of a notebook
    (``"markdown cell 3"``, 0-based index into ``cells``), or the whole file of any other source."""
    text = source.read_text(encoding="utf-8", errors="replace")
    if source.suffix != ".ipynb":
        return [("file", text)]
    cells = json.loads(text)["cells"]
    return [
        (f"markdown cell {i}", "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"])
        for i, cell in enumerate(cells)
        if cell.get("cell_type") == "markdown"
    ]


def control_characters(text: str) -> list[str]:
    """One line per control character in ``text`` (see CONTROL_CHARS), with the text around it."""
    return [
        f"U+{ord(m.group()):04X} {CONTROL_NAMES.get(m.group(), 'control character')} "
        f"in {text[max(0, m.start() - 15) : m.end() + 15]!r}"
        for m in CONTROL_CHARS.finditer(text)
    ]


def source_problems(book_dir: Path, page: str) -> list[Problem]:
    """Control characters in the markdown of page ``page``'s source (module docstring)."""
    source = source_file(book_dir, page)
    if source is None:
        return [Problem(page, "missing source", f"no {page}{{{','.join(SOURCE_SUFFIXES)}}} under {book_dir}")]
    try:
        parts = markdown_parts(source)
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not a notebook's cells
        return [Problem(page, "unreadable source", f"{source.name}: not a notebook ({exc.__class__.__name__})")]
    return [
        Problem(page, "control character", f"{source.name} {where}: {line}")
        for where, text in parts
        for line in control_characters(text)
    ]


# -------------------------------------------------------------------------------------- check
def image_problems(tab: Page, same_site: Callable[[str], bool]) -> tuple[int, list[tuple[str, str]]]:
    """(number of same-site images, [(src attribute, url)] of those that did not load)."""
    images = [
        im
        for im in tab.evaluate(IMAGES_JS, IMAGE_TIMEOUT_MS)
        if same_site(im["url"]) or im["url"].startswith("data:") or not im["url"]
    ]
    return len(images), [(im["attr"], im["url"]) for im in images if not im["ok"]]


def link_problems(
    tab: Page, same_site: Callable[[str], bool], html_dir: Path, html_file: Path
) -> tuple[int, list[str]]:
    """(number of links, details of same-site links whose file or anchor does not exist)."""
    links = tab.evaluate(LINKS_JS)
    resolved = {link["href"]: link["url"] for link in links if link["href"] and same_site(link["url"])}
    broken = []
    for href, url in sorted(resolved.items()):
        parts = urlsplit(url)
        target = local_target(html_dir, parts.path)
        if target is None:
            broken.append(f"{href} (no such file)")
            continue
        name = unquote(parts.fragment)
        if not name or target.suffix != ".html" or name in anchors_in(target):
            continue
        if target == html_file.resolve() and tab.evaluate(ELEMENT_EXISTS_JS, name):
            continue  # an id added by the page's own scripts
        broken.append(f"{href} (no element with id '{name}' in {target.name})")
    return len(links), broken


def content_problems(tab: Page) -> list[tuple[str, str]]:
    """(kind, detail) of what reads wrong on a loaded page: cell error outputs, tables shown as
    text, math (waits for MathJax to finish: MathJax errors, untypeset formulas), raw TeX, frame
    sliders that do not change their image when moved, and code cells wider than their column."""
    found = [("cell error output", line[:300]) for line in tab.evaluate(CELL_ERROR_JS)]
    found += [("raw markdown table", f"a cell output shows a table as text: {t}") for t in tab.evaluate(RAW_TABLE_JS)]
    found += [(kind, detail[:300]) for kind, detail in tab.evaluate(MATH_JS, MATH_TIMEOUT_MS)]
    found += [("raw TeX", f"the page shows TeX source as text: {t}") for t in tab.evaluate(RAW_TEX_JS)]
    found += [("frame slider", detail) for detail in tab.evaluate(SLIDERS_JS)]
    found += [("code wider than the page", f"scroll sideways to read: {t}") for t in tab.evaluate(WIDE_CODE_JS)]
    return found


def _inspect(
    tab: Page,
    url: str,
    html_dir: Path,
    html_file: Path,
    shots: Path,
    result: PageResult,
    failed: dict[str, str],
    say: Callable[[str, str], None],
    same_site: Callable[[str], bool],
) -> list[tuple[str, str]]:
    """Load ``url`` in ``tab``, record its images, content, stderr outputs, links and a screenshot in
    ``result`` (problems through ``say``; ``failed``: the failed requests so far); return the broken images
    as (attribute, url)."""
    response = tab.goto(url, wait_until="load", timeout=PAGE_TIMEOUT_MS)
    if response is None or response.status >= 400:
        say("missing page", f"{result.page}.html answered {response.status if response else 'nothing'}")
    try:
        tab.wait_for_load_state("networkidle", timeout=IDLE_TIMEOUT_MS)
    except PlaywrightTimeout:  # still busy after the grace period: check what has rendered
        pass
    result.images, broken_images = image_problems(tab, same_site)
    for attr, img in broken_images:
        say("broken image", f"{attr[:120] or '(no src)'} ({failed.get(img, 'did not decode, naturalWidth 0')})")
    for kind, detail in content_problems(tab):
        say(kind, detail)
    result.stderr_outputs = tab.evaluate(STDERR_JS)
    result.links, broken_links = link_problems(tab, same_site, html_dir, html_file)
    for detail in broken_links:
        say("broken link", detail)
    result.screenshot = shots / f"{result.page.replace('/', '-')}.png"
    shots.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(result.screenshot, tab.screenshot(full_page=True))  # 0644: for people to open
    return broken_images


def _network_problems(
    page_url: str,
    origin: str,
    failed: dict[str, str],
    console: list,
    broken_images: list[tuple[str, str]],
    say: Callable[[str, str], None],
    same_site: Callable[[str], bool],
) -> None:
    """Failed same-site requests (beyond the broken images and the page itself) and console errors."""
    skip = {url for _, url in broken_images} | {page_url}
    for url, why in sorted(failed.items()):
        if url not in skip:
            say("resource failed", f"{url[len(origin) :]} ({why})")
    for msg in console:
        # "Failed to load resource" repeats what the network events report (and the browser's
        # implicit /favicon.ico probe); errors raised by scripts from other hosts do not count.
        where = (msg.location or {}).get("url", "")
        if msg.text.startswith("Failed to load resource") or (where and not same_site(where)):
            continue
        say("console error", first_line(msg.text) or "(empty message)")


def check_page(browser: Browser, origin: str, html_dir: Path, page: str, shots: Path) -> PageResult:
    """Visit one toc page as a first-time reader (fresh profile: no localStorage from other pages)
    and collect its problems (see module docstring)."""
    result = PageResult(page)
    start = time.perf_counter()

    def say(kind: str, detail: str) -> None:
        result.problems.append(Problem(page, kind, detail))

    def same_site(url: str) -> bool:
        return url.startswith(origin + "/")

    html_file = html_dir / f"{page}.html"
    if not html_file.is_file():
        say("missing page", f"{page}.html is not in the HTML folder (listed in the toc)")
        return result

    failed: dict[str, str] = {}
    console: list = []
    broken_images: list[tuple[str, str]] = []
    context = browser.new_context(viewport=VIEWPORT)
    context.route(
        "**/*", lambda route: route.continue_() if same_site(route.request.url) else route.abort()
    )  # other hosts: blocked
    tab = context.new_page()
    tab.on(
        "pageerror",
        lambda exc: say("page error", first_line(f"{exc.name}: {exc.message}" if exc.name else exc.message)),
    )
    tab.on("console", lambda msg: console.append(msg) if msg.type == "error" else None)
    tab.on(
        "response",
        lambda r: failed.setdefault(r.url, f"HTTP {r.status}") if r.status >= 400 and same_site(r.url) else None,
    )
    tab.on(
        "requestfailed",
        lambda r: (
            failed.setdefault(r.url, r.failure or "failed")
            if same_site(r.url) and "ERR_ABORTED" not in (r.failure or "")
            else None
        ),
    )
    try:
        url = f"{origin}/{page}.html"
        broken_images = _inspect(tab, url, html_dir, html_file, shots, result, failed, say, same_site)
    except PlaywrightError as exc:  # a page that cannot be loaded or inspected is a problem too
        say("page failed to load", f"{exc.__class__.__name__}: {first_line(str(exc))}")
    finally:
        context.close()

    _network_problems(f"{origin}/{page}.html", origin, failed, console, broken_images, say, same_site)
    result.seconds = time.perf_counter() - start
    return result


def first_line(text: str) -> str:
    """The first line of ``text``, cut to 300 characters (problem lines stay one line)."""
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def check_site(html_dir: Path, toc_file: Path, shots: Path, chromium: str = DEFAULT_CHROMIUM) -> list[PageResult]:
    """Check every toc page of the built book in ``html_dir`` and its source (the toc's path under
    the toc's folder); one :class:`PageResult` per page."""
    if not html_dir.is_dir():
        raise InputError(f"{html_dir}: HTML folder not found (build the book first: make book)")
    pages = toc_pages(toc_file)
    if not Path(chromium).is_file():
        raise InputError(f"{chromium}: Chromium not found (install it: apt-get install -y chromium)")

    with LocalServer(html_dir) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            results = [check_page(browser, server.origin, html_dir, page, shots) for page in pages]
        finally:
            browser.close()
    for result in results:
        result.problems += source_problems(toc_file.parent, result.page)
    return results


def summary_table(results: list[PageResult]) -> str:
    """A fixed-width table: one row per page with counts, time and verdict."""
    width = max([len("page")] + [len(r.page) for r in results])
    head = (
        f"{'page':<{width}}  {'verdict':<7}  {'problems':>8}  {'images':>6}  {'links':>5}  "
        f"{'stderr':>6}  {'seconds':>7}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.page:<{width}}  {'FAIL' if r.problems else 'ok':<7}  {len(r.problems):>8}  "
            f"{r.images:>6}  {r.links:>5}  {r.stderr_outputs:>6}  {r.seconds:>7.1f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--html", type=Path, default=ROOT / "_build" / "html", help="built HTML folder (default: _build/html)"
    )
    parser.add_argument(
        "--toc", type=Path, default=ROOT / "_toc.yml", help="table of contents listing the pages (default: _toc.yml)"
    )
    parser.add_argument(
        "--screenshots", type=Path, default=None, help="where page screenshots go (default: <html>/../screenshots)"
    )
    parser.add_argument(
        "--chromium", default=DEFAULT_CHROMIUM, help=f"Chromium executable (default: {DEFAULT_CHROMIUM})"
    )
    args = parser.parse_args(argv)
    shots = args.screenshots or args.html.parent / "screenshots"
    start = time.perf_counter()
    try:
        results = check_site(args.html, args.toc, shots, args.chromium)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = [p for r in results for p in r.problems]
    for problem in problems:
        print(problem)
    print(summary_table(results))
    elapsed = time.perf_counter() - start
    if problems:
        pages = len({p.page for p in problems})
        print(
            f"FAILED: {len(problems)} problem(s) on {pages} of {len(results)} page(s) "
            f"({elapsed:.1f} s); screenshots in {shots}"
        )
        return 1
    print(f"OK: {len(results)} page(s) checked in {elapsed:.1f} s; screenshots in {shots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
