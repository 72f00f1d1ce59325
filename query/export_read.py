"""Reading and checking a Parquet export (``echowh export --parquet``); the writer is
``query.export``. ``Warehouse(DIR)`` recognises an export (``export.json``) and registers
each view over its Parquet files (``ParquetExport.source``).

Integrity: the writer records the SHA-256 of every file of the export in ``export.sha256``
(``sha256sum`` format) before the export gets its name, and writes a CRC32 checksum in every
Parquet page header. :func:`verify_export` (``echowh verify -w DIR``) checks every file
against the ledger and reads every page with its checksum verified. Opening an export checks
that its files are exactly the ledger's, and hashes the small files (export.json,
manifest.json); each view's files are hashed from the view's first scan on, in a thread that
overlaps the scan, and the statement's result is given only once every hash it started has
matched (``ParquetExport.settle``): a damaged file is a one-line error, never a number.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from query.errors import QueryError
from query.views import VIEWS, View, arrow_schema, polars_schema
from store.ledger import read_ledger, sha256_file

EXPORT_FILE = "export.json"
EXPORT_KIND = "echo-warehouse-parquet"
EXPORT_VERSION = 2  # 2: export.sha256 and Parquet page checksums
EXPORT_LEDGER = "export.sha256"
PARTITION = "template_index"
PART_NAME = "part-00000.parquet"


def is_export(path: Path) -> bool:
    return (Path(path) / EXPORT_FILE).is_file()


def partitioned(view: View) -> bool:
    return "prompt" in view.names


def file_schema(view: View, d_model: int) -> pa.Schema:
    """The columns stored in the view's Parquet files (the partition column is in the path)."""
    schema = arrow_schema(view, d_model)
    if partitioned(view) and PARTITION in schema.names:
        schema = schema.remove(schema.get_field_index(PARTITION))
    return schema


def _hint(root: Path) -> str:
    return f"`echowh verify -w {root}` checks every file; re-export it with `echowh export`"


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {EXPORT_LEDGER}


class ParquetExport:
    """An export directory opened for ``Warehouse``: each view a Polars scan of its files,
    hashed against the export's ledger on the view's first scan (``check=False``: not hashed;
    the file set and the small files are still checked on open)."""

    def __init__(self, path: Path, *, check: bool = True) -> None:
        self.path = Path(path)
        self.check = check
        try:
            self.meta = json.loads((self.path / EXPORT_FILE).read_text())
        except (OSError, ValueError) as e:
            raise QueryError(f"{self.path / EXPORT_FILE} is unreadable ({e}); {_hint(self.path)}") from None
        if not isinstance(self.meta, dict) or self.meta.get("kind") != EXPORT_KIND:
            raise QueryError(f"{self.path} is not an echo-warehouse Parquet export ({EXPORT_FILE} has another kind)")
        if self.meta.get("version") != EXPORT_VERSION:
            raise QueryError(f"{self.path} is a Parquet export of version {self.meta.get('version')}, this tool "
                             f"reads version {EXPORT_VERSION} (with checksums); re-export it with `echowh export`")
        self.ledger = read_ledger(self.path, EXPORT_LEDGER)
        if self.ledger is None:
            raise QueryError(f"{self.path / EXPORT_LEDGER} is missing: nothing to check the export against; "
                             f"{_hint(self.path)}")
        on_disk = _files(self.path)
        for rel in sorted(set(self.ledger) - on_disk):
            raise QueryError(f"{self.path / rel}: missing (the export's ledger lists it); {_hint(self.path)}")
        for rel in sorted(on_disk - set(self.ledger)):
            raise QueryError(f"{self.path / rel}: not a file of this export (not in its ledger); {_hint(self.path)}")
        self._verify([EXPORT_FILE, "manifest.json"])
        try:
            self.d_model = int(self.meta["d_model"])
            self.manifest = json.loads((self.path / "manifest.json").read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QueryError(f"{self.path}: unreadable export metadata ({e}); {_hint(self.path)}") from None
        self._checks: dict[str, Future[None]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-check")

    def _verify(self, rels: list[str]) -> None:
        for rel in rels:
            got = sha256_file(self.path / rel)
            if got != self.ledger[rel]:
                raise QueryError(f"{self.path / rel}: content differs from what was exported (SHA-256 "
                                 f"{got[:12]}..., recorded {self.ledger[rel][:12]}...); {_hint(self.path)}")

    def check_view(self, view: View) -> None:
        """Start hashing the view's files against the ledger (once per open export), in a
        thread that overlaps the scan; :meth:`settle` waits for it before a result is given."""
        with self._lock:
            if not self.check or view.name in self._checks:
                return
            rels = sorted(rel for rel in self.ledger if rel.startswith(f"{view.name}/"))
            self._checks[view.name] = self._pool.submit(self._verify, rels)

    def settle(self) -> None:
        """Wait for every hash started so far; a mismatch is a one-line QueryError."""
        with self._lock:
            pending = list(self._checks.values())
        for f in pending:
            f.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def source(self, view: View) -> pl.LazyFrame:
        """The view as a lazy scan (DuckDB pushes filters and projections into it)."""
        folder = self.path / view.name
        if not folder.is_dir():
            raise QueryError(f"{self.path} has no {view.name}/ folder: an incomplete export; {_hint(self.path)}")
        schema = polars_schema(view, self.d_model)
        if partitioned(view):
            lf = pl.scan_parquet(str(folder / f"{PARTITION}=*" / "*.parquet"), hive_partitioning=True)
        else:
            lf = pl.scan_parquet(str(folder / "*.parquet"))
        return lf.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])


