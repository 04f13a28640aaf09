"""The one exception the data pipeline raises for bad input: a single line naming file and fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data on disk or a bad argument; ``str(err)`` is one line that names the file."""


class ChecksumMismatch(DataError):
    """An archive of the right kind and layout whose sha256 is not the expected one.

    Only this error may lead to advice to accept the file's checksum: ``got`` is that checksum,
    ``size`` the file's size in bytes.
    """

    def __init__(self, message: str, got: str, size: int) -> None:
        super().__init__(message)
        self.got, self.size = got, size


class DownloadFailed(DataError):
    """No source gave an acceptable file; ``failures`` holds (url, error) for each one tried."""

    def __init__(self, message: str, failures: list[tuple[str, Exception]]) -> None:
        super().__init__(message)
        self.failures = failures
