"""Preprocessing cache: all resized images of a data set in one safetensors file.

The file name carries a hash of the source files' bytes and of the transform, so any change to
either builds a new cache; later epochs read only this file, never the PNGs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from selora.data.archive import CHUNK
from selora.data.images import load_image
from selora.io import atomic_save_safetensors

TRANSFORM_VERSION = 1  # bump when load_image's output changes, so old caches are not reused


def cache_key(files: Sequence[Path], transform: dict) -> str:
    """sha256 over (name, bytes) of every file in order, plus the transform's JSON; hex, 16 chars."""
    digest = hashlib.sha256(json.dumps(transform, sort_keys=True).encode())
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def cached_stack(
    files: Sequence[Path],
    transform: dict,
    load: Callable[[Path], torch.Tensor],
    cache_dir: Path,
    prefix: str,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, Path, bool]:
    """Return (stack of ``load(f)`` for f in files, shape (N, ...); cache path; True if read from cache).

    ``transform`` describes what ``load`` does (e.g. ``{"size": 224}``) and enters the key; the
    stack is stored as ``dtype`` (float16 halves large caches at ~1e-3 precision).
    """
    key = cache_key(files, {**transform, "dtype": str(dtype)})
    path = Path(cache_dir) / f"{prefix}-{key}.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor("images"), path, True
    stack = torch.stack([load(f) for f in tqdm(files, desc=f"preprocessing {prefix}", unit="img")]).to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"files": json.dumps([f.name for f in files]), "transform": json.dumps(transform)}
    atomic_save_safetensors({"images": stack.contiguous()}, path, meta)
    return stack, path, False


class ImageStack:
    """Model inputs for a list of image files: ``stack[i]`` is (1, size, size) float32 in [-1, 1].

    With ``cache=True`` every file is decoded once and the stack lives in a safetensors file under
    ``cache_dir`` (default ``selora.paths.cache_dir("data", "preprocessed")``); otherwise each
    access decodes the file.
    """

    def __init__(
        self,
        files: Sequence[Path],
        size: int,
        prefix: str,
        cache: bool = True,
        cache_dir: Path | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.files, self.size = list(files), size
        self.images: torch.Tensor | None = None
        self.path: Path | None = None
        self.from_cache = False
        if cache:
            from selora.paths import cache_dir as default_cache_dir

            folder = Path(cache_dir) if cache_dir is not None else default_cache_dir("data", "preprocessed")
            transform = {"size": size, "crop": "center", "v": TRANSFORM_VERSION}
            self.images, self.path, self.from_cache = cached_stack(
                self.files, transform, lambda f: load_image(f, size), folder, prefix, dtype
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[i].float()
        return load_image(self.files[i], self.size)
