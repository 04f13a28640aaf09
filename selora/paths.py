"""Where things live: the repository, shipped assets, and the data/run cache.

Paths are resolved from the package location or environment variables, never hard-coded.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"


def repo_root() -> Path | None:
    """The source checkout holding this package (``_config.yml`` beside it), or None if installed."""
    root = PACKAGE_DIR.parent
    return root if (root / "_config.yml").is_file() else None


def cache_dir(*parts: str) -> Path:
    """``$SELORA_CACHE`` (default ``<repo>/.cache`` in a checkout, else ``~/.cache/selora``) / parts.

    The folder is created on first use.
    """
    env = os.environ.get("SELORA_CACHE")
    if env:
        base = Path(env)
    elif repo_root() is not None:
        base = repo_root() / ".cache"
    else:
        base = Path.home() / ".cache" / "selora"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
