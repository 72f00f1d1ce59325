"""``ShardWriter``: one immutable, self-checking HDF5 file, written as ``*.partial`` and renamed.

On disk (schema 3): the HDF5 1.10 file format (object headers, B-trees and the superblock carry
checksums); every dataset with data is chunked with the Fletcher32 filter, so a corrupted
chunk raises on read instead of returning wrong numbers; scalars and empty arrays are compact
(their bytes live in the checksummed object header); strings, as datasets or attributes, are
fixed-length UTF-8 (variable-length strings live in the global heap, which has no checksum).

Deterministic bytes: no object-header timestamps (``track_times`` off), file attributes written
in name order at seal, bfloat16 as an inline (uncommitted) type: the same data gives the same
file, and so the same ledger hash, whenever and however (straight, resumed, on Ray) it is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from store.ledger import Ledger, sha256_file
from store.schema import PARTIAL_SUFFIX, SCHEMA_VERSION, Field, StoreDtype

FLOAT16_MAX = 65504.0
LIBVER = ("v110", "v110")  # readable by HDF5 >= 1.10 (Debian's h5dump included)
BFLOAT16_FIELDS = (15, 7, 8, 0, 7)  # sign bit, exponent position/size, mantissa position/size


def bfloat16_type() -> h5py.h5t.TypeFloatID:
    """A 16-bit IEEE-style float with float32's exponent: HDF5 converts it on read."""
    t = h5py.h5t.IEEE_F32LE.copy()
    t.set_fields(*BFLOAT16_FIELDS)
    t.set_size(2)
    t.set_ebias(127)
    return t


