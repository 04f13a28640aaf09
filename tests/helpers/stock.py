"""A fresh interpreter where ``import selora`` fails: exports must load in the stock libraries alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

#: The start of every stock-library script: `import selora` fails there (exports must not need it).
BLOCK_SELORA = textwrap.dedent(
    """
    import sys

    class BlockSelora:
        def find_spec(self, name, path=None, target=None):
            if name == "selora" or name.startswith("selora."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked in this test)")
            return None

    sys.meta_path.insert(0, BlockSelora())
    sys.path = [p for p in sys.path if p not in ("", ".")]
    """
)


def run_stock(script: Path, source: str, args: list) -> None:
    """Write ``source`` (starting with :data:`BLOCK_SELORA`) to ``script`` and run it with ``args`` in a
    fresh isolated interpreter (``-I``, no ``PYTHONPATH``), one torch thread, the hub offline."""
    script.write_text(source, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-I", str(script), *map(str, args)],
        cwd=script.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"stock process failed:\n{proc.stderr[-4000:]}"
