"""Decoding a Montgomery ``ClinicalReadings`` file's bytes into text, tolerantly (a wrong guess warns)."""

from __future__ import annotations

import codecs
import warnings
from pathlib import Path


def decode_readings(path: Path, raw: bytes) -> str:
    """The text of a readings file: UTF-8 (a BOM is skipped), UTF-16 with a BOM, or else Windows-1252.

    Text that is not UTF-8 is decoded as Windows-1252 (every byte becomes a character; the five
    it leaves undefined become U+FFFD) with a warning naming the file and the first bad byte,
    since a wrong guess could change a prompt.
    """
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            pass  # not UTF-16 after all: the tolerant route below
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = skip + err.start
        warnings.warn(
            f"{path}: not UTF-8 (byte 0x{raw[at]:02x} at offset {at}); decoded as Windows-1252, check its prompt",
            stacklevel=3,
        )
        return raw[skip:].decode("cp1252", errors="replace")
