"""``Warehouse``: a read-only DuckDB connection over a warehouse's documented views.

Every view is registered on the connection once, as a source DuckDB itself scans; nothing
here reads SQL text to decide what to load:

* a heavy view is a Polars IO-plugin LazyFrame (``polars.io.plugins.register_io_source``).
  DuckDB's optimizer pushes each scan's filters (as a Polars predicate) and projection (as
  column names) into it, after resolving aliases, renamed columns, CTEs, views and
  ``query_table``; ``query.heavy`` reads just the HDF5 slices those can select and returns
  exactly the selected rows;
* a light view (and, with ``pushdown=False``, every heavy view too) is an Arrow stream read
  whole on its first scan and kept; DuckDB filters it itself.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
from polars.io.plugins import register_io_source

from query.analyses import get_analysis
from query.errors import QueryError
from query.export import ParquetExport, is_export
from query.heavy import HeavyReader
from query.light import LIGHT
from query.shards import Shards, shard_error
from query.views import VIEW_BY_NAME, VIEWS, View, arrow_schema
from store import WarehouseError, WarehouseReader

# Statements that only read. Anything else (CREATE, INSERT, COPY, ATTACH, SET, INSTALL ...)
# is refused before DuckDB sees it.
_READ_PRAGMAS = {"table_info", "show_tables", "show_tables_expanded", "show", "version",
                 "database_list", "functions"}
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s*(?:\([^()]*\)|ANALY[SZ]E\b)?\s*", re.IGNORECASE)
_READ_ERRORS = (WarehouseError, OSError, KeyError, ValueError, TypeError, IndexError)


def default_memory_limit() -> str:
    """Half the machine's physical memory (DuckDB's own default is 80%)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "4GB"
    return f"{max(total // 2 // 2**20, 256)}MB"


class _WholeTable:
    """An Arrow stream DuckDB scans itself: built on the first scan, then kept.

    DuckDB asks for the schema when a statement binds the name (no data read) and for the
    stream when it scans it, so a view no statement names is never read.
    """

    def __init__(self, schema: pa.Schema, build: Callable[[], pa.Table]) -> None:
        self.schema = schema
        self.build = build
        self.table: pa.Table | None = None

    def __arrow_c_schema__(self) -> object:
        return self.schema.__arrow_c_schema__()

    def __arrow_c_stream__(self, requested_schema: object = None) -> object:
        if self.table is None:
            self.table = self.build().cast(self.schema)
        return self.table.__arrow_c_stream__(requested_schema)


