"""One SHA-256 per dataset of a warehouse, and a total: the bit-identity check of a refactor.

    python benchmarks/hash_warehouse.py DIR            # print the hashes
    python benchmarks/hash_warehouse.py DIR --against REF.txt   # exit 1 on any difference

Per dataset of every ``*.h5`` file (sorted by path): the path inside the warehouse and the
file, the dtype, the shape and the bytes of the data (variable-length text: each value's
UTF-8 bytes, length-prefixed), then the attributes of the file and of the dataset (sorted by
name) except the ones that record when or where a run happened (``TIME_KEYS``). File layout
(chunking, creation order, HDF5 free space) is not hashed: two warehouses with the same hashes
hold the same numbers, text and attributes. ``manifest.json`` and ``shards.sha256`` are not
hashed (timings, environment and the per-file digests of those bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

TIME_KEYS = frozenset({"created", "completed", "started", "timings", "environment", "host"})


def _value_bytes(v: object) -> bytes:
    a = np.asarray(v)
    if a.dtype.kind == "O" or a.dtype.kind == "S" or a.dtype.kind == "U":
        items = [x.encode() if isinstance(x, str) else bytes(x) for x in a.reshape(-1).tolist()]
        return b"".join(len(x).to_bytes(8, "little") + x for x in items)
    return np.ascontiguousarray(a).tobytes()


def _attrs_digest(h: hashlib._Hash, attrs: h5py.AttributeManager) -> None:
    for k in sorted(attrs):
        if k in TIME_KEYS:
            continue
        v = attrs[k]
        h.update(k.encode() + b"\0" + str(np.asarray(v).dtype).encode() + b"\0" + _value_bytes(v))


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return sorted(names)


def dataset_hashes(root: Path) -> Iterator[tuple[str, str]]:
    """(``file:dataset`` or ``file:@attrs``, SHA-256 hex) for every file and dataset, sorted."""
    for path in sorted(root.rglob("*.h5")):
        rel = path.relative_to(root).as_posix()
        with h5py.File(path, "r") as f:
            h = hashlib.sha256()
            _attrs_digest(h, f.attrs)
            yield f"{rel}:@attrs", h.hexdigest()
            for name in _datasets(f):
                ds = f[name]
                h = hashlib.sha256()
                h.update(f"{rel}:{name}\0{ds.dtype}\0{ds.shape}\0".encode())
                h.update(_value_bytes(ds[()]))
                _attrs_digest(h, ds.attrs)
                yield f"{rel}:{name}", h.hexdigest()


def hash_lines(root: Path) -> list[str]:
    lines = [f"{d}  {k}" for k, d in dataset_hashes(root)]
    total = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return [*lines, f"{total}  TOTAL ({len(lines)} entries)"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--against", type=Path, help="a file of hashes printed before: report differences")
    ns = ap.parse_args(argv)
    lines = hash_lines(ns.root)
    if ns.against is None:
        print("\n".join(lines))
        return 0
    ref = ns.against.read_text().splitlines()
    if ref == lines:
        print(f"{ns.root}: identical to {ns.against} ({lines[-1].split('  ', 1)[1]})")
        return 0
    a, b = dict(x.split("  ", 1)[::-1] for x in ref), dict(x.split("  ", 1)[::-1] for x in lines)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not k.startswith("TOTAL"))
    print(f"{ns.root}: {len(diff)} entries differ from {ns.against}:", *diff[:20], sep="\n  ")
    return 1


if __name__ == "__main__":
    sys.exit(main())
