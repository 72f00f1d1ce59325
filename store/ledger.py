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

One process writes the ledger. A local run appends from its own process. Under ``--ray`` many
actor processes, possibly on other nodes, write shards into a shared directory, and concurrent
``O_APPEND`` writes are atomic on a local filesystem but not on NFS (each client computes the
end of the file itself: lines from two nodes can overwrite each other). So the work is split
(``store.shard.ShardWriter`` with ``staged``, ``WarehouseWriter(staging=True)``,
``WarehouseWriter.publish``):

- the actor *seals* a shard: writes it as ``*.partial``, flushes, closes and fsyncs it and
  computes its SHA-256, then stops -- no ledger entry, no rename -- and returns
  (final path, digest) with the task's result;
- the driver, the one process holding the writer lock, *publishes* what a result lists:
  it appends all its entries to the ledger (one write, one fsync), then renames each
  ``*.partial`` to its final name and fsyncs the directories.

The order above is unchanged (the entry is durable before the name exists), so the argument
holds as it is, with two more places a kill can land:

- the actor dies after sealing, before its result reaches the driver: ``*.partial`` files
  without entries, never under a shard's name. Ray retries the task, which rewrites them (it
  writes every shard whose final name is missing), or a ``--resume`` deletes them and
  recomputes them; ``verify`` lists them as partial writes, never as shards;
- the driver dies before or during the publishing: the same as a local run killed before the
  append, or between the append and the rename (entries for names that do not exist, dropped
  by ``compact`` on resume).

Had the actor renamed the file itself and left only the append to the driver, a kill between
the two would leave a complete-looking shard without an entry: ``verify`` would flag it for
ever and ``--resume`` would count it as done. Publishing in the driver keeps the invariant
that every final name has an entry for exactly its bytes, whoever wrote them.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Sequence
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


def read_ledger(root: Path, name: str = LEDGER_NAME) -> dict[str, str] | None:
    """Relative path -> recorded SHA-256 (the last entry wins); None when there is no ledger.
    ``name``: the ledger's file name (a Parquet export's is ``export.sha256``)."""
    path = Path(root) / name
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
        self.record_many([(final, digest)])

    def record_many(self, entries: Sequence[tuple[Path, str]]) -> None:
        """Durably append one entry per (final path, digest), in one write and one fsync."""
        if not entries:
            return
        data = "".join(f"{digest}  {Path(final).relative_to(self.root).as_posix()}\n"
                       for final, digest in entries).encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:  # os.write may write less than asked (a signal, a full disk's edge)
                    view = view[os.write(fd, view):]
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
