"""The setup cell every chapter opens with, rendered from ``_config.yml``.

``python scripts/setup_cell.py`` rewrites the first code cell of every chapter listed in
``_toc.yml`` to this exact text, tagged :data:`TAGS` (``hide-input``: the rendered page shows a
toggle and the cell's one printed line); ``tests/test_book_structure.py`` checks it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
#: Tags of the setup cell: ``setup`` marks it, ``hide-input`` folds its source behind a toggle.
TAGS = ("setup", "hide-input")

TEMPLATE = """\
# Setup: the same first cell in every chapter (scripts/setup_cell.py).
# On Colab it installs selora; with a GPU runtime the profile is "paper".
import os, subprocess, sys

if "google.colab" in sys.modules:
    SOURCE = "git+{url}@{branch}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    f"selora[colab] @ {{SOURCE}}"], check=True)
    # Runs, downloads and latents live in SELORA_CACHE; a Colab runtime
    # forgets its disk. To keep them (and resume Table 1) across sessions,
    # uncomment the next two lines (Google Drive):
    # from google.colab import drive; drive.mount("/content/drive")
    # os.environ["SELORA_CACHE"] = "/content/drive/MyDrive/selora-cache"

import selora

# seeds python/numpy/torch, sets threads, prints profile and versions
SETUP = selora.setup(seed=0)
PROFILE = SETUP["profile"]"""


def load_config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))


def setup_source() -> str:
    """The exact source of the setup cell, with the repository URL from ``_config.yml``."""
    repo = load_config()["repository"]
    return TEMPLATE.format(url=repo["url"], branch=repo.get("branch", "main"))


def toc_files() -> list[str]:
    """Files listed in ``_toc.yml`` (without suffix), root first, in order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]

    def walk(entries: list) -> None:
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", []):
        walk(part.get("chapters", []))
    walk(toc.get("chapters", []))
    return files


def chapter_notebooks() -> list[Path]:
    """Every ``.ipynb`` listed in ``_toc.yml``, as paths."""
    return [ROOT / f"{f}.ipynb" for f in toc_files() if (ROOT / f"{f}.ipynb").is_file()]


def sync(path: Path) -> bool:
    """Make the first code cell of ``path`` the setup cell (source and tags; outputs kept);
    return True if the file changed."""
    nb = nbformat.read(path, as_version=4)
    cell = nbformat.v4.new_code_cell(setup_source(), metadata={"tags": list(TAGS)})
    codes = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    if codes and TAGS[0] in nb.cells[codes[0]].metadata.get("tags", []):
        old = nb.cells[codes[0]]
        tags = old.metadata.get("tags", [])
        if old.source == cell.source and all(t in tags for t in TAGS):
            return False
        old.source = cell.source
        old.metadata["tags"] = tags + [t for t in TAGS if t not in tags]
    else:
        first_code = codes[0] if codes else len(nb.cells)
        nb.cells.insert(first_code, cell)
    nbformat.write(nb, path)
    return True


if __name__ == "__main__":
    targets = [Path(p) for p in sys.argv[1:]] or chapter_notebooks()
    for p in targets:
        print(("updated " if sync(p) else "ok      ") + str(p.relative_to(ROOT) if p.is_absolute() else p))
