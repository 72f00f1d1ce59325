"""``verify``: scrub a warehouse end to end, read-only, and list every problem (one line each).

Checked: the manifest; a writer still running; every file the manifest implies (model.h5,
prompts/pNNNNN.h5 for every prompt, ablation/pNNNNN.h5 when the run had ablation) present,
its SHA-256 equal to the one recorded before it was renamed (shards.sha256), readable as HDF5,
with the schema's datasets, shapes and dtypes, attributes and the manifest's fingerprint,
every data chunk passing its Fletcher32 checksum (every dataset is read whole), and its
stored invariants passing; no foreign or stale files (unknown names, ``*.partial`` left by a
killed run, shards of prompts the manifest does not list). Nothing is written: files are
opened read-only without HDF5 file locking.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from store.checks import Expect, Kind, check_shard, text
from store.circuits_schema import CG, CI, CIRCUIT_INVARIANTS, CIRCUITS_DIR, GRAPH_FILE
from store.errors import WarehouseError, first_line
from store.layout import SHARD_NAME, expected_files
from store.ledger import read_ledger, sha256_file
from store.lock import current_writer
from store.reader import load_manifest
from store.schema import (
    ABLATION_DIR,
    INVARIANTS,
    LEDGER_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    MODEL_FILE,
    PARTIAL_SUFFIX,
    PATCHING_DIR,
    PROMPTS_DIR,
    PT,
    A,
    F,
    Field,
)
from store.taskvec_schema import (
    AIE_SET,
    INTERVENTIONS_SET,
    TASKVEC_DIR,
    TQ,
    TV,
    TV_INVARIANTS,
    VECTORS_FILE,
)

TOP_LEVEL = {MANIFEST_NAME, MODEL_FILE, LEDGER_NAME, LOCK_NAME, PROMPTS_DIR, ABLATION_DIR, PATCHING_DIR,
             CIRCUITS_DIR, TASKVEC_DIR}
DIRS = (PROMPTS_DIR, ABLATION_DIR, PATCHING_DIR, CIRCUITS_DIR, TASKVEC_DIR)
TASKVEC_WORD = re.compile(r"^w(\d{5,})\.h5$")


def _fields(cls: type) -> tuple[Field, ...]:
    return tuple(v for v in vars(cls).values() if isinstance(v, Field))


# The circuits files (store.layout.stage_files_expected): their schema's fields (task-vector
# files are store.checks' kinds "taskvec" and "taskvec_word").
STAGE_FIELDS: dict[str, tuple[Field, ...]] = {"circuits": _fields(CI), "circuits_graph": _fields(CG)}
ALL_INVARIANTS = {**INVARIANTS, **CIRCUIT_INVARIANTS, **TV_INVARIANTS}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a warehouse: the file (relative to the root; '.' = the warehouse)."""

    path: str
    message: str

    def line(self, root: Path) -> str:
        return f"{Path(root) / self.path if self.path != '.' else Path(root)}: {self.message}"


