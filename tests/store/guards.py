"""``ledger_untouched``: fail a test if the code under it opens a warehouse's SHA-256 ledger or
gives a file in the warehouse a new name (what a Ray actor's staging writer must never do)."""

from __future__ import annotations

import builtins
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from store.ledger import Ledger
from store.schema import LEDGER_NAME


@contextmanager
def ledger_untouched(root: Path) -> Iterator[None]:
    """Under this: opening ``root``'s ledger in any mode (``os.open``, ``open``, ``io.open``),
    any ``Ledger.record_many``/``compact`` and any rename into ``root`` raise AssertionError;
    on exit, the ledger's bytes must be those it had on entry."""
    root = Path(root).resolve()
    ledger = root / LEDGER_NAME
    before = ledger.read_bytes() if ledger.exists() else None
    real_os_open, real_open, real_replace, real_rename = os.open, builtins.open, os.replace, os.rename

    def check_open(path: object) -> None:
        if isinstance(path, str | bytes | os.PathLike) and Path(os.fsdecode(path)).name == LEDGER_NAME:
            raise AssertionError(f"opened the ledger {os.fsdecode(path)}")

    def os_open(path, *a, **k):
        check_open(path)
        return real_os_open(path, *a, **k)

    def open_(file, *a, **k):
        check_open(file)
        return real_open(file, *a, **k)

    def renamer(real):
        def rename(src, dst, *a, **k):
            if root in Path(os.fsdecode(dst)).resolve().parents:
                raise AssertionError(f"renamed {os.fsdecode(src)} to {os.fsdecode(dst)}")
            return real(src, dst, *a, **k)
        return rename

    def forbidden(*a, **k):
        raise AssertionError("wrote the ledger through store.ledger.Ledger")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", os_open)
        mp.setattr(builtins, "open", open_)
        mp.setattr(io, "open", open_)
        mp.setattr(os, "replace", renamer(real_replace))
        mp.setattr(os, "rename", renamer(real_rename))
        mp.setattr(Ledger, "record_many", forbidden)
        mp.setattr(Ledger, "compact", forbidden)
        yield
    assert (ledger.read_bytes() if ledger.exists() else None) == before, "the ledger changed"
