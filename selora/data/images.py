"""Reading radiographs (8-bit or 12-bit-in-16-bit PNG) and the paper's resize/centre-crop.

Every decoding problem becomes a one-line :class:`DataError` naming the file;
:func:`png_problem` checks one file strictly (structure, CRCs, full decode) for the data check.
"""

from __future__ import annotations

import struct
import sys
import warnings
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from selora.data.archive import describe_start
from selora.data.errors import DataError

TWELVE_BIT_MAX = 4095
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_gray(path: Path) -> tuple[np.ndarray, int]:
    """Decode a grayscale radiograph; return (array in [0, 1] of shape (H, W), float32; bit depth).

    16-bit PNGs whose values all fit in 12 bits (the Montgomery ReadMe's "12-bit") are divided by
    4095, other 16-bit ones by 65535, 8-bit ones by 255. Colour images are converted to gray with
    a warning; an image that is not a PNG but decodable (e.g. JPEG bytes behind a ``.png`` name)
    is decoded by content with a warning.
    """
    try:
        with Image.open(path) as img:
            img.load()
            fmt, mode = img.format, img.mode
            if fmt != "PNG":
                warnings.warn(f"{path}: contains {fmt} data, not PNG; decoded by content", stacklevel=2)
            if mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                warnings.warn(f"{path}: {mode} image, expected grayscale; converted to gray", stacklevel=2)
                img = img.convert("L")
                mode = "L"
            arr = np.asarray(img)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (expected a grayscale PNG)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: truncated or corrupt image ({err}); expected a complete PNG") from None
    if mode == "L" or arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0, 8
    if mode in ("I;16", "I;16B", "I") or arr.dtype in (np.uint16, np.int32):
        arr = arr.astype(np.float32)
        if arr.min() < 0 or arr.max() > 65535:
            raise DataError(f"{path}: pixel values outside 0..65535; expected a 16-bit PNG")
        bits = 12 if arr.max() <= TWELVE_BIT_MAX else 16
        return arr / float((1 << bits) - 1), bits
    raise DataError(f"{path}: unsupported image mode {mode!r}; expected 8- or 16-bit grayscale")


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shortest side to ``size`` (bilinear, antialiased), then centre-crop size x size.

    ``image``: (H, W) or (1, H, W) in [0, 1] -> (1, size, size) in [-1, 1].
    """
    img = image.reshape(1, 1, *image.shape[-2:]).float()
    h, w = img.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    img = F.interpolate(img, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    img = img[..., top : top + size, left : left + size].clamp(0.0, 1.0)
    return (img * 2.0 - 1.0).reshape(1, size, size)


def load_image(path: Path, size: int) -> torch.Tensor:
    """Decode ``path`` and return the model input, shape (1, size, size), values in [-1, 1]."""
    arr, _ = read_gray(path)
    return resize_center_crop(torch.from_numpy(arr), size)


def png_structure_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete PNG file (``None`` if it is), without decoding the pixels.

    Checks the signature (other content is named: ``"a JPEG image, not a PNG"``), then walks the
    chunks: each must fit in the file and match its CRC, the first must be IHDR and the file
    must reach IEND. A file cut short after its pixel data (no IEND) decodes, but is incomplete.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(len(PNG_SIGNATURE))
        if head != PNG_SIGNATURE:
            return f"{describe_start(head + fh.read(1024))}, not a PNG"
        offset, first = len(PNG_SIGNATURE), True
        while True:
            header = fh.read(8)
            if len(header) < 8:
                return f"truncated: the file ends at byte {offset + len(header):,} without the IEND chunk"
            length, kind = struct.unpack(">I4s", header)
            name = kind.decode("latin-1")
            if first and kind != b"IHDR":
                return f"damaged: the first chunk is {name!r}, expected IHDR"
            if offset + 12 + length > size:  # checked before reading: a damaged length could be 4 GB
                return f"truncated inside the {name} chunk at byte {offset:,} (the file ends at byte {size:,})"
            body = fh.read(length + 4)
            if zlib.crc32(kind + body[:length]) != struct.unpack(">I", body[length:])[0]:
                return f"damaged: CRC mismatch in the {name} chunk at byte {offset:,}"
            if kind == b"IEND":
                return None
            offset += 12 + length
            first = False


def _problem_and_bits(path: Path) -> tuple[str | None, int | None]:
    problem = png_structure_problem(path)
    if problem is not None:
        return problem, None
    try:
        return None, read_gray(path)[1]
    except DataError as err:
        return str(err).removeprefix(f"{path}: "), None


def png_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as a radiograph (``None`` if it can): :func:`png_structure_problem`,
    then a full decode with :func:`read_gray`. The reason does not repeat the path."""
    return _problem_and_bits(path)[0]


def check_images(paths: Sequence[Path], progress: bool = True) -> tuple[list[tuple[Path, str]], Counter]:
    """Decode every file of ``paths`` in a progress bar (stderr); return (bad files with the reason, bit depths).

    A file is bad when :func:`png_problem` finds a reason: not a PNG (its content is named),
    truncated, a CRC mismatch, or it does not decode as a grayscale radiograph.
    """
    bad, bits = [], Counter()
    for path in tqdm(paths, desc="decoding images", unit="image", disable=not progress, file=sys.stderr):
        problem, depth = _problem_and_bits(path)
        if problem is None:
            bits[depth] += 1
        else:
            bad.append((path, problem))
    return bad, bits
