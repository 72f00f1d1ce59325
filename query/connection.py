"""``ReadOnlyConnection``: the DuckDB connection a ``Warehouse`` or a ``Comparison`` queries through.

One place for what does not depend on how many warehouses are open: the locked-down DuckDB
configuration (no files, no network, no extensions, a memory limit, a spill directory outside
every warehouse), the read-only statement check, the timeout, and turning DuckDB's errors and
a broken shard into one-line :class:`QueryError`\\ s. Subclasses register the views.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from query.errors import QueryError
from query.views import VIEW_BY_NAME, VIEWS

# Statements that only read. Anything else (CREATE, INSERT, COPY, ATTACH, SET, USE, INSTALL ...)
# is refused before DuckDB sees it.
_READ_PRAGMAS = {"table_info", "show_tables", "show_tables_expanded", "show", "version",
                 "database_list", "functions"}
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s*(?:\([^()]*\)|ANALY[SZ]E\b)?\s*", re.IGNORECASE)


def default_memory_limit() -> str:
    """Half the machine's physical memory (DuckDB's own default is 80%)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "4GB"
    return f"{max(total // 2 // 2**20, 256)}MB"


class ReadOnlyConnection:
    """A locked-down in-memory DuckDB connection; ``sql`` returns Polars frames.

    Subclasses call ``_connect`` (before registering their views) and ``_lock`` (after), and
    override ``_failure``/``_clear_failure`` so that a shard read that failed inside a scan
    reaches the user as its own one-line error rather than DuckDB's wrapper.
    """

    timeout: float | None
    con: duckdb.DuckDBPyConnection
    spill_dir: Path

    # -- lifecycle -------------------------------------------------------------------------
    def _connect(self, roots: Iterable[Path], threads: int | None, memory_limit: str | None,
                 timeout: float | None) -> None:
        """Open the connection; ``roots`` are the warehouses the spill directory must stay out of."""
        self.timeout = timeout
        if timeout is not None and not timeout > 0:
            raise QueryError(f"timeout must be a positive number of seconds, got {timeout}")
        self.spill_dir = _spill_dir(list(roots))
        self.memory_limit = memory_limit or default_memory_limit()
        try:
            # The connection reaches nothing but the views we register: no files, no network,
            # no extensions, and the settings cannot be changed back by a user's statement.
            self.con = duckdb.connect(":memory:", config={
                "enable_external_access": False,
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "memory_limit": self.memory_limit,
                "temp_directory": str(self.spill_dir),
            })
        except duckdb.Error as e:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            raise QueryError(f"cannot open DuckDB ({_first_line(str(e))}); check --memory-limit "
                             f"{memory_limit!r} (e.g. 2GB, 500MB)") from None
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")

    def _lock(self) -> None:
        self.con.execute("SET lock_configuration = true")

    def _release(self) -> None:
        """Subclasses close their readers here."""

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        self._release()

    def __enter__(self) -> ReadOnlyConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def notes(self) -> list[str]:
        """One line per open warehouse that is unfinished (what it lacks); empty when none is."""
        return []

    # -- failures inside scans ---------------------------------------------------------------
    def _failure(self) -> QueryError | None:
        return None

    def _clear_failure(self) -> None:
        pass

    def _settle(self) -> None:
        """Wait for checks the scans started in the background (an export's hashes); raise
        a QueryError if one failed."""

    # -- queries ---------------------------------------------------------------------------
    def sql(self, sql: str, params: dict[str, Any] | None = None) -> pl.DataFrame:
        """Run one read-only statement; QueryError with DuckDB's message on a mistake."""
        self._check_read_only(self._one_statement(sql))
        return self._execute(sql, params)

    def _execute(self, sql: str, params: dict[str, Any] | None = None) -> pl.DataFrame:
        """Run a statement already known to read, under the timeout."""
        self._clear_failure()
        timer = None
        if self.timeout is not None:
            timer = threading.Timer(self.timeout, self.con.interrupt)
            timer.daemon = True
            timer.start()
        try:
            rel = self.con.sql(sql, params=params or None)
            table = None if rel is None else rel.to_arrow_table()
            self._settle()  # a check the scans started must pass before any result is given
            return pl.DataFrame() if table is None else to_polars(table)
        except duckdb.InterruptException:
            raise QueryError(f"interrupted: the statement ran longer than the timeout ({self.timeout:g} s)") from None
        except Exception as e:
            with contextlib.suppress(QueryError):  # damage a check found explains a failed scan
                self._settle()
            failure = self._failure()
            if failure is not None:
                raise failure from None
            if isinstance(e, QueryError):
                raise
            if not isinstance(e, duckdb.Error):
                raise
            raise QueryError(self._message(e)) from None
        finally:
            if timer is not None:
                timer.cancel()

    # -- internals -------------------------------------------------------------------------
    def _message(self, e: duckdb.Error) -> str:
        """DuckDB's first line (never its context lines or its advice, some of which, like
        SET threads, this connection refuses), with our own hint where one helps."""
        first = _tidy(str(e))
        if isinstance(e, duckdb.OutOfMemoryException):
            return (f"{first}; raise --memory-limit (now {self.memory_limit}) or select fewer rows "
                    "or columns")
        if isinstance(e, duckdb.ParserException | duckdb.CatalogException | duckdb.BinderException):
            return f"{first}\n{self._views_hint()}"
        return first

    def _views_hint(self) -> str:
        return "views: " + ", ".join(v.name for v in VIEWS)

    def _one_statement(self, sql: str) -> Any:
        try:
            stmts = self.con.extract_statements(sql)
        except duckdb.Error as e:
            raise QueryError(self._message(e)) from None
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


