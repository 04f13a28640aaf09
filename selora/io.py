"""Atomic writes: a file or folder appears at its final path complete, or not at all.

Everything is written to a hidden temporary sibling (``.name.XXXX.tmp``, same folder, so the same
file system), flushed to the disk (``fsync`` of the file, or of every file and folder of a folder),
and moved into place with ``os.replace``, whose folder entry is flushed too; so a power cut leaves
the old content or the new one, never a renamed empty file. An exception on the way deletes the
temporary and leaves whatever was at the final path untouched. ``tempfile`` creates temporaries
private (0600/0700); the final mode is set explicitly (0644 files, 0755 folders by default:
outputs of this package are meant to be shared).

:func:`read_jsonl` reads back the JSON-lines records a run appends (``metrics.jsonl``, ``rank_history.jsonl``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

FILE_MODE = 0o644
DIR_MODE = 0o755


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """:func:`fsync_path` every file and folder under ``folder``, ``folder`` last."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in (*files, *dirs):
            fsync_path(Path(root) / name)
    fsync_path(folder)


def _temp_name(path: Path) -> dict[str, str]:
    """``mkstemp``/``mkdtemp`` arguments for a hidden temporary beside ``path``."""
    return {"dir": str(path.parent), "prefix": f".{path.name}.", "suffix": ".tmp"}


@contextmanager
def atomic_path(path: str | Path, mode: int = FILE_MODE) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on normal exit it becomes ``path``.

    The caller writes the temporary by name (it exists, empty). On normal exit it is flushed to the
    disk, gets ``mode`` and replaces ``path`` (the folder entry flushed too); on an exception it is
    deleted and the exception re-raised, so ``path`` keeps its previous content. ``path``'s folder
    must exist.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(**_temp_name(path))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str, mode: int = FILE_MODE) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return ``path``."""
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = FILE_MODE) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    mode: int = FILE_MODE,
) -> Path:
    """``safetensors.torch.save_file(tensors, path, metadata)`` atomically; return ``path``.

    Tensors must be contiguous (safetensors' own rule); ``metadata`` values are strings.
    """
    with atomic_path(path, mode) as tmp:
        save_file(dict(tensors), str(tmp), metadata=None if metadata is None else dict(metadata))
    return Path(path)


@contextmanager
def atomic_dir(path: str | Path, mode: int = DIR_MODE) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on normal exit it is flushed to the disk
    (:func:`fsync_tree`) and becomes ``path``.

    An existing ``path`` is first renamed to ``<path>.old`` and deleted after the new folder is
    in place, so a crash between the two renames leaves a complete ``<path>.old`` to fall back to
    (a stale ``<path>.old`` from such a crash is deleted first). On an exception the temporary
    folder is deleted, ``path`` is untouched and the exception re-raised. ``path``'s folder
    must exist.
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(**_temp_name(path)))
    old = path.with_name(path.name + ".old")
    try:
        yield tmp
        fsync_tree(tmp)
        os.chmod(tmp, mode)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)
    if old.exists():
        shutil.rmtree(old)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file ``path``, one dict per line, in order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
