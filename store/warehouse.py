"""Crash-safe writer and read-only, self-checking reader of a warehouse (numpy + h5py only)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from store.checks import FIELDS, Expect, Kind, check_dataset, check_names, shard_dims, text
from store.errors import WarehouseError, first_line
from store.ledger import Ledger
from store.lock import WriterLock
from store.schema import (
    ABLATION_DIR,
    ENV_MUST_MATCH,
    LOCK_NAME,
    MANIFEST_NAME,
    MODEL_FILE,
    PARTIAL_SUFFIX,
    PATCHING_DIR,
    PROMPTS_DIR,
    SCHEMA_VERSION,
    VALIDATION_DTYPE,
    WAREHOUSE_KIND,
    F,
    Field,
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

    def shard_writer(self, index: int, subdir: str = PROMPTS_DIR) -> ShardWriter:
        return _Collecting(self.root / subdir / prompt_shard_name(index), self.store_dtype, self.warnings,
                           ledger=self.ledger, stamp=self._stamp(prompt_index=index), staged=self.staged)

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
    old = _load_manifest(root)
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


def shard_indices(folder: Path) -> list[int]:
    """Prompt indices of the complete shards in a folder (``pNNNNN.h5``; ``*.partial`` never)."""
    out = []
    for p in folder.glob("p*.h5"):
        try:
            out.append(int(p.stem[1:]))
        except ValueError:
            continue
    return sorted(out)


def _fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys) if keys else "configuration"


def load_manifest(root: Path) -> dict[str, Any]:
    """The manifest of ``root``, refusing foreign directories and other schema versions."""
    mpath = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WarehouseError(f"{mpath} is unreadable ({e}); is this an echo-warehouse?") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != WAREHOUSE_KIND:
        raise WarehouseError(f"{root} is not an echo-warehouse ({MANIFEST_NAME} has another kind)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise WarehouseError(
            f"{root} has schema version {manifest.get('schema_version')}, this tool reads "
            f"{SCHEMA_VERSION}; re-run the extraction with this version"
        )
    return manifest


_load_manifest = load_manifest


class _Dataset(h5py.Dataset):
    """A dataset whose reads turn HDF5 failures (a Fletcher32 mismatch) into a WarehouseError."""

    def __getitem__(self, args: Any, new_dtype: Any = None) -> Any:
        try:
            return super().__getitem__(args, new_dtype=new_dtype)
        except OSError as e:
            raise _damaged(self, e) from None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        try:
            return super().__array__(dtype, copy)
        except OSError as e:
            raise _damaged(self, e) from None


def _damaged(ds: h5py.Dataset, e: Exception) -> WarehouseError:
    root = Path(ds.file.filename).parent.parent
    return WarehouseError(f"{ds.file.filename}: dataset {ds.name.lstrip('/')} is damaged ({first_line(e)}); "
                          f"`echowh verify -w {root}` lists every damaged file")


class _Attrs(Mapping[str, Any]):
    """A shard's attributes with text as ``str`` (stored fixed-length UTF-8, read as bytes)."""

    def __init__(self, attrs: h5py.AttributeManager) -> None:
        self._a = attrs

    def __getitem__(self, key: str) -> Any:
        v = self._a[key]
        if isinstance(v, bytes):
            return v.decode()
        if isinstance(v, np.ndarray) and v.dtype.kind == "S":
            return np.array([x.decode() for x in v.tolist()], dtype=object)
        return v

    def __iter__(self) -> Iterator[str]:
        return iter(self._a)

    def __len__(self) -> int:
        return len(self._a)

    def __contains__(self, key: object) -> bool:
        return key in self._a


class _Shard(h5py.File):
    """A shard opened read-only whose datasets are checked against the schema on first use."""

    @property
    def attrs(self) -> _Attrs:  # type: ignore[override]
        return _Attrs(super().attrs)

    kind: Kind
    dims: dict[str, int]
    expect: Expect
    checked: set[str]

    def __getitem__(self, name: Any) -> Any:
        try:
            obj = super().__getitem__(name)
        except (KeyError, OSError) as e:
            if isinstance(e, KeyError) and not (isinstance(name, str) and name in self):
                raise  # no such object: Group.get and `in` rely on this KeyError
            raise WarehouseError(f"{self.filename}: object {name} is damaged ({first_line(e)}); "
                                 "`echowh verify` lists every damaged file") from None
        if not isinstance(obj, h5py.Dataset):
            return obj
        key = obj.name.lstrip("/")
        if key not in self.checked:
            fld = next((f for f in FIELDS[self.kind] if f.name == key), None)
            bad = check_dataset(obj, fld, self.dims, self.expect) if fld is not None else None
            if bad:
                raise WarehouseError(f"{self.filename}: {bad}; `echowh verify` lists every damaged file")
            self.checked.add(key)
        return _Dataset(obj.id)