def _spill_dir(roots: list[Path]) -> Path:
    """A fresh temporary directory, never inside a warehouse nor the current directory."""
    d = Path(tempfile.mkdtemp(prefix="echowh-spill-")).resolve()
    cwd = Path.cwd().resolve()
    for root in roots:
        root = root.resolve()
        if d == root or root in d.parents:
            shutil.rmtree(d, ignore_errors=True)
            raise QueryError(f"the temporary directory {d} is inside the warehouse {root}; set TMPDIR elsewhere")
    if d == cwd:
        shutil.rmtree(d, ignore_errors=True)
        raise QueryError(f"the temporary directory {d} is inside the current directory; set TMPDIR elsewhere")
    return d


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else message


def to_polars(table: pa.Table) -> pl.DataFrame:
    """A result as a Polars frame; a column Polars cannot hold (a UNION or an INTERVAL,
    anywhere inside its type) becomes text, before Polars sees it (some of them panic)."""
    cols = []
    for name, col in zip(_unique(table.column_names), table.columns, strict=True):
        if _unsupported(col.type):
            cols.append(pl.Series(name, [None if v is None else str(v) for v in col.to_pylist()], dtype=pl.String))
            continue
        try:
            cols.append(pl.from_arrow(pa.table({name: col})).to_series())
        except (pl.exceptions.PolarsError, pa.ArrowException, ValueError, TypeError):
            cols.append(pl.Series(name, [None if v is None else str(v) for v in col.to_pylist()], dtype=pl.String))
    return pl.DataFrame(cols)


def _unique(names: list[str]) -> list[str]:
    """Repeated column names made unique as DuckDB's own ``.pl()`` does: a, a_1, a_2."""
    seen: set[str] = set()
    out = []
    for n in names:
        name, k = n, 0
        while name in seen:
            k += 1
            name = f"{n}_{k}"
        seen.add(name)
        out.append(name)
    return out


def _unsupported(t: pa.DataType) -> bool:
    if pa.types.is_union(t) or pa.types.is_interval(t):
        return True
    return any(_unsupported(t.field(i).type) for i in range(t.num_fields))


def _tidy(message: str) -> str:
    """DuckDB's first line, with its catalog guess replaced by the closest of our views."""
    m = re.search(r"Table with name (\S+) does not exist", message)
    first = _first_line(message)
    if m is None:
        return first
    close = difflib.get_close_matches(m.group(1).lower(), list(VIEW_BY_NAME), n=1, cutoff=0.5)
    return first + (f' Did you mean "{close[0]}"?' if close else "")
