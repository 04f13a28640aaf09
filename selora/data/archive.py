"""Download, verify and safely extract a zip archive.

Used by :func:`selora.data.montgomery.download_montgomery`; the code is generic so that the
tests can feed it a local zip and a fake URL opener through exactly the same path.
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import stat
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.request import urlopen

from tqdm.auto import tqdm

from selora.data.errors import DataError
from selora.io import atomic_dir, atomic_path

Opener = Callable[[str], BinaryIO]
CHUNK = 1 << 20
TIMEOUT_S = 60


def open_url(url: str) -> BinaryIO:
    """The default opener: ``urllib.request.urlopen`` with a timeout, so a dead host cannot hang."""
    return urlopen(url, timeout=TIMEOUT_S)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, how_to_override: str, delete: bool) -> None:
    """Raise (after deleting ``path`` if ``delete``) when its sha256 is not ``expected``.

    ``how_to_override`` may use ``{got}``; it tells the reader how to accept the file deliberately.
    """
    got = sha256_file(path)
    if got != expected.strip().lower():
        if delete:
            path.unlink(missing_ok=True)
        raise DataError(
            f"{path.name}: sha256 mismatch, expected {expected.strip().lower()} but got {got}"
            f"{' (file deleted)' if delete else ''}; if the archive was re-packed and you trust it, "
            + how_to_override.format(got=got)
        )


def download(urls: Sequence[str], dest: Path, opener: Opener = open_url) -> Path:
    """Fetch the first URL of ``urls`` that works into ``dest`` (atomically, with a progress bar).

    ``opener(url)`` returns a binary file-like response (:func:`open_url` by default; tests pass
    a function serving a local file).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        try:
            with atomic_path(dest) as tmp, open(tmp, "wb") as out, opener(url) as response:
                total = int(getattr(response, "headers", {}).get("Content-Length", 0) or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        out.write(block)
                        bar.update(len(block))
            return dest
        except (OSError, http.client.HTTPException) as err:  # URLError/HTTPError are OSErrors
            errors.append(f"{url}: {err}")
    raise DataError(f"could not download {dest.name} from any source ({'; '.join(errors)})")


def _check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    """Refuse absolute paths, ``..`` components (zip-slip) and symlinks."""
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts:
        raise DataError(f"{archive.name}: unsafe entry {name!r} (absolute path or '..'); refusing to extract")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"{archive.name}: entry {name!r} is a symbolic link; refusing to extract")


def safe_extract(archive: Path, dest: Path, top: str) -> Path:
    """Extract ``archive`` so that ``dest/top`` appears atomically; return ``dest/top``.

    Every entry is checked before anything is written; the entries under ``top/`` are extracted
    into a temporary folder beside ``dest/top`` which is renamed into place
    (:func:`selora.io.atomic_dir`), so an interrupted run leaves nothing half-made. Other
    top-level entries are ignored. A second call when ``dest/top`` exists is a no-op.
    """
    target = dest / top
    if target.is_dir():
        return target
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{archive}: not a readable zip archive ({err})") from None
    with zf:
        members = zf.infolist()
        for info in members:
            _check_member(info, archive)
        if not any(PurePosixPath(i.filename).parts[:1] == (top,) for i in members):
            raise DataError(f"{archive.name}: no top-level folder {top!r} in the archive")
        dest.mkdir(parents=True, exist_ok=True)
        with atomic_dir(target) as tmp:
            for info in members:
                parts = PurePosixPath(info.filename).parts
                if parts[:1] == (top,) and len(parts) > 1:
                    inner = copy.copy(info)  # the same entry, named relative to ``top``
                    inner.filename = "/".join(parts[1:]) + ("/" if info.is_dir() else "")
                    zf.extract(inner, tmp)
    return target
