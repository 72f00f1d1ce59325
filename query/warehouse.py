"""``Warehouse``: a read-only DuckDB connection over a warehouse's documented views."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from query.analyses import get_analysis
from query.errors import QueryError
from query.pushdown import Pred, parse
from query.views import VIEW_BY_NAME, VIEWS, Loader, View
from store import WarehouseError, WarehouseReader

# Statements that only read. Anything else (CREATE, INSERT, COPY, ATTACH, SET, INSTALL ...)
# is refused before DuckDB sees it.
_READ_TYPES = {"SELECT", "EXPLAIN"}
_READ_PRAGMAS = {"table_info", "show_tables", "show_tables_expanded", "show", "version",
                 "database_list", "functions"}


class Warehouse:
    """Opens a warehouse read-only; ``sql`` and ``run_analysis`` return Polars frames.

    Views are loaded on first use. Heavy views are loaded per statement for just the
    prompts/layers/heads/positions its predicates allow, and dropped from the catalog
    between statements, so a reference we failed to see is an error, never a partial answer.
    """

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        try:
            self.reader = WarehouseReader(Path(path))
            self.loader = Loader(self.reader)
        except WarehouseError as e:
            raise QueryError(str(e)) from None
        except (OSError, KeyError) as e:
            raise QueryError(f"{path}: unreadable warehouse ({e})") from None
        self.path = Path(path)
        # The connection reaches nothing but the views we register: no files, no network,
        # no extensions, and the settings cannot be changed back by a user's statement.
        self.con = duckdb.connect(":memory:", config={
            "enable_external_access": False,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        })
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")
        self.con.execute("SET lock_configuration = true")
        self._light: set[str] = set()
        self._heavy: dict[str, tuple[tuple, pa.Table]] = {}  # name -> (key, table)
        self._registered_heavy: set[str] = set()
        self._columns = {v.name: v.names for v in VIEWS}
        self._pushable = {v.name: set(v.pushable) for v in VIEWS if v.heavy}

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.con.close()
        self.reader.close()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bytes_read(self) -> int:
        """Bytes of heavy-view data read from HDF5 so far (as stored on disk)."""
        return self.loader.bytes_read

    @staticmethod
    def views() -> tuple[View, ...]:
        return VIEWS

    # -- queries ---------------------------------------------------------------------------
    def sql(self, sql: str, params: dict[str, Any] | None = None) -> pl.DataFrame:
        """Run one read-only statement; QueryError with DuckDB's message on a mistake."""
        stmt = self._one_statement(sql)
        self._check_read_only(stmt)
        parsed = parse(self.con, sql, self._columns, self._pushable, params)
        needed = {r.name for r in parsed.refs if r.name in VIEW_BY_NAME}
        if not parsed.ok and str(stmt.type.name) == "PRAGMA" or (parsed.ok and not parsed.refs):
            needed |= {v.name for v in VIEWS if not v.heavy}  # SHOW TABLES and friends
        try:
            for name in sorted(needed):
                self._ensure(name, [r for r in parsed.refs if r.name == name])
            for name in self._registered_heavy - needed:
                self.con.unregister(name)
            self._registered_heavy &= needed
            rel = self.con.sql(sql, params=params or None)
            if rel is None:
                return pl.DataFrame()
            return rel.pl()
        except duckdb.Error as e:
            raise QueryError(f"{_tidy(str(e))}\n{self._views_hint()}") from None

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
            inner = re.sub(r"^\s*EXPLAIN\s+(ANALYZE\s+)?", "", text, flags=re.IGNORECASE)
            inner_stmts = self.con.extract_statements(inner) if inner else []
            if len(inner_stmts) == 1 and str(inner_stmts[0].type.name) == "SELECT":
                return
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

    def _ensure(self, name: str, refs: list[Any]) -> None:
        view = VIEW_BY_NAME[name]
        if view.depends:
            for dep in view.depends:
                self._ensure(dep, [])
            if name not in self._light:
                self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {view.sql}")
                self._light.add(name)
            return
        if not view.heavy:
            if name not in self._light:
                self.con.register(name, self.loader.load(name))
                self._light.add(name)
            return
        want: list[dict[str, list[Pred]]]
        if refs and all(r.schema_only for r in refs):
            want = [{"prompt": [("in", frozenset())]}]  # no rows: DESCRIBE needs columns only
        else:
            want = [r.preds for r in refs] or [{}]
        key = _freeze(want)
        cached = self._heavy.get(name)
        if cached is None or cached[0] != key:
            table = self.loader.load_heavy(name, want)
            self._heavy[name] = (key, table)
        self.con.register(name, self._heavy[name][1])
        self._registered_heavy.add(name)


def _tidy(message: str) -> str:
    """DuckDB's message, with its catalog guess replaced by the closest of our views."""
    m = re.search(r"Table with name (\S+) does not exist", message)
    if m is None:
        return message
    first = message.split("\n", 1)[0]
    close = difflib.get_close_matches(m.group(1).lower(), list(VIEW_BY_NAME), n=1, cutoff=0.5)
    return first + (f' Did you mean "{close[0]}"?' if close else "")


def _freeze(want: list[dict[str, list[Pred]]]) -> tuple:
    return tuple(sorted(
        tuple(sorted((c, tuple(sorted(map(repr, ps)))) for c, ps in w.items())) for w in want
    ))
