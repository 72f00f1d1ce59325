"""Crash-safe writer of a warehouse (numpy + h5py only); the reader is store.reader.

``WarehouseReader``, ``load_manifest`` and ``shard_indices`` are re-exported from here, where
callers have always imported them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from store.errors import WarehouseError
from store.ledger import Ledger
from store.lock import WriterLock
from store.reader import WarehouseReader, load_manifest, shard_indices
from store.schema import (
    ABLATION_DIR,
    ENV_MUST_MATCH,
    LOCK_NAME,
    MANIFEST_NAME,
    MODEL_FILE,
    PARTIAL_SUFFIX,
    PROMPTS_DIR,
    SCHEMA_VERSION,
    VALIDATION_DTYPE,
    WAREHOUSE_KIND,
    F,
    StoreDtype,
    prompt_shard_name,
)
from store.shard import ShardWriter, fsync_dir, partial_path, publish


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON next to ``path`` and rename it over: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=PARTIAL_SUFFIX)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a warehouse is meant to be shared
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def validation_array(rows: list[tuple[str, float, float, float, bool]]) -> np.ndarray:
    """Rows of (invariant, max_abs_err, rel_err, tolerance, passed) as the stored dtype."""
    return np.array(rows, dtype=VALIDATION_DTYPE)


class WarehouseWriter:
    """Creates or resumes a warehouse directory; every file it leaves is complete.

    Holds the warehouse's writer lock (store.lock) from ``create`` until ``close`` or the
    process's death; records every committed file's SHA-256 in the ledger (store.ledger).

    ``staging=True`` (a Ray actor's writer, which holds no lock): files are sealed as
    ``*.partial``, never recorded or renamed, and ``take_staged`` hands them to the lock
    holder, which makes them shards with ``publish``. Such a writer has no ledger at all.
    """

    manifest: dict[str, Any]
    ledger: Ledger | None

    def __init__(self, root: Path, store_dtype: StoreDtype = "float32", *, staging: bool = False) -> None:
        self.root = Path(root)
        self.store_dtype = store_dtype
        self.warnings: list[str] = []
        self.ledger = None if staging else Ledger(self.root)
        self.staged: list[tuple[Path, str]] | None = [] if staging else None
        self._lock: WriterLock | None = None
        self.manifest = {}  # set by create(); a bare writer stamps no fingerprint

    @classmethod
    def create(cls, root: Path, manifest: dict[str, Any], *, resume: bool,
               allow_env_change: bool = False) -> WarehouseWriter:
        """Start a new warehouse at ``root``, or continue one made with the same fingerprint.

        Refuses, changing nothing: a directory that is not ours; one of ours made from another
        model or prompt set; one another writer holds; on resume, an environment whose
        ``ENV_MUST_MATCH`` keys differ from the first run's (unless ``allow_env_change``).
        ``manifest["environments"]``, if given, is this run's entry: a resume appends it.
        """
        root = Path(root)
        if not (root / MANIFEST_NAME).exists() and root.exists() and any(
                p for p in root.iterdir() if not p.name.startswith(".") and p.name != LOCK_NAME):
            raise WarehouseError(
                f"{root} exists and is not an echo-warehouse (no {MANIFEST_NAME}); "
                "choose an empty or new --out directory"
            )
        root.mkdir(parents=True, exist_ok=True)
        lock = WriterLock.acquire(root)  # before anything else is read or changed
        try:
            manifest = _admit(root, manifest, resume=resume, allow_env_change=allow_env_change)
            lock.announce(str((manifest.get("config") or {}).get("extra", {}).get("command", "")))
        except BaseException:
            lock.release(clear=False)
            raise
        w = cls(root, manifest.get("config", {}).get("store_dtype", "float32"))
        w._lock = lock
        (root / PROMPTS_DIR).mkdir(exist_ok=True)
        (root / ABLATION_DIR).mkdir(exist_ok=True)
        for stale in root.rglob(f"*{PARTIAL_SUFFIX}"):
            stale.unlink()  # left by a killed run: never complete, safe to drop
        w.ledger.compact()
        w.manifest = manifest
        w.write_manifest()
        return w

    def close(self) -> None:
        """Release the writer lock (also released by the OS if the process dies)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> WarehouseWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_manifest(self, **updates: Any) -> None:
        self.manifest.update(updates)
        self.manifest["kind"] = WAREHOUSE_KIND
        self.manifest["schema_version"] = SCHEMA_VERSION
        write_json_atomic(self.root / MANIFEST_NAME, self.manifest)

    def done(self, subdir: str = PROMPTS_DIR) -> set[int]:
        """Indices of prompts whose shard in ``subdir`` is complete."""
        return set(shard_indices(self.root / subdir))

    def has_model_file(self) -> bool:
        return (self.root / MODEL_FILE).exists()

    def _stamp(self, **more: Any) -> dict[str, Any]:
        fp = self.manifest.get("fingerprint")
        return {**({"fingerprint": fp} if fp is not None else {}), **more}

    def model_writer(self) -> ShardWriter:
        return ShardWriter(self.root / MODEL_FILE, "float32", ledger=self.ledger, stamp=self._stamp(),
                           staged=self.staged)

    def shard_writer(self, index: int, subdir: str = PROMPTS_DIR, name: str | None = None) -> ShardWriter:
        """``subdir/pNNNNN.h5``, or ``subdir/name`` (a stage's own file name: ``wNNNNN.h5``, ``graph.h5``)."""
        return _Collecting(self.root / subdir / (name or prompt_shard_name(index)), self.store_dtype, self.warnings,
                           ledger=self.ledger, stamp=self._stamp(**({} if name else {"prompt_index": index})),
                           staged=self.staged)

    def take_staged(self) -> list[tuple[str, str]]:
        """(path relative to the warehouse, SHA-256) of each file sealed since the last call,
        in order: what a staging writer's owner hands to ``publish``. Empties the list."""
        if self.staged is None:
            raise ValueError("take_staged needs a staging writer (WarehouseWriter(..., staging=True))")
        out = [(final.relative_to(self.root).as_posix(), digest) for final, digest in self.staged]
        self.staged.clear()
        return out

    def publish(self, staged: Sequence[tuple[str, str]]) -> list[str]:
        """Make the files a staging writer sealed into shards: their ledger entries first (one
        durable append), then the renames (store.ledger says why this order is crash-safe).

        A file whose final name already exists is not published (a finished shard is never
        rewritten): its sealed copy is removed. Returns the relative paths published. A sealed
        file this process cannot see is a one-line WarehouseError: the staging writer wrote
        somewhere else (a directory not shared by every node).
        """
        if self.ledger is None:
            raise ValueError("a staging writer cannot publish: the writer holding the lock does")
        items: list[tuple[Path, str]] = []
        for rel, digest in staged:
            final = self.root / rel
            if (Path(rel).is_absolute() or ".." in Path(rel).parts
                    or not re.fullmatch(r"[0-9a-f]{64}", digest)):
                raise WarehouseError(f"refusing to publish {rel!r} (SHA-256 {digest!r}) into {self.root}: "
                                     "not a file of this warehouse")
            tmp = partial_path(final)
            if final.exists():
                tmp.unlink(missing_ok=True)
                continue
            if not tmp.is_file():
                raise WarehouseError(f"{tmp}: written by a worker but not visible here; --out must be a "
                                     "directory every node shares")
            items.append((final, digest))
        publish(items, self.ledger)
        return [final.relative_to(self.root).as_posix() for final, _ in items]


def _admit(root: Path, manifest: dict[str, Any], *, resume: bool, allow_env_change: bool) -> dict[str, Any]:
    """Under the lock: may this run write here? Returns the manifest to write."""
    if not (root / MANIFEST_NAME).exists():
        return manifest
    old = load_manifest(root)
    if not resume:
        raise WarehouseError(
            f"{root} already holds a warehouse; pass --resume to continue it, "
            "or choose a new --out directory"
        )
    if old.get("fingerprint") != manifest["fingerprint"]:
        diff = _fingerprint_diff(old.get("fingerprint_parts", {}), manifest["fingerprint_parts"])
        raise WarehouseError(
            f"cannot resume {root}: it was made with a different {diff}; "
            "use a new --out directory or the original settings"
        )
    before, now = old.get("environments") or [], manifest.get("environments") or []
    if before and now and not allow_env_change:
        changed = [f"{k} {before[0].get(k)} -> {now[-1].get(k)}" for k in ENV_MUST_MATCH
                   if before[0].get(k) != now[-1].get(k)]
        if changed:
            raise WarehouseError(
                f"cannot resume {root}: the environment differs from the run that made it "
                f"({'; '.join(changed)}); numbers would mix environments: pass --allow-env-change "
                "to resume anyway (both environments are recorded)"
            )
    # Carried over: a resume adds to the record of the run, it does not replace it.
    return {**manifest, "timings": old.get("timings", {}), "created": old.get("created"),
            "placement": old.get("placement", []),
            "warnings": old.get("warnings", []), "environments": [*before, *now]}


class _Collecting(ShardWriter):
    """A shard writer that hands its warnings to the warehouse writer on commit."""

    def __init__(self, final: Path, store_dtype: StoreDtype, sink: list[str], **kw: Any) -> None:
        super().__init__(final, store_dtype, **kw)
        self._sink = sink

    def commit(self) -> None:
        super().commit()
        self._sink.extend(self.warnings)


def _fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys) if keys else "configuration"


__all__ = [
    "F",
    "ShardWriter",
    "WarehouseError",
    "WarehouseReader",
    "WarehouseWriter",
    "load_manifest",
    "shard_indices",
    "validation_array",
    "write_json_atomic",
]
