"""``shards.sha256``: the SHA-256 of every file the writer committed, recorded before the rename.

Format: ``sha256sum`` lines (``<hex digest>  <path relative to the warehouse>``), so a finished
warehouse also checks with ``cd W && sha256sum -c shards.sha256``.

Crash-safety argument. A shard is written as ``*.partial``, flushed, closed and fsynced; its
SHA-256 is then computed from those final bytes and appended to the ledger, which is fsynced;
only then is the file renamed to its final name (and the directory fsynced). Renaming does
not change a file's bytes, so:

- every file under a final name has a ledger entry describing exactly its content (the entry
  was durable before the name existed);
- a kill before the append leaves only a ``*.partial`` (dropped on resume) and no entry;
- a kill between the append and the rename leaves an entry for a name that does not exist, or
  that an older shard still holds only if it is being rewritten (never: finished shards are
  not rewritten); a later write of that name appends a new entry, and the last entry wins;
- a kill during the append leaves a torn last line without a newline, which is ignored.

``compact`` (run by the writer under its lock when a run starts) rewrites the ledger
atomically with one entry per existing file, so after a finished run ``sha256sum -c`` passes.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

from store.schema import LEDGER_NAME, PARTIAL_SUFFIX

_LINE = re.compile(r"^([0-9a-f]{64})  (\S.*)$")
_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, streamed in 1 MiB blocks (memory does not grow with the file)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def read_ledger(root: Path) -> dict[str, str] | None:
    """Relative path -> recorded SHA-256 (the last entry wins); None when there is no ledger."""
    path = Path(root) / LEDGER_NAME
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    out: dict[str, str] = {}
    for line in text.split("\n")[:-1]:  # the part after the last newline is torn (or empty)
        m = _LINE.match(line)
        if m:
            out[m.group(2)] = m.group(1)
    return out


class Ledger:
    """Appends entries for one warehouse; thread-safe (the extraction writes from a thread)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LEDGER_NAME
        self._lock = threading.Lock()

    def record(self, final: Path, digest: str) -> None:
        """Durably append ``digest`` for ``final`` (call before renaming the file to ``final``)."""
        rel = Path(final).relative_to(self.root).as_posix()
        line = f"{digest}  {rel}\n".encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def compact(self) -> None:
        """Rewrite atomically with one entry per file that exists (in path order)."""
        entries = read_ledger(self.root) or {}
        keep = {k: v for k, v in sorted(entries.items()) if (self.root / k).is_file()}
        tmp = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        with open(tmp, "w") as fh:
            fh.writelines(f"{v}  {k}\n" for k, v in keep.items())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
