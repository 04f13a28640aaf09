"""Floating-point dtypes by name: THE table of the command lines' ``--dtype`` and the config's ``mixed_precision``."""

from __future__ import annotations

import torch

#: ``--dtype`` names (export storage, benchmarks) -> torch dtype.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Config ``mixed_precision`` -> the autocast dtype of the frozen models (``no``: none, full precision).
AUTOCAST: dict[str, torch.dtype | None] = {"no": None, "fp16": DTYPES["float16"], "bf16": DTYPES["bfloat16"]}
#: The half-precision dtypes (those :data:`AUTOCAST` can choose).
HALF_DTYPES: tuple[torch.dtype, ...] = tuple(d for d in AUTOCAST.values() if d is not None)

__all__ = ["AUTOCAST", "DTYPES", "HALF_DTYPES"]
