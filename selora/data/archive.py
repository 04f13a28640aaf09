"""Download, check and safely extract a zip archive.

Used by :func:`selora.data.montgomery.download_montgomery`; the code is generic so that the
tests can feed it a local zip, a local HTTP server or a fake URL opener through exactly the
same path. A source that answers with something other than a zip (an HTML page served with
status 200 by a moved address, a cut-short transfer, a failed check) counts as failed and the
next source is tried.
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import stat
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.request import urlopen

from tqdm.auto import tqdm

from selora.data.errors import ChecksumMismatch, DataError, DownloadFailed
from selora.io import atomic_dir, atomic_path

Opener = Callable[[str], BinaryIO]
Check = Callable[[Path, str], None]  # check(file, label): raise DataError if the file is unusable
CHUNK = 1 << 20
TIMEOUT_S = 60
ZIP_MAGIC = b"PK\x03\x04"  # a zip's first local file header; an empty zip (PK\x05\x06) holds nothing
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x1f\x8b", "a gzip file"),
    (b"%PDF", "a PDF document"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"PK\x03\x04", "a zip archive"),
)


def describe_start(head: bytes) -> str:
    """What a file is, judged by its first bytes: ``"an HTML page"``, ``"a JPEG image"``, ..."""
    if not head:
        return "an empty file"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1024].lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text:
        return "an HTML page"
    if text.startswith(b"<?xml"):
        return "an XML document"
    if text.startswith((b"{", b"[")):
        return "JSON text"
    return f"data starting {head[:12]!r}"


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


def verify_sha256(path: Path, expected: str, label: str | None = None) -> str:
    """Return ``path``'s sha256; raise :class:`ChecksumMismatch` (expected vs got) when it is not ``expected``.

    Call it only on a file already known to be the right kind of archive (:func:`check_zip` and a
    layout check): the caller may then offer the reader to accept ``err.got`` deliberately.
    """
    got, want = sha256_file(path), expected.strip().lower()
    if got != want:
        raise ChecksumMismatch(
            f"{label or path}: sha256 mismatch, expected {want} but got {got}", got, path.stat().st_size
        )
    return got


def _fetch(url: str, tmp: Path, name: str, opener: Opener, magic: bytes | None) -> None:
    """Stream ``url`` into ``tmp``; refuse at once a body that does not start with ``magic``."""
    with open(tmp, "wb") as out, opener(url) as response:
        headers = getattr(response, "headers", None) or {}
        total = int(headers.get("Content-Length", 0) or 0) or None
        block = response.read(CHUNK)
        while magic and len(block) < len(magic) and (more := response.read(CHUNK)):
            block += more
        if magic and not block.startswith(magic):
            kind = headers.get("Content-Type", "")
            raise DataError(
                f"{url}: answered with {describe_start(block)}{f' ({kind})' if kind else ''}, not a zip archive"
                " (has the address moved?)"
            )
        got = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
            while block:
                out.write(block)
                got += len(block)
                bar.update(len(block))
                block = response.read(CHUNK)
    if total is not None and got != total:
        raise DataError(f"{url}: transfer cut short, got {got:,} of {total:,} bytes")


def download(
    urls: Sequence[str],
    dest: Path,
    opener: Opener = open_url,
    check: Check | None = None,
    magic: bytes | None = ZIP_MAGIC,
) -> Path:
    """Fetch ``urls`` in order into ``dest`` (atomically, with a progress bar) until one passes; return ``dest``.

    A source fails when it cannot be reached, answers with a body that does not start with
    ``magic`` (checked on the first bytes, so a moved address's HTML page is refused at once),
    sends fewer bytes than its Content-Length, or when ``check(file, url)`` raises
    :class:`DataError`; the partial file is deleted and the next URL tried. ``opener(url)``
    returns a binary file-like response (:func:`open_url` by default). When every source fails,
    :class:`DownloadFailed` lists each one's reason (and keeps the errors in ``failures``).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, Exception]] = []
    for url in urls:
        try:
            with atomic_path(dest) as tmp:
                _fetch(url, tmp, dest.name, opener, magic)
                if check is not None:
                    check(tmp, url)
            return dest
        except DataError as err:
            failures.append((url, err))
        except (OSError, http.client.HTTPException) as err:  # URLError/HTTPError are OSErrors
            failures.append((url, DataError(f"{url}: {err}")))
    raise DownloadFailed(
        f"could not download {dest.name} from any source ({'; '.join(str(e) for _, e in failures)})", failures
    )


def _check_member(info: zipfile.ZipInfo, label: str) -> None:
    """Refuse absolute paths, ``..`` components (zip-slip) and symlinks."""
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts:
        raise DataError(f"{label}: unsafe entry {name!r} (absolute path or '..'); refusing to extract")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"{label}: entry {name!r} is a symbolic link; refusing to extract")


def check_zip(path: Path, label: str | None = None, expected_size: int | None = None) -> list[zipfile.ZipInfo]:
    """Check that ``path`` is a complete, safe zip archive and return its entries.

    In this order, each cheaper than the next: the magic bytes (an HTML page or an empty file is
    named as such), the size against ``expected_size`` when given (a file shorter than that and
    unreadable is reported as an incomplete download), the central directory, and each entry
    (no absolute paths, no ``..``, no symlinks). ``label`` names the file in messages.
    """
    label = label or str(path)
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if not head.startswith(ZIP_MAGIC):
        raise DataError(f"{label}: {describe_start(head)}, not a zip archive")
    size = path.stat().st_size
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        if expected_size and size < expected_size:
            raise DataError(f"{label}: incomplete zip archive, {size:,} of {expected_size:,} bytes ({err})") from None
        raise DataError(f"{label}: damaged zip archive of {size:,} bytes ({err})") from None
    with zf:
        members = zf.infolist()
    for info in members:
        _check_member(info, label)
    return members


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
            _check_member(info, archive.name)
        if not any(PurePosixPath(i.filename).parts[:1] == (top,) for i in members):
            raise DataError(f"{archive.name}: no top-level folder {top!r} in the archive")
        dest.mkdir(parents=True, exist_ok=True)
        with atomic_dir(target) as tmp:
            for info in members:
                parts = PurePosixPath(info.filename).parts
                if parts[:1] == (top,) and len(parts) > 1:
                    inner = copy.copy(info)  # the same entry, named relative to ``top``
                    inner.filename = "/".join(parts[1:]) + ("/" if info.is_dir() else "")
                    try:
                        zf.extract(inner, tmp)
                    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
                        raise DataError(f"{archive}: entry {info.filename!r} is damaged ({err})") from None
    return target
