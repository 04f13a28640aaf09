"""Optional dependencies: which extra of ``pyproject.toml`` brings which module, checked before a command
starts work (a missing one found after hours of training loses them)."""

from __future__ import annotations

import importlib.util

#: extra -> {import name: distribution name} of what it adds to the core dependencies.
EXTRAS = {"paper": {"torch_fidelity": "torch-fidelity"}}  # Inception-v3 features for torchmetrics' FID


class MissingExtraError(ImportError):
    """An optional dependency a command needs is not installed; the message names the extra."""


def require_extra(extra: str, purpose: str) -> None:
    """Raise :class:`MissingExtraError` (one line: ``purpose``, the missing distribution, the pip command)
    unless every module of ``extra`` can be imported; nothing is imported here."""
    if extra not in EXTRAS:
        raise ValueError(f"extra {extra!r}: expected one of {', '.join(EXTRAS)}")
    for module, dist in EXTRAS[extra].items():
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(f'{purpose} needs {dist}, which is not installed: pip install "selora[{extra}]"')