class WarehouseReader:
    """Read-only access to a warehouse: files are opened in 'r' mode and never written.

    Every shard is checked when first opened (fingerprint, schema version, prompt index,
    datasets present) and each dataset when first read (rank, sizes, dtype); Fletcher32
    catches damaged data chunks on read. Each failure is a one-line WarehouseError naming the
    file, never a traceback or a wrong number. Never takes the writer lock.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise WarehouseError(
                f"no warehouse at {self.root}; run `echowh extract --out {self.root}` first"
            )
        if not (self.root / MANIFEST_NAME).exists():
            raise WarehouseError(
                f"{self.root} is not an echo-warehouse (no {MANIFEST_NAME}); "
                "point -w at a directory made by `echowh extract`"
            )
        self.manifest = load_manifest(self.root)
        self._files: dict[Path, _Shard] = {}
        self._expect: Expect | None = None

    # -- files ---------------------------------------------------------------------------
    def expect(self) -> Expect:
        """What every shard must look like (from the manifest and model.h5's attributes)."""
        if self._expect is None:
            attrs = self.model_attrs()
            self._expect = Expect.from_warehouse(self.manifest, attrs)
        return self._expect

    def _open(self, path: Path, kind: Kind, index: int | None = None) -> _Shard:
        f = self._files.get(path)
        if f is not None:
            return f
        try:
            f = _Shard(path, "r", locking=False)
        except (OSError, KeyError) as e:
            raise WarehouseError(f"{path}: not a readable HDF5 shard ({first_line(e)}); "
                                 f"`echowh verify -w {self.root}` lists every damaged file") from None
        try:
            f.kind, f.checked = kind, set()
            # model.h5's own sizes are the expectation: only its fingerprint is checked here
            f.expect = Expect(self.manifest.get("fingerprint"), {}) if kind == "model" else self.expect()
            f.dims, problems = shard_dims(kind, f.attrs, index, f.expect, strict=False)
            problems += check_names(kind, set(f.keys()), f.expect, strict=False)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            problems = [f"unreadable metadata ({first_line(e)})"]
        except WarehouseError:
            f.close()
            raise
        if problems:
            f.close()
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise WarehouseError(f"{path}: {problems[0]}{more}; `echowh verify -w {self.root}` "
                                 "lists every damaged file")
        self._files[path] = f
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> WarehouseReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- contents ------------------------------------------------------------------------
    def prompt_indices(self, subdir: str = PROMPTS_DIR) -> list[int]:
        """Indices of complete shards, sorted."""
        return shard_indices(self.root / subdir)

    def ablation_indices(self) -> list[int]:
        return self.prompt_indices(ABLATION_DIR)

    def shard(self, index: int, subdir: str = PROMPTS_DIR) -> h5py.File:
        path = self.root / subdir / prompt_shard_name(index)
        if not path.exists():
            raise WarehouseError(f"prompt {index} has no shard in {self.root / subdir}")
        kind: Kind = ("ablation" if subdir == ABLATION_DIR
                      else "patching" if subdir.split("/")[0] == PATCHING_DIR else "prompt")
        return self._open(path, kind, index)

    def model_file(self) -> h5py.File:
        path = self.root / MODEL_FILE
        if not path.exists():
            raise WarehouseError(f"{self.root} has no {MODEL_FILE}; the extraction did not start")
        return self._open(path, "model")

    def model_attrs(self) -> dict[str, Any]:
        return {k: text(v) for k, v in self.model_file().attrs.items()}

    def prompt_attrs(self, index: int) -> dict[str, Any]:
        return {k: text(v) for k, v in self.shard(index).attrs.items()}

    def read(self, field: Field, index: int, sel: Any = (), subdir: str = PROMPTS_DIR) -> np.ndarray:
        """Read ``field`` of prompt ``index``; ``sel`` slices before reading (e.g. one layer)."""
        ds = self.shard(index, subdir)[field.name]
        if field.dtype == "str":
            return np.array([s.decode() if isinstance(s, bytes) else s for s in np.atleast_1d(ds[sel])])
        if field.dtype == "compound":
            return ds[sel]
        return np.asarray(ds.astype(field.dtype)[sel])

    def read_model(self, field: Field) -> np.ndarray:
        f = self.model_file()
        if field.name not in f:
            raise WarehouseError(f"{f.filename}: dataset {field.name} missing; "
                                 f"`echowh verify -w {self.root}` lists every damaged file")
        ds = f[field.name]
        if field.dtype == "str":
            return np.array(ds.asstr()[()], dtype=object)
        return ds[()]

    def has(self, field: Field, index: int, subdir: str = PROMPTS_DIR) -> bool:
        return field.name in self.shard(index, subdir)

    def iter_prompts(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in self.prompt_indices():
            yield i, self.prompt_attrs(i)


__all__ = [
    "F",
    "ShardWriter",
    "WarehouseError",
    "WarehouseReader",
    "WarehouseWriter",
    "load_manifest",
    "validation_array",
    "write_json_atomic",
]
