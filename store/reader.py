"""Read-only, self-checking reader of a warehouse, and the manifest and shard listing it reads
(numpy + h5py only). The writer is store.warehouse."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from store.checks import FIELDS, Expect, Kind, check_dataset, check_names, shard_dims, text
from store.circuits_schema import CIRCUITS_DIR, GRAPH_FILE
from store.errors import WarehouseError, first_line
from store.layout import FINISHED, expected_files, manifest_problems, shard_files
from store.schema import (
    ABLATION_DIR,
    MANIFEST_NAME,
    MODEL_FILE,
    PATCHING_DIR,
    PROMPTS_DIR,
    SCHEMA_VERSION,
    WAREHOUSE_KIND,
    Field,
    prompt_shard_name,
)
from store.taskvec_schema import TASKVEC_DIR, VECTORS_FILE, word_shard_name


def shard_indices(folder: Path) -> list[int]:
    """Prompt indices of the complete shards in a folder (``pNNNNN.h5``; ``*.partial`` never)."""
    out = []
    for p in folder.glob("p*.h5"):
        try:
            out.append(int(p.stem[1:]))
        except ValueError:
            continue
    return sorted(out)


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
    bad = manifest_problems(manifest)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise WarehouseError(f"{mpath}: {bad[0]}{more}; this manifest was changed after the extraction: "
                             "restore it, or re-run the extraction")
    return manifest


class _Dataset(h5py.Dataset):
    """A dataset whose reads turn HDF5 failures (a Fletcher32 mismatch) into a WarehouseError."""

    root: Path  # the warehouse, for the hint

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


def _damaged(ds: _Dataset, e: Exception) -> WarehouseError:
    return WarehouseError(f"{ds.file.filename}: dataset {ds.name.lstrip('/')} is damaged ({first_line(e)}); "
                          f"{verify_hint(ds.root)}")


def verify_hint(root: Path) -> str:
    return f"`echowh verify -w {root}` lists every damaged file"


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
    """A shard opened read-only whose datasets are checked against the schema on first use.

    ``names`` (the links listed when it was opened) decide what exists: a listed object that
    fails to open (a damaged object header) raises a WarehouseError, from ``f[name]`` and
    ``f.get(name)`` alike, never a KeyError or None.
    """

    @property
    def attrs(self) -> _Attrs:  # type: ignore[override]
        return _Attrs(super().attrs)

    kind: Kind
    dims: dict[str, int]
    expect: Expect
    checked: set[str]
    names: set[str]
    root: Path

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lstrip("/") in self.names

    def get(self, name: Any, default: Any = None, **kw: Any) -> Any:  # type: ignore[override]
        if kw:
            raise TypeError("a shard's get takes a name and a default only")
        return self[name] if name in self else default  # noqa: SIM401 - this is get

    def __getitem__(self, name: Any) -> Any:
        key = name.strip("/") if isinstance(name, str) else None
        if key and "/" not in key and key not in self.names:
            raise KeyError(f"{name} is not in {self.filename}")  # no such object: `get` returns None
        try:
            obj = super().__getitem__(name)
        except (KeyError, OSError, ValueError, RuntimeError) as e:
            raise WarehouseError(f"{self.filename}: object {name} is damaged ({first_line(e)}); "
                                 f"{verify_hint(self.root)}") from None
        if not isinstance(obj, h5py.Dataset):
            return obj
        key = obj.name.lstrip("/")
        if key not in self.checked:
            fld = next((f for f in FIELDS[self.kind] if f.name == key), None)
            bad = check_dataset(obj, fld, self.dims, self.expect) if fld is not None else None
            if bad:
                raise WarehouseError(f"{self.filename}: {bad}; {verify_hint(self.root)}")
            self.checked.add(key)
        ds = _Dataset(obj.id)
        ds.root = self.root
        return ds


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
        self.missing: list[str] = []  # shards an unfinished run has not written yet
        self._check_shard_set()

    def _check_shard_set(self) -> None:
        """The shards on disk against the manifest: one the manifest does not imply is an error;
        a missing one is an error when the run finished, and is listed in ``missing`` (see
        ``note``) while it is still running or was killed."""
        expected = expected_files(self.manifest)
        on_disk = shard_files(self.root, self.manifest)
        extra = sorted(on_disk - set(expected))
        if extra:
            raise WarehouseError(f"{self.root / extra[0]}: a shard the manifest does not list (stale or foreign)"
                                 f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; "
                                 f"{verify_hint(self.root)}")
        missing = sorted(rel for rel in expected if rel not in on_disk and rel != MODEL_FILE)
        if missing and self.manifest.get("status", "complete") in FINISHED:
            raise WarehouseError(f"{self.root / missing[0]}: missing (the manifest lists it)"
                                 f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                 f"{verify_hint(self.root)}")
        self.missing = missing

    @property
    def note(self) -> str | None:
        """What an unfinished warehouse lacks, in one line (None when nothing is missing)."""
        if not self.missing:
            return None
        return (f"{self.root} is unfinished (status {self.manifest.get('status')!r}): {len(self.missing)} "
                f"shard(s) not written yet, e.g. {self.missing[0]}; answers cover only what is there "
                f"(`echowh extract --out {self.root} --resume` completes it)")

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
                                 f"{verify_hint(self.root)}") from None
        try:
            f.kind, f.checked, f.root, f.names = kind, set(), self.root, set()
            f.names = set(h5py.File.keys(f))
            # model.h5's own sizes are the expectation: only its fingerprint is checked here
            f.expect = (Expect(self.manifest.get("fingerprint"), {}) if kind == "model"
                        else Expect(None, {}) if kind == "circuits_graph" else self.expect())
            f.dims, problems = shard_dims(kind, f.attrs, index, f.expect, strict=False)
            problems += check_names(kind, f.names, f.expect, strict=False)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            problems = [f"unreadable metadata ({first_line(e)})"]
        except WarehouseError:
            f.close()
            raise
        if problems:
            f.close()
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise WarehouseError(f"{path}: {problems[0]}{more}; {verify_hint(self.root)}")
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
        top = subdir.split("/")[0]
        kind: Kind = ("ablation" if subdir == ABLATION_DIR else "patching" if top == PATCHING_DIR
                      else "circuits" if top == CIRCUITS_DIR else "prompt")
        return self._open(path, kind, index)

    def taskvec_indices(self, subset: str) -> list[int]:
        """Word indices of the complete ``taskvec/<subset>/wNNNNN.h5`` shards, sorted."""
        folder = self.root / TASKVEC_DIR / subset
        return sorted(int(p.stem[1:]) for p in folder.glob("w*.h5") if p.stem[1:].isdigit())

    def has_taskvec(self) -> bool:
        return (self.root / TASKVEC_DIR / VECTORS_FILE).exists()

    def taskvec_file(self, subset: str | None = None, index: int | None = None) -> h5py.File:
        """``taskvec/vectors.h5`` (no ``subset``) or a held-out word's ``taskvec/<subset>/wNNNNN.h5``,
        checked on open like every shard (fingerprint, schema version, word index, datasets)."""
        if subset is None:
            path, kind = self.root / TASKVEC_DIR / VECTORS_FILE, "taskvec"
        else:
            assert index is not None, "a word shard needs its word index"
            path, kind = self.root / TASKVEC_DIR / subset / word_shard_name(index), "taskvec_word"
        if not path.exists():
            raise WarehouseError(f"{path}: no such task-vector file; extract with --task-vectors")
        return self._open(path, kind, index)

    def circuits_graph(self) -> h5py.File | None:
        """``circuits/graph.h5`` (the edge graph of circuit shards), or None when not extracted."""
        path = self.root / CIRCUITS_DIR / GRAPH_FILE
        return self._open(path, "circuits_graph") if path.exists() else None

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
            raise WarehouseError(f"{f.filename}: dataset {field.name} missing; {verify_hint(self.root)}")
        ds = f[field.name]
        if field.dtype == "str":
            return np.array(ds.asstr()[()], dtype=object)
        return ds[()]

    def has(self, field: Field, index: int, subdir: str = PROMPTS_DIR) -> bool:
        return field.name in self.shard(index, subdir)

    def iter_prompts(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in self.prompt_indices():
            yield i, self.prompt_attrs(i)


__all__ = ["WarehouseReader", "load_manifest", "shard_indices"]
