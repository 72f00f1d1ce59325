"""The one exception type the store raises for user-facing problems."""

from __future__ import annotations


class WarehouseError(Exception):
    """A user-facing problem with a warehouse (missing, foreign, damaged, locked): one line
    that names the file."""


def first_line(e: BaseException) -> str:
    """An exception's message as one line (h5py's are one line; others may not be)."""
    text = str(e).strip().strip("'\"")
    return text.splitlines()[0] if text else type(e).__name__