@dataclass
class ExportReport:
    """What ``verify`` found in an export: one line per problem, naming the file."""

    root: Path
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return list(self.problems)


def verify_export(root: Path | str, progress: Any = None) -> ExportReport:
    """Every file against the ledger (present, no others, SHA-256), every Parquet file read
    whole with its page checksums verified, and the views export.json promises present."""
    root = Path(root)
    rep = ExportReport(root)
    ledger = read_ledger(root, EXPORT_LEDGER)
    if ledger is None:
        rep.problems.append(f"{root / EXPORT_LEDGER}: missing (an export made before checksums, or damaged); "
                            "re-export it with `echowh export`")
        return rep
    on_disk = _files(root)
    rep.problems += [f"{root / rel}: missing (the export's ledger lists it)" for rel in sorted(set(ledger) - on_disk)]
    rep.problems += [f"{root / rel}: not a file of this export (not in its ledger)" for rel in sorted(on_disk - set(ledger))]
    present = sorted(set(ledger) & on_disk)
    for rel in present:
        if progress is not None:
            progress(len(present), rel)
        path = root / rel
        rep.files_checked += 1
        rep.bytes_checked += path.stat().st_size
        got = sha256_file(path)
        if got != ledger[rel]:
            rep.problems.append(f"{path}: content differs from what was exported (SHA-256 {got[:12]}..., "
                                f"recorded {ledger[rel][:12]}...)")
        if rel.endswith(".parquet"):
            try:
                pf = pq.ParquetFile(path, page_checksum_verification=True)
                for g in range(pf.num_row_groups):  # one row group in memory at a time
                    pf.read_row_group(g)
            except (OSError, pa.ArrowException, ValueError) as e:
                rep.problems.append(f"{path}: unreadable Parquet ({' '.join(str(e).split())[:200]})")
    try:
        meta = json.loads((root / EXPORT_FILE).read_text())
        missing = [v.name for v in VIEWS if v.name in meta.get("views", {}) and not (root / v.name).is_dir()]
    except (OSError, ValueError, AttributeError) as e:
        rep.problems.append(f"{root / EXPORT_FILE}: unreadable ({e})")
        return rep
    rep.problems += [f"{root / name}: missing (export.json lists this view)" for name in missing]
    return rep