@dataclass
class VerifyReport:
    """What ``verify`` checked and found."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return [p.line(self.root) for p in self.problems]


def verify(root: Path | str, progress: Callable[[int, str], None] | None = None) -> VerifyReport:
    """Scrub ``root``. ``progress(n_files_total, rel_path)`` is called before each file."""
    root = Path(root)
    rep = VerifyReport(root)
    if not root.is_dir():
        rep.problems.append(Problem(".", "no such warehouse directory"))
        return rep
    try:
        manifest = load_manifest(root)
    except WarehouseError as e:
        rep.problems.append(Problem(MANIFEST_NAME, str(e).removeprefix(f"{root / MANIFEST_NAME}: ")))
        return rep
    add = lambda path, msg: rep.problems.append(Problem(path, msg))  # noqa: E731
    holder = current_writer(root)
    if holder is not None:
        add(LOCK_NAME, f"an extraction is still writing this warehouse ({holder.describe()}); "
                       "verify it when that run has finished")
    status = manifest.get("status")
    if status != "complete" and holder is None:
        add(MANIFEST_NAME, f"the run's status is {status!r}, not 'complete'"
                           + ("; resume it with `echowh extract --resume`" if status == "running" else ""))
    cfg = manifest.get("config") or {}
    indices = [int(p["index"]) for p in manifest.get("prompts", [])]
    expected = {rel: (e.kind, e.index) for rel, e in expected_files(manifest).items()}
    patching = {rel for rel, (kind, _) in expected.items() if kind == "patching"}
    _foreign_files(root, set(indices), bool(cfg.get("ablation")), add)
    _foreign_patching(root, patching, add)
    if not cfg.get("circuits"):  # circuits written beside a run without --circuits: check what is there
        expected |= _circuit_files(root)
    _foreign_tree(root, CIRCUITS_DIR, {rel for rel, (kind, _) in expected.items() if kind in STAGE_FIELDS}, add)
    ledger = read_ledger(root)
    if ledger is None:
        add(LEDGER_NAME, "missing: no recorded SHA-256 to check the shards against")
    expect = _expect(root, manifest)
    expected |= _taskvec_files(root, add)  # whatever task-vector files exist are checked in full
    for rel, (kind, index) in expected.items():
        if progress is not None:
            progress(len(expected), rel)
        path = root / rel
        if not path.is_file():
            add(rel, "missing (the manifest lists this prompt)" if kind != "model" else "missing")
            continue
        rep.files_checked += 1
        rep.bytes_checked += path.stat().st_size
        if ledger is not None:
            want = ledger.get(rel)
            got = sha256_file(path)
            if want is None:
                add(rel, f"no SHA-256 recorded in {LEDGER_NAME} (not written by this warehouse's writer)")
            elif got != want:
                add(rel, f"content differs from what was written (SHA-256 {got[:12]}..., recorded {want[:12]}...)")
        for msg in _check_file(path, kind, index, expect):
            add(rel, msg)
    return rep


def _expect(root: Path, manifest: dict) -> Expect:
    try:
        with h5py.File(root / MODEL_FILE, "r", locking=False) as f:
            attrs = {k: text(v) for k, v in f.attrs.items()}
    except (OSError, KeyError):
        attrs = {}  # model.h5 itself is reported below
    model = manifest.get("model") or {}
    for k in ("n_layers", "n_heads", "d_model", "vocab_size"):
        attrs.setdefault(k, model.get(k))
    return Expect.from_warehouse(manifest, attrs)


def _foreign_files(root: Path, indices: set[int], ablation: bool, add: Callable[[str, str], None]) -> None:
    for p in sorted(root.iterdir()):
        if p.name.endswith(PARTIAL_SUFFIX):
            add(p.name, "a partial write left by a killed run (`echowh extract --resume` removes it)")
        elif p.name not in TOP_LEVEL:
            add(p.name, "unknown file: not part of an echo-warehouse")
        elif (p.name in DIRS) != p.is_dir():
            add(p.name, "should be a directory")
    for sub in (PROMPTS_DIR, ABLATION_DIR):
        if not (root / sub).is_dir():
            continue
        for p in sorted((root / sub).iterdir()):
            rel = f"{sub}/{p.name}"
            m = SHARD_NAME.match(p.name)
            if p.name.endswith(PARTIAL_SUFFIX):
                add(rel, "a partial write left by a killed run (`echowh extract --resume` removes it)")
            elif m is None or not p.is_file():
                add(rel, "unknown file: not a shard")
            elif int(m.group(1)) not in indices:
                add(rel, f"a shard of prompt {int(m.group(1))}, which the manifest does not list (stale or foreign)")
            elif sub == ABLATION_DIR and not ablation:
                add(rel, "an ablation shard, but the run had no ablation (stale or foreign)")


def _foreign_patching(root: Path, expected: set[str], add: Callable[[str, str], None]) -> None:
    top = root / PATCHING_DIR
    if not top.exists():
        return
    if not top.is_dir():
        add(PATCHING_DIR, "should be a directory")
        return
    for d in sorted(top.iterdir()):
        files = sorted(d.iterdir()) if d.is_dir() else [d]
        for p in files:
            rel = p.relative_to(root).as_posix()
            if p.name.endswith(PARTIAL_SUFFIX):
                add(rel, "a partial write left by a killed run (`echowh extract --resume` removes it)")
            elif rel not in expected:
                add(rel, "not a patching shard of this run (stale, foreign or unknown)")


def _taskvec_files(root: Path, add: Callable[[str, str], None]) -> dict[str, tuple[Kind, int | None]]:
    """The task-vector files present (taskvec/vectors.h5, taskvec/{aie,interventions}/wNNNNN.h5),
    to be checked like the shards; anything else under taskvec/ is reported."""
    top = root / TASKVEC_DIR
    out: dict[str, tuple[Kind, int | None]] = {}
    if not top.is_dir():
        return out
    for p in sorted(top.iterdir()):
        rel = p.relative_to(root).as_posix()
        if p.name == VECTORS_FILE and p.is_file():
            out[rel] = ("taskvec", None)
        elif p.name in (AIE_SET, INTERVENTIONS_SET) and p.is_dir():
            for q in sorted(p.iterdir()):
                m = TASKVEC_WORD.match(q.name)
                if q.name.endswith(PARTIAL_SUFFIX):
                    add(q.relative_to(root).as_posix(), "a partial write left by a killed run")
                elif m is None or not q.is_file():
                    add(q.relative_to(root).as_posix(), "unknown file: not a task-vector shard")
                else:
                    out[q.relative_to(root).as_posix()] = ("taskvec_word", int(m.group(1)))
        elif p.name.endswith(PARTIAL_SUFFIX):
            add(rel, "a partial write left by a killed run")
        else:
            add(rel, "unknown file: not part of the task-vector layout")
    return out


def _foreign_tree(root: Path, top: str, expected: set[str], add: Callable[[str, str], None]) -> None:
    """Every file under ``top`` (circuits/) is one the manifest implies."""
    if not (root / top).is_dir():
        return
    for p in sorted((root / top).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.name.endswith(PARTIAL_SUFFIX):
            add(rel, "a partial write left by a killed run (`echowh extract --resume` removes it)")
        elif p.is_file() and rel not in expected:
            add(rel, f"not a {top} file of this run (stale, foreign or unknown)")


def _circuit_files(root: Path) -> dict[str, tuple[str, int | None]]:
    """The circuits files present (graph.h5, <kind>/pNNNNN.h5), to be checked in full."""
    out: dict[str, tuple[str, int | None]] = {}
    top = root / CIRCUITS_DIR
    for p in sorted(top.rglob("*.h5")) if top.is_dir() else []:
        rel, m = p.relative_to(root).as_posix(), SHARD_NAME.match(p.name)
        if p.parent == top and p.name == GRAPH_FILE:
            out[rel] = ("circuits_graph", None)
        elif m is not None and p.parent.parent == top:
            out[rel] = ("circuits", int(m.group(1)))
    return out


def _check_stage_file(f: h5py.File, kind: str, expect: Expect) -> list[str]:
    """A circuits file: its schema's datasets (no more, no fewer), their ranks and
    dtypes, and the run's fingerprint (sizes are the writer's ``check``; the query views read them)."""
    fields = STAGE_FIELDS[kind]
    names = set(f.keys())
    out = [f"dataset {x} is missing" for x in sorted({g.name for g in fields} - names)]
    out += [f"dataset {x} is not in the schema" for x in sorted(names - {g.name for g in fields})]
    for fld in fields:
        if fld.name not in names or fld.dtype in ("str", "compound"):
            continue
        ds = f[fld.name]
        if ds.ndim != len(fld.axes):
            out.append(f"{fld.name} has {ds.ndim} axes, expected {len(fld.axes)} {fld.axes}")
        if not fld.activation and ds.dtype != np.dtype(fld.dtype):
            out.append(f"{fld.name} is {ds.dtype}, expected {fld.dtype}")
    fp = text(f.attrs.get("fingerprint"))
    if expect.fingerprint is not None and fp != expect.fingerprint and (fp is not None or kind != "circuits_graph"):  # write_graph stamps none
        out.append(f"fingerprint {fp!r} is not the warehouse's {expect.fingerprint!r}")
    return out


def _check_file(path: Path, kind: Kind | str, index: int | None, expect: Expect) -> list[str]:
    """Structure (strict), every chunk's checksum, and the stored invariants of one file."""
    try:
        f = h5py.File(path, "r", locking=False)
    except (OSError, KeyError) as e:
        return [f"not a readable HDF5 file ({first_line(e)})"]
    problems: list[str] = []
    with f:
        try:
            if kind in STAGE_FIELDS:
                problems += _check_stage_file(f, kind, expect)
            else:
                problems += check_shard(f, kind, index, expect, strict=True)  # type: ignore[arg-type]
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            return [*problems, f"unreadable metadata ({first_line(e)})"]
        for name in sorted(f.keys()):
            try:
                obj = f[name]
                if isinstance(obj, h5py.Dataset):
                    obj[()]  # reads every chunk: Fletcher32 verifies each one
            except (OSError, KeyError, ValueError) as e:
                problems.append(f"dataset {name} is damaged ({first_line(e)})")
        fld = {"prompt": F.VALIDATION, "ablation": A.VALIDATION, "patching": PT.VALIDATION,
               "circuits": CI.VALIDATION, "taskvec": TV.VALIDATION, "taskvec_word": TQ.VALIDATION}.get(kind)
        if fld is not None and fld.name in f and not any(fld.name in p for p in problems):
            problems += _invariants(f[fld.name][()])
    return problems


def _invariants(rows: np.ndarray) -> list[str]:
    out = []
    for r in rows:
        name = text(r["invariant"])
        if name not in ALL_INVARIANTS:
            out.append(f"validation row {name!r} is not a known invariant")
        elif not bool(r["passed"]) or not float(r["rel_err"]) <= float(r["tolerance"]):
            out.append(f"invariant {name} failed (rel err {float(r['rel_err']):.3g} > tolerance "
                       f"{float(r['tolerance']):.3g})")
    return out
