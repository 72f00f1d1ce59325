"""One writer at a time: an exclusive ``flock`` on ``W/writer.lock``.

The kernel releases a ``flock`` when its holder dies (even by SIGKILL), so a killed run never
leaves a stale lock. The lock file itself is never deleted (deleting it would let two writers
lock two different inodes); it holds a line of JSON naming the current holder (pid, host,
start time, command), cleared on a clean release. Readers (query, report, verify) never take
the lock: they open only complete shards, read-only. ``current_writer`` tells a reader whether
a writer is active without taking the lock (``/proc/locks`` on Linux).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from store.errors import WarehouseError
from store.schema import LOCK_NAME


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a warehouse's writer lock."""

    pid: int
    host: str
    started: str  # ISO 8601, UTC
    command: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


def _read_holder(path: Path) -> Holder | None:
    try:
        d = json.loads(path.read_text() or "null")
        return Holder(int(d["pid"]), str(d["host"]), str(d["started"]), str(d.get("command", "")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


class WriterLock:
    """An exclusive, non-blocking writer lock held for the life of a WarehouseWriter."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, root: Path) -> WriterLock:
        """Take the lock at once or raise a one-line WarehouseError naming the holder.

        Nothing in the lock file changes when the lock is refused.
        """
        path = Path(root) / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(root, _read_holder(path)) from None
        return cls(path, fd)

    def announce(self, command: str = "") -> Holder:
        """Write this process's name into the lock file (after the run's checks passed)."""
        holder = Holder(os.getpid(), socket.gethostname(),
                        datetime.now(UTC).isoformat(timespec="seconds"), command or " ".join(sys.argv))
        self._rewrite(json.dumps(asdict(holder)) + "\n")
        return holder

    def _rewrite(self, text: str) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)
        os.fsync(self._fd)

    def release(self, clear: bool = True) -> None:
        """Clear the holder line (when this run wrote one) and unlock; idempotent."""
        if self._fd is None:
            return
        try:
            if clear:
                self._rewrite("")
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


    def __del__(self) -> None:  # a writer dropped without close() still lets go
        with contextlib.suppress(OSError):
            self.release()


def _busy(root: Path, holder: Holder | None) -> WarehouseError:
    who = holder.describe() if holder else "another process (it has not written its name yet)"
    return WarehouseError(
        f"{root} is being written by another extraction ({who}); wait for it to finish "
        "or choose another --out (readers such as query and verify may run meanwhile)"
    )


def refuse_if_writing(root: Path) -> None:
    """Fail at once, changing nothing, if a writer holds ``root`` (before a model is loaded);
    WriterLock.acquire remains the authoritative check."""
    holder = current_writer(root)
    if holder is not None:
        raise _busy(Path(root), holder)


def current_writer(root: Path) -> Holder | None:
    """The active writer of ``root``, or None; never takes or waits for the lock.

    Linux: the kernel's table of flock locks (``/proc/locks``) for the lock file's inode.
    Elsewhere: the recorded holder if its pid is alive on this host.
    """
    path = Path(root) / LOCK_NAME
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    holder = _read_holder(path)
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        table = None
    if table is not None:
        for line in table.splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(st.st_ino):
                dev = parts[5].split(":")
                if len(dev) == 3 and int(dev[0], 16) == os.major(st.st_dev) and int(dev[1], 16) == os.minor(st.st_dev):
                    return holder or Holder(int(parts[4]), socket.gethostname(), "unknown")
        return None
    if holder is None or holder.host != socket.gethostname():
        return holder
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return holder
