"""The one exception the data pipeline raises for bad input: a single line naming file and fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data on disk or a bad argument; ``str(err)`` is one line that names the file."""
