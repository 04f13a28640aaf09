"""Show the package's real source in a chapter, a block at a time, beside the equation it implements.

labml-style annotated implementations put each equation next to the lines that compute it. A chapter
calls :func:`show_source` with a function or class and two markers (text on the first and last line
of the block); the lines are read from the installed module at execution time, so the page always
shows the code that ran, never a copy that can drift.
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path

from IPython.display import Markdown

from selora.paths import PACKAGE_DIR

__all__ = ["SourceBlock", "show_source", "source_block"]


@dataclass(frozen=True)
class SourceBlock:
    """Lines ``first..last`` (1-based, inclusive) of ``path``, dedented as ``code``."""

    path: Path
    first: int
    last: int
    code: str

    @property
    def where(self) -> str:
        """``selora/core/expansion.py, lines 10–20`` (the path relative to the package's parent)."""
        return f"{self.path.relative_to(PACKAGE_DIR.parent).as_posix()}, lines {self.first}–{self.last}"


def _find(lines: list[str], marker: str, start: int, what: str, name: str) -> int:
    for i in range(start, len(lines)):
        if marker in lines[i]:
            return i
    raise ValueError(f"{name}: no line from line {start + 1} of its source contains the {what} marker {marker!r}")


def source_block(obj: object, first: str, last: str | None = None) -> SourceBlock:
    """The block of ``obj``'s source (a function, method or class) from the first line containing
    ``first`` to the next line containing ``last`` (the ``first`` line alone when ``last`` is None).
    Raises ``ValueError`` naming the marker that matches no line (the source changed: update the chapter)."""
    obj = inspect.unwrap(obj)  # a decorated function (``@torch.no_grad()``): its own source, not the wrapper's
    name = getattr(obj, "__qualname__", repr(obj))
    lines, offset = inspect.getsourcelines(obj)
    begin = _find(lines, first, 0, "first", name)
    end = begin if last is None else _find(lines, last, begin, "last", name)
    code = textwrap.dedent("".join(lines[begin : end + 1])).rstrip("\n")
    return SourceBlock(Path(inspect.getsourcefile(obj)).resolve(), offset + begin, offset + end, code)


def show_source(obj: object, first: str, last: str | None = None) -> Markdown:
    """:func:`source_block` as a Markdown code block captioned with its file and lines, for a chapter cell."""
    block = source_block(obj, first, last)
    return Markdown(f"```python\n{block.code}\n```\n<small>{block.where}</small>")
