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
from store.errors import WarehouseError, first_line
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
    prompt_shard_name,
)

_SHARD = re.compile(r"^p(\d{5,})\.h5$")
TOP_LEVEL = {MANIFEST_NAME, MODEL_FILE, LEDGER_NAME, LOCK_NAME, PROMPTS_DIR, ABLATION_DIR, PATCHING_DIR}


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
        rep.problems.append(Problem(MANIFEST_NAME, str(e)))
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
    expected: dict[str, tuple[Kind, int | None]] = {MODEL_FILE: ("model", None)}
    for i in indices:
        expected[f"{PROMPTS_DIR}/{prompt_shard_name(i)}"] = ("prompt", i)
        if cfg.get("ablation"):
            expected[f"{ABLATION_DIR}/{prompt_shard_name(i)}"] = ("ablation", i)

    patching = _patching_expected(manifest)
    expected.update({rel: ("patching", i) for rel, i in patching.items()})
    _foreign_files(root, set(indices), bool(cfg.get("ablation")), add)
    _foreign_patching(root, set(patching), add)
    ledger = read_ledger(root)
    if ledger is None:
        add(LEDGER_NAME, "missing: no recorded SHA-256 to check the shards against")
    expect = _expect(root, manifest)
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
        elif (p.name in (PROMPTS_DIR, ABLATION_DIR, PATCHING_DIR)) != p.is_dir():
            add(p.name, "should be a directory")
    for sub in (PROMPTS_DIR, ABLATION_DIR):
        if not (root / sub).is_dir():
            continue
        for p in sorted((root / sub).iterdir()):
            rel = f"{sub}/{p.name}"
            m = _SHARD.match(p.name)
            if p.name.endswith(PARTIAL_SUFFIX):
                add(rel, "a partial write left by a killed run (`echowh extract --resume` removes it)")
            elif m is None or not p.is_file():
                add(rel, "unknown file: not a shard")
            elif int(m.group(1)) not in indices:
                add(rel, f"a shard of prompt {int(m.group(1))}, which the manifest does not list (stale or foreign)")
            elif sub == ABLATION_DIR and not ablation:
                add(rel, "an ablation shard, but the run had no ablation (stale or foreign)")


def _patching_expected(manifest: dict) -> dict[str, int]:
    """patching/<a>-<b>/pNNNNN.h5 of a run with --patching: one per (pair, word), named by the
    prompt index of the word's template-a prompt."""
    cfg = manifest.get("config") or {}
    if not cfg.get("patching"):
        return {}
    pairs = cfg.get("patch_pairs") or [[0, 1]]
    index = {(p["word"], int(p["template_index"])): int(p["index"]) for p in manifest.get("prompts", [])}
    out = {}
    for a, b in pairs:
        for w in manifest.get("words", []):
            if (w, int(a)) in index and (w, int(b)) in index:
                i = index[(w, int(a))]
                out[f"{PATCHING_DIR}/{a}-{b}/{prompt_shard_name(i)}"] = i
    return out


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


def _check_file(path: Path, kind: Kind, index: int | None, expect: Expect) -> list[str]:
    """Structure (strict), every chunk's checksum, and the stored invariants of one file."""
    try:
        f = h5py.File(path, "r", locking=False)
    except (OSError, KeyError) as e:
        return [f"not a readable HDF5 file ({first_line(e)})"]
    problems: list[str] = []
    with f:
        try:
            problems += check_shard(f, kind, index, expect, strict=True)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            return [*problems, f"unreadable metadata ({first_line(e)})"]
        for name in sorted(f.keys()):
            try:
                obj = f[name]
                if isinstance(obj, h5py.Dataset):
                    obj[()]  # reads every chunk: Fletcher32 verifies each one
            except (OSError, KeyError, ValueError) as e:
                problems.append(f"dataset {name} is damaged ({first_line(e)})")
        fld = {"prompt": F.VALIDATION, "ablation": A.VALIDATION, "patching": PT.VALIDATION}.get(kind)
        if fld is not None and fld.name in f and not any(fld.name in p for p in problems):
            problems += _invariants(f[fld.name][()])
    return problems


def _invariants(rows: np.ndarray) -> list[str]:
    out = []
    for r in rows:
        name = text(r["invariant"])
        if name not in INVARIANTS:
            out.append(f"validation row {name!r} is not a known invariant")
        elif not bool(r["passed"]) or not float(r["rel_err"]) <= float(r["tolerance"]):
            out.append(f"invariant {name} failed (rel err {float(r['rel_err']):.3g} > tolerance "
                       f"{float(r['tolerance']):.3g})")
    return out
