"""Crash-safe writer and read-only reader of a warehouse directory (numpy + h5py only)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from store.schema import (
    ABLATION_DIR,
    MANIFEST_NAME,
    MODEL_FILE,
    PARTIAL_SUFFIX,
    PROMPTS_DIR,
    SCHEMA_VERSION,
    VALIDATION_DTYPE,
    WAREHOUSE_KIND,
    F,
    Field,
    StoreDtype,
    prompt_shard_name,
)

FLOAT16_MAX = 65504.0


class WarehouseError(Exception):
    """A user-facing problem with a warehouse directory (missing, foreign, mismatched)."""


def _bfloat16_type() -> h5py.h5t.TypeFloatID:
    """A 16-bit IEEE-style float with float32's exponent: HDF5 converts it on read."""
    t = h5py.h5t.IEEE_F32LE.copy()
    t.set_fields(15, 7, 8, 0, 7)
    t.set_size(2)
    t.set_ebias(127)
    return t


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON next to ``path`` and rename it over: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=PARTIAL_SUFFIX)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a warehouse is meant to be shared
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _attr_value(v: Any) -> Any:
    if isinstance(v, bool | np.bool_):
        return np.bool_(v)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
        return np.array(v, dtype=h5py.string_dtype())
    return v


class ShardWriter:
    """Writes one immutable HDF5 file under ``*.partial`` and renames it on close."""

    def __init__(self, final: Path, store_dtype: StoreDtype = "float32") -> None:
        self.final = final
        self.tmp = final.with_name(final.name + PARTIAL_SUFFIX)
        self.store_dtype = store_dtype
        self.warnings: list[str] = []
        # v110 bounds: readable by the HDF5 1.10 tools Debian ships (h5dump), not only h5py.
        self._f = h5py.File(self.tmp, "w", libver=("earliest", "v110"))

    def put(self, field: Field, value: Any) -> None:
        """Store ``value`` under ``field``; activations in the run's store dtype."""
        name = field.name
        if field.dtype == "str":
            # HDF5 variable-length strings end at NUL: spell it out (byte-level BPE has one).
            text = [str(v).replace("\x00", "\\x00") for v in value]
            self._f.create_dataset(name, data=np.array(text, dtype=h5py.string_dtype()))
            return
        if field.dtype == "compound":
            self._f.create_dataset(name, data=value)
            return
        arr = np.asarray(value, dtype=np.dtype(field.dtype))
        if len(field.axes) != arr.ndim:
            raise ValueError(f"{name}: expected axes {field.axes}, got shape {arr.shape}")
        chunks = (1, *arr.shape[1:]) if arr.ndim >= 2 and arr.shape[0] > 1 else None
        if not field.activation or self.store_dtype == "float32":
            self._f.create_dataset(name, data=arr, chunks=chunks)
            return
        if self.store_dtype == "float16":
            peak = float(np.max(np.abs(arr))) if arr.size else 0.0
            if not np.isfinite(peak) or peak > FLOAT16_MAX:
                # float16 would turn these into inf: keep this dataset in float32 and say so.
                self.warnings.append(
                    f"{self.final.name}:{name} has |x| up to {peak:.4g} > {FLOAT16_MAX:g}; "
                    "stored as float32 instead of float16"
                )
                ds = self._f.create_dataset(name, data=arr, chunks=chunks)
                ds.attrs["float16_overflow_fallback"] = True
                return
            self._f.create_dataset(name, data=arr.astype(np.float16), chunks=chunks)
            return
        # bfloat16: a committed 16-bit float type, converted by HDF5 on read.
        tid = _bfloat16_type()
        if "bfloat16" not in self._f:
            tid.commit(self._f.id, b"bfloat16")
        tid = h5py.h5t.open(self._f.id, b"bfloat16")
        space = h5py.h5s.create_simple(arr.shape)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        if chunks:
            dcpl.set_chunk(chunks)
        dsid = h5py.h5d.create(self._f.id, name.encode(), tid, space, dcpl=dcpl)
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, arr)

    def attrs(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self._f.attrs[k] = _attr_value(v)

    def commit(self) -> None:
        """Flush, fsync, rename to the final name: after this the shard is complete."""
        self._f.attrs["schema_version"] = SCHEMA_VERSION
        self._f.flush()
        self._f.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def validation_array(rows: list[tuple[str, float, float, float, bool]]) -> np.ndarray:
    """Rows of (invariant, max_abs_err, rel_err, tolerance, passed) as the stored dtype."""
    return np.array(rows, dtype=VALIDATION_DTYPE)


class WarehouseWriter:
    """Creates or resumes a warehouse directory; every file it leaves is complete."""

    def __init__(self, root: Path, store_dtype: StoreDtype = "float32") -> None:
        self.root = Path(root)
        self.store_dtype = store_dtype
        self.warnings: list[str] = []

    @classmethod
    def create(cls, root: Path, manifest: dict[str, Any], *, resume: bool) -> WarehouseWriter:
        """Start a new warehouse at ``root``, or continue one made with the same fingerprint.

        Refuses to touch a directory that is not ours, or one of ours made from another
        model or prompt set.
        """
        root = Path(root)
        mpath = root / MANIFEST_NAME
        if mpath.exists():
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
            # Carried over: a resume adds to the record of the run, it does not replace it.
            manifest = {**manifest, "timings": old.get("timings", {}), "created": old.get("created"),
                        "warnings": old.get("warnings", []), "placement": old.get("placement", [])}
        elif root.exists() and any(p for p in root.iterdir() if not p.name.startswith(".")):
            raise WarehouseError(
                f"{root} exists and is not an echo-warehouse (no {MANIFEST_NAME}); "
                "choose an empty or new --out directory"
            )
        root.mkdir(parents=True, exist_ok=True)
        (root / PROMPTS_DIR).mkdir(exist_ok=True)
        (root / ABLATION_DIR).mkdir(exist_ok=True)
        for stale in root.rglob(f"*{PARTIAL_SUFFIX}"):
            stale.unlink()  # left by a killed run: never complete, safe to drop
        w = cls(root, manifest.get("config", {}).get("store_dtype", "float32"))
        w.manifest = manifest
        w.write_manifest()
        return w

    manifest: dict[str, Any]

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

    def model_writer(self) -> ShardWriter:
        return ShardWriter(self.root / MODEL_FILE, "float32")

    def shard_writer(self, index: int, subdir: str = PROMPTS_DIR) -> ShardWriter:
        return _Collecting(self.root / subdir / prompt_shard_name(index), self.store_dtype, self.warnings)


class _Collecting(ShardWriter):
    """A shard writer that hands its warnings to the warehouse writer on commit."""

    def __init__(self, final: Path, store_dtype: StoreDtype, sink: list[str]) -> None:
        super().__init__(final, store_dtype)
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


def _load_manifest(root: Path) -> dict[str, Any]:
    mpath = root / MANIFEST_NAME
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WarehouseError(f"{mpath} is unreadable ({e}); is this an echo-warehouse?") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != WAREHOUSE_KIND:
        raise WarehouseError(f"{root} is not an echo-warehouse ({MANIFEST_NAME} has another kind)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise WarehouseError(
            f"{root} has schema version {manifest.get('schema_version')}, this tool reads "
            f"{SCHEMA_VERSION}; re-run the extraction with this version"
        )
    return manifest


class WarehouseReader:
    """Read-only access to a warehouse: files are opened in 'r' mode and never written."""

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
        self.manifest = _load_manifest(self.root)
        self._files: dict[Path, h5py.File] = {}

    # -- files ---------------------------------------------------------------------------
    def _open(self, path: Path) -> h5py.File:
        f = self._files.get(path)
        if f is None:
            f = h5py.File(path, "r")
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
        return self._open(path)

    def model_file(self) -> h5py.File:
        path = self.root / MODEL_FILE
        if not path.exists():
            raise WarehouseError(f"{self.root} has no {MODEL_FILE}; the extraction did not start")
        return self._open(path)

    def model_attrs(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.model_file().attrs.items()}

    def prompt_attrs(self, index: int) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.shard(index).attrs.items()}

    def read(self, field: Field, index: int, sel: Any = (), subdir: str = PROMPTS_DIR) -> np.ndarray:
        """Read ``field`` of prompt ``index``; ``sel`` slices before reading (e.g. one layer)."""
        ds = self.shard(index, subdir)[field.name]
        if field.dtype == "str":
            return np.array([s.decode() if isinstance(s, bytes) else s for s in ds[sel]])
        if field.dtype == "compound":
            return ds[sel]
        return np.asarray(ds.astype(field.dtype)[sel])

    def read_model(self, field: Field) -> np.ndarray:
        ds = self.model_file()[field.name]
        if field.dtype == "str":
            return np.array(ds.asstr()[()], dtype=object)
        return ds[()]

    def has(self, field: Field, index: int, subdir: str = PROMPTS_DIR) -> bool:
        return field.name in self.shard(index, subdir)

    def iter_prompts(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in self.prompt_indices():
            yield i, self.prompt_attrs(i)


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.dtype.kind in "OS" else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


__all__ = [
    "F",
    "ShardWriter",
    "WarehouseError",
    "WarehouseReader",
    "WarehouseWriter",
    "validation_array",
    "write_json_atomic",
]