class Warehouse:
    """Opens a warehouse read-only; ``sql`` and ``run_analysis`` return Polars frames.

    ``pushdown=False`` reads every heavy view whole on its first use and lets DuckDB filter
    it (the reference the narrowed reads are tested against; memory grows with the warehouse).
    ``memory_limit`` (DuckDB size, e.g. ``"2GB"``) caps DuckDB's own memory; larger
    intermediates spill to a fresh temporary directory outside the warehouse and the current
    directory, removed on ``close``. ``timeout`` (seconds) interrupts a statement that runs
    longer, with a QueryError.
    """

    def __init__(self, path: Path | str, threads: int | None = None, *, pushdown: bool = True,
                 memory_limit: str | None = None, timeout: float | None = None) -> None:
        self.path = Path(path)
        self.pushdown = pushdown
        self.timeout = timeout
        if timeout is not None and not timeout > 0:
            raise QueryError(f"timeout must be a positive number of seconds, got {timeout}")
        # A Parquet export (`echowh export --parquet`) opens with the same views over its files.
        self.export: ParquetExport | None = ParquetExport(self.path) if is_export(self.path) else None
        self.reader: WarehouseReader | None = None
        self.shards: Shards | None = None
        try:
            if self.export is None:
                self.reader = WarehouseReader(self.path)
                self.shards = Shards(self.reader)
        except QueryError:
            raise
        except WarehouseError as e:
            raise QueryError(str(e)) from None
        except (OSError, KeyError) as e:
            raise QueryError(f"{path}: unreadable warehouse ({e})") from None
        self.spill_dir = self._spill_dir()
        self._failure: QueryError | None = None
        try:
            # The connection reaches nothing but the views we register: no files, no network,
            # no extensions, and the settings cannot be changed back by a user's statement.
            self.con = duckdb.connect(":memory:", config={
                "enable_external_access": False,
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "memory_limit": memory_limit or default_memory_limit(),
                "temp_directory": str(self.spill_dir),
            })
        except duckdb.Error as e:
            self._cleanup()
            raise QueryError(f"cannot open DuckDB ({_first_line(str(e))}); check --memory-limit "
                             f"{memory_limit!r} (e.g. 2GB, 500MB)") from None
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")
        for v in VIEWS:
            if self.export is not None:
                self.con.register(v.name, self.export.source(v))  # derived views were exported too
            elif not v.sql:
                self.con.register(v.name, self._source(v))
        for v in VIEWS:
            if v.sql and self.export is None:
                self.con.execute(f"CREATE VIEW {v.name} AS {v.sql}")
        self.con.execute("SET lock_configuration = true")

    # -- lifecycle -------------------------------------------------------------------------
    def _spill_dir(self) -> Path:
        d = Path(tempfile.mkdtemp(prefix="echowh-spill-")).resolve()
        for forbidden, what in ((self.path.resolve(), "the warehouse"), (Path.cwd().resolve(), "the current directory")):
            if d == forbidden or (what == "the warehouse" and forbidden in d.parents):
                shutil.rmtree(d, ignore_errors=True)
                raise QueryError(f"the temporary directory {d} is inside {what}; set TMPDIR elsewhere")
        return d

    def _cleanup(self) -> None:
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        if self.reader is not None:
            self.reader.close()

    def close(self) -> None:
        self.con.close()
        self._cleanup()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bytes_read(self) -> int:
        """Bytes of heavy-view data read from HDF5 so far (as stored on disk; 0 for an export)."""
        return self.shards.bytes_read if self.shards is not None else 0

    @staticmethod
    def views() -> tuple[View, ...]:
        return VIEWS

    # -- sources ---------------------------------------------------------------------------
    def _guarded(self, fn: Callable[[], Any], view: str) -> Any:
        """Run a read for ``view``; a broken shard is remembered (DuckDB wraps what we raise)."""
        try:
            return fn()
        except QueryError as e:
            self._failure = e
            raise
        except _READ_ERRORS as e:
            self._failure = shard_error(e, f"{self.path} (view {view})")
            raise self._failure from None

    def _source(self, view: View) -> Any:
        if view.heavy is None:
            return _WholeTable(arrow_schema(view, self.shards.d_model),
                               lambda: self._guarded(lambda: LIGHT[view.name](self.shards), view.name))
        reader = HeavyReader(self.shards, view)
        if not self.pushdown:
            return _WholeTable(arrow_schema(view, self.shards.d_model),
                               lambda: self._guarded(reader.whole, view.name))

        def scan(with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
                 batch_size: int | None) -> Iterator[pl.DataFrame]:
            batches = reader.batches(with_columns, predicate, n_rows)
            while True:
                batch = self._guarded(lambda: next(batches, None), view.name)
                if batch is None:
                    return
                yield batch

        return register_io_source(scan, schema=reader.schema)

    # -- queries ---------------------------------------------------------------------------
    def sql(self, sql: str, params: dict[str, Any] | None = None) -> pl.DataFrame:
        """Run one read-only statement; QueryError with DuckDB's message on a mistake."""
        self._check_read_only(self._one_statement(sql))
        self._failure = None
        timer = None
        if self.timeout is not None:
            timer = threading.Timer(self.timeout, self.con.interrupt)
            timer.daemon = True
            timer.start()
        try:
            rel = self.con.sql(sql, params=params or None)
            return pl.DataFrame() if rel is None else rel.pl()
        except duckdb.InterruptException:
            raise QueryError(f"interrupted: the statement ran longer than the timeout ({self.timeout:g} s)") from None
        except Exception as e:
            if self._failure is not None:
                raise self._failure from None
            if isinstance(e, QueryError):
                raise
            if not isinstance(e, duckdb.Error):
                raise
            raise QueryError(f"{_tidy(str(e))}\n{self._views_hint()}") from None
        finally:
            if timer is not None:
                timer.cancel()

    def run_analysis(self, name: str, **params: Any) -> pl.DataFrame:
        """Run a named analysis (see ``list_analyses``) with parameters over its defaults."""
        a = get_analysis(name)
        values = a.bind(params)
        return self.sql(a.sql, values or None)

    # -- internals -------------------------------------------------------------------------
    def _views_hint(self) -> str:
        return "views: " + ", ".join(v.name for v in VIEWS)

    def _one_statement(self, sql: str) -> Any:
        try:
            stmts = self.con.extract_statements(sql)
        except duckdb.Error as e:
            raise QueryError(f"{e}\n{self._views_hint()}") from None
        if len(stmts) != 1:
            raise QueryError(f"expected one SQL statement, got {len(stmts)}")
        return stmts[0]

    def _check_read_only(self, stmt: Any) -> None:
        kind = str(stmt.type.name)
        text = str(stmt.query).strip()
        if kind == "EXPLAIN":
            # EXPLAIN [ANALYZE | (options)] <statement>: the statement it explains must read.
            inner = _EXPLAIN.sub("", text, count=1)
            try:
                inner_stmts = self.con.extract_statements(inner) if inner else []
            except duckdb.Error as e:
                raise QueryError(f"cannot read the statement EXPLAIN explains: {_first_line(str(e))}") from None
            if len(inner_stmts) == 1 and str(inner_stmts[0].type.name) == "SELECT":
                return
            kind = str(inner_stmts[0].type.name) if len(inner_stmts) == 1 else kind
        elif kind == "SELECT":
            return
        elif kind == "PRAGMA":
            m = re.match(r"^\s*PRAGMA\s+(\w+)\s*(\(|;|$)", text, flags=re.IGNORECASE)
            if m and m.group(1).lower() in _READ_PRAGMAS:
                return
        raise QueryError(
            f"refused: {kind} statements are not allowed; the warehouse is read-only "
            "(use SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN)"
        )


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else message


def _tidy(message: str) -> str:
    """DuckDB's message, with its catalog guess replaced by the closest of our views."""
    m = re.search(r"Table with name (\S+) does not exist", message)
    if m is None:
        return message
    first = message.split("\n", 1)[0]
    close = difflib.get_close_matches(m.group(1).lower(), list(VIEW_BY_NAME), n=1, cutoff=0.5)
    return first + (f' Did you mean "{close[0]}"?' if close else "")