def partial_path(final: Path) -> Path:
    """Where a file is written before it is renamed to ``final``."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def publish(items: Sequence[tuple[Path, str]], ledger: Ledger | None) -> None:
    """Give sealed ``*.partial`` files their final names, the ledger first (store.ledger):
    every (final path, SHA-256) is appended in one write and fsync before the first rename,
    then each file is renamed and each directory fsynced."""
    if ledger is not None:
        ledger.record_many(items)
    for final, _ in items:
        os.replace(partial_path(final), final)
    for folder in dict.fromkeys(Path(final).parent for final, _ in items):
        fsync_dir(folder)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _utf8(values: Any) -> np.ndarray:
    """Text as a fixed-length UTF-8 byte array (NUL spelled out: HDF5 strings end at NUL)."""
    enc = [str(v).replace("\x00", "\\x00").encode() for v in values]
    n = max([1, *map(len, enc)])
    return np.array(enc, dtype=f"S{n}")


def _text_type(n: int) -> h5py.h5t.TypeID:
    return h5py.h5t.py_create(h5py.string_dtype("utf-8", n), logical=True)


def _attr_value(v: Any) -> tuple[Any, Any]:
    """(data, dtype) for an attribute: text fixed-length UTF-8, bools as numpy bools."""
    if isinstance(v, bool | np.bool_):
        return np.bool_(v), None
    if isinstance(v, str):
        arr = _utf8([v])
        return arr[0], h5py.string_dtype("utf-8", arr.dtype.itemsize)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
        arr = _utf8(v)
        return arr, h5py.string_dtype("utf-8", arr.dtype.itemsize)
    return v, None


class ShardWriter:
    """Writes one immutable HDF5 file under ``*.partial`` and renames it on commit.

    ``ledger``: where the file's SHA-256 is recorded before the rename (see store.ledger).
    ``stamp``: attributes the warehouse writer sets on every file (fingerprint, prompt index).
    ``staged``: commit only seals the ``*.partial`` file and appends (final path, SHA-256)
    here; another process (a Ray run's driver) records and renames it with :func:`publish`.
    """

    def __init__(self, final: Path, store_dtype: StoreDtype = "float32", *, ledger: Ledger | None = None,
                 stamp: Mapping[str, Any] | None = None,
                 staged: list[tuple[Path, str]] | None = None) -> None:
        if staged is not None and ledger is not None:
            raise ValueError("a staged shard is recorded by whoever publishes it, not by its writer")
        self.final = Path(final)
        self.tmp = partial_path(self.final)
        self.store_dtype = store_dtype
        self.warnings: list[str] = []
        self.ledger = ledger
        self.staged = staged
        self.stamp = dict(stamp or {})
        self._attrs: dict[str, Any] = {}
        self._f = h5py.File(self.tmp, "w", libver=LIBVER, locking=False)

    def _create(self, name: str, arr: np.ndarray, tid: h5py.h5t.TypeID | None = None,
                gzip: bool = False) -> h5py.Dataset:
        """One dataset: chunked (a row of axis 0 per chunk) + Fletcher32, or compact if tiny.

        ``arr`` is the data in memory; ``tid`` the file type when it differs (bfloat16, text).
        """
        file_type = tid if tid is not None else h5py.h5t.py_create(arr.dtype, logical=True)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_obj_track_times(False)  # no timestamps in the header: same data, same bytes
        if arr.ndim == 0:
            space = h5py.h5s.create(h5py.h5s.SCALAR)
            dcpl.set_layout(h5py.h5d.COMPACT)
        else:
            space = h5py.h5s.create_simple(arr.shape)
            if arr.size == 0:
                dcpl.set_layout(h5py.h5d.COMPACT)
            else:
                dcpl.set_chunk((1, *arr.shape[1:]) if arr.ndim >= 2 and arr.shape[0] > 1 else arr.shape)
                if gzip:
                    dcpl.set_deflate(1)
                dcpl.set_fletcher32()
        dsid = h5py.h5d.create(self._f.id, name.encode(), file_type, space, dcpl=dcpl)
        if arr.size:
            mem_type = file_type if arr.dtype.kind == "S" else None
            dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(arr), mtype=mem_type)
        return self._f[name]

    def put(self, field: Field, value: Any) -> None:
        """Store ``value`` under ``field``; activations in the run's store dtype."""
        name = field.name
        if field.dtype == "str":
            arr = _utf8(value)
            self._create(name, arr, _text_type(arr.dtype.itemsize), gzip=True)
            return
        if field.dtype == "compound":
            self._create(name, np.asarray(value))
            return
        arr = np.asarray(value, dtype=np.dtype(field.dtype))
        if len(field.axes) != arr.ndim:
            raise ValueError(f"{name}: expected axes {field.axes}, got shape {arr.shape}")
        if not field.activation or self.store_dtype == "float32":
            self._create(name, arr)
            return
        if self.store_dtype == "float16":
            peak = float(np.max(np.abs(arr))) if arr.size else 0.0
            if not np.isfinite(peak) or peak > FLOAT16_MAX:
                # float16 would turn these into inf: keep this dataset in float32 and say so.
                self.warnings.append(
                    f"{self.final.name}:{name} has |x| up to {peak:.4g} > {FLOAT16_MAX:g}; "
                    "stored as float32 instead of float16"
                )
                self._create(name, arr).attrs["float16_overflow_fallback"] = True
                return
            self._create(name, arr.astype(np.float16))
            return
        # bfloat16: a 16-bit float type in the dataset's header, converted by HDF5 on write and
        # read (not committed: a committed type's header records its creation time)
        self._create(name, arr, bfloat16_type())

    def attrs(self, values: Mapping[str, Any]) -> None:
        """File attributes; written at ``seal`` in name order (the bytes never depend on the
        order the caller set them in)."""
        self._attrs.update(values)

    def seal(self) -> None:
        """Stamp, flush, close and fsync the ``*.partial`` file: its bytes are final."""
        for k, v in sorted({**self._attrs, **self.stamp, "schema_version": SCHEMA_VERSION}.items()):
            data, dtype = _attr_value(v)
            self._f.attrs.create(k, data, dtype=dtype)
        self._f.flush()
        self._f.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> None:
        """Seal, record the SHA-256, rename: after this the shard is complete. With ``staged``:
        seal and hand (final path, SHA-256) over; the shard is complete once published."""
        self.seal()
        if self.staged is not None:
            self.staged.append((self.final, sha256_file(self.tmp)))
            return
        if self.ledger is not None:
            self.ledger.record(self.final, sha256_file(self.tmp))  # durable before the name exists
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)

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
