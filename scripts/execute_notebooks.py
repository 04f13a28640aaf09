"""Execute chapters in place so they are committed with their outputs.

    python scripts/execute_notebooks.py [book/NN-name.ipynb ...]   # default: every chapter

Each notebook first gets the current setup cell (scripts/setup_cell.py), then runs top to bottom
in its own folder with the offline profile and one torch thread (unless SELORA_PROFILE /
SELORA_THREADS are set). Outputs are scrubbed of
machine paths; an execution error leaves the file untouched and exits non-zero.
"""

from __future__ import annotations

import html
import importlib.metadata
import os
import platform
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from selora.io import atomic_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from setup_cell import ROOT, chapter_notebooks, sync

PATH_RE = re.compile(r"(?:/work/|/tmp/|/root/|/home/|/private/|/var/folders/)[\w.+-]+(?:/[\w.+-]+)*")


def scrub(text: str) -> str:
    """Replace absolute machine paths in ``text`` by a short, stable marker."""
    text = text.replace(str(ROOT), "<repo>")
    return PATH_RE.sub("<path>", text)


def scrub_outputs(nb: nbformat.NotebookNode) -> None:
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = scrub(out["text"])
            for key in ("text/plain", "text/html", "text/markdown"):
                if key in out.get("data", {}):
                    value = out["data"][key]
                    out["data"][key] = scrub(value if isinstance(value, str) else "".join(value))


def _bar_text(children: list[dict]) -> str | None:
    """tqdm's text for a finished notebook bar: its widgets ``[HTML prefix, FloatProgress, HTML suffix]``."""
    if [c["model_name"] for c in children] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    prefix, bar, suffix = (c["state"] for c in children)
    filled = round(10 * bar["value"] / bar["max"]) if bar.get("max") else 0
    text = f"{prefix['value']}|{'█' * filled}{' ' * (10 - filled)}|{suffix['value']}"
    return html.unescape(text).replace("\u2007", " ")


def settle_progress_bars(nb: nbformat.NotebookNode) -> None:
    """Give every progress-bar widget output the text of its final state: the plain-text fallback
    is written when the bar starts (a frozen "0%"), while the stored widget state holds where it ended."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            box = state.get(view["model_id"]) if view else None
            if box is None or box["model_name"] != "HBoxModel":
                continue
            children = [state.get(c.removeprefix("IPY_MODEL_")) for c in box["state"].get("children", [])]
            text = _bar_text(children) if all(children) else None
            if text is not None:
                out["data"]["text/plain"] = text


#: The libraries whose versions a chapter's outputs depend on (recorded in every executed chapter).
RECORDED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "numpy", "matplotlib")


def execution_setting() -> dict[str, object]:
    """What the chapters are executed with, recorded in each notebook's metadata (``selora.executed_with``):
    profile, torch threads, Python and library versions. ``tests/test_book_structure.py`` checks that
    every chapter carries the same record, so the book is executed with one setting."""
    return {
        "profile": os.environ["SELORA_PROFILE"],
        "threads": int(os.environ["SELORA_THREADS"]),
        "python": platform.python_version(),
        **{name: importlib.metadata.version(name) for name in RECORDED_PACKAGES},
    }


#: Seconds a cell may take: the offline chapters' longest cell is a few minutes; the paper profile's
#: training cells run for hours on a GPU, so they get no limit.
CELL_TIMEOUT = {"offline": 900, "paper": None}


def execute(path: Path, timeout: int | None = None) -> float:
    """Run ``path`` in place (cell timeout: ``timeout`` or the profile's :data:`CELL_TIMEOUT`); return seconds."""
    sync(path)
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)  # a previous run's widget state; this run stores its own, if any
    os.environ.setdefault("SELORA_PROFILE", "offline")
    os.environ.setdefault("SELORA_THREADS", "1")  # as `make test` runs them (see Makefile)
    if timeout is None:
        timeout = CELL_TIMEOUT[os.environ["SELORA_PROFILE"]]
    start = time.perf_counter()
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    scrub_outputs(nb)
    settle_progress_bars(nb)
    nb.metadata["selora"] = {"executed_with": execution_setting()}
    with atomic_path(path) as tmp:
        nbformat.write(nb, tmp)
    return time.perf_counter() - start


if __name__ == "__main__":
    targets = [Path(p).resolve() for p in sys.argv[1:]] or chapter_notebooks()
    for p in targets:
        print(f"{p.relative_to(ROOT)}: executing ...", flush=True)
        print(f"{p.relative_to(ROOT)}: {execute(p):.0f} s", flush=True)
