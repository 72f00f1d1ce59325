"""``Comparison``: the views of several warehouses on one connection, with a ``model`` column.

Each warehouse gets a label (its model's name, or the user's ``LABEL`` in ``-w LABEL=DIR``) and
its own DuckDB schema named by it, holding every documented view of that warehouse alone,
exactly as a single :class:`~query.Warehouse` has them (``"smollm2".resid``). The unqualified
view names are ``UNION ALL BY NAME`` of those, with the label as a leading ``model`` column.
DuckDB pushes a filter on ``model`` into the union: a branch whose constant label fails the
filter is dropped before it is scanned, so ``WHERE model = 'a'`` never reads the other
warehouses' shards; every other pushed filter reaches each warehouse's own source.

Named analyses written for one warehouse run once per warehouse, in that warehouse's schema
(the very SQL and views a single ``Warehouse`` runs), and come back with a ``model`` column;
comparison analyses (``compare_*``) run once over the union views.

Vector columns (``FLOAT[D]``) stay fixed-size arrays when every warehouse has the same
``d_model``; otherwise they become ``FLOAT[]`` lists (use ``list_cosine_similarity`` etc.).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from query.analyses import get_analysis, is_comparison
from query.connection import ReadOnlyConnection
from query.errors import QueryError
from query.views import VIEWS
from query.warehouse import WarehouseSources
from store.schema import MANIFEST_NAME

# Names DuckDB already uses for a catalog or schema: not available as a model's schema.
RESERVED = frozenset({"main", "temp", "system", "memory", "information_schema", "pg_catalog"})


@dataclass(frozen=True)
class WarehouseArg:
    """One warehouse of a comparison: its directory and the label given to it (None: default)."""

    path: Path
    label: str | None = None


def parse_warehouse_arg(text: str) -> WarehouseArg:
    """``DIR`` or ``LABEL=DIR`` (an existing directory whose name holds ``=`` stays a directory)."""
    label, sep, rest = text.partition("=")
    if not sep or Path(text).is_dir():
        return WarehouseArg(Path(text))
    if not label.strip() or not rest.strip():
        raise QueryError(f"-w takes DIR or LABEL=DIR, got {text!r}")
    return WarehouseArg(Path(rest.strip()), label.strip())


def ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """``text`` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def schema_versions(args: Sequence[WarehouseArg]) -> None:
    """Refuse warehouses of different schema versions (before opening any): their views differ.

    An unreadable manifest is left to the reader, which says what is wrong with it.
    """
    versions: list[tuple[WarehouseArg, Any]] = []
    for a in args:
        try:
            versions.append((a, json.loads((a.path / MANIFEST_NAME).read_text()).get("schema_version")))
        except (OSError, ValueError, AttributeError):
            continue
    if len({json.dumps(v) for _, v in versions}) > 1:
        listing = ", ".join(f"{a.path} has {v}" for a, v in versions)
        raise QueryError(f"cannot compare warehouses of different schema versions ({listing}); "
                         "re-extract them with one echo-warehouse version")


def assign_labels(given: Sequence[str | None], defaults: Sequence[str], paths: Sequence[Path]) -> list[str]:
    """Labels, unique without regard to case (DuckDB's identifiers): given ones as they are
    (a repeat or a reserved name is an error), defaults disambiguated by the warehouse's
    directory name (``name@dir``), then by position (``name#2``)."""
    taken: set[str] = set()
    for g in given:
        if g is None:
            continue
        if g.lower() in RESERVED:
            raise QueryError(f"label {g!r} is reserved by DuckDB; choose another in -w LABEL=DIR")
        if g.lower() in taken:
            raise QueryError(f"label {g!r} is given to two warehouses; labels must differ")
        taken.add(g.lower())
    clash = [d.lower() for g, d in zip(given, defaults, strict=True) if g is None]
    out: list[str] = []
    for i, (g, d, p) in enumerate(zip(given, defaults, paths, strict=True)):
        if g is not None:
            out.append(g)
            continue
        label = d
        if clash.count(d.lower()) > 1 or d.lower() in taken or d.lower() in RESERVED:
            label = f"{d}@{p.resolve().name}"
        if label.lower() in taken:
            label = f"{d}#{i + 1}"
        taken.add(label.lower())
        out.append(label)
    return out


class Comparison(ReadOnlyConnection):
    """One or more warehouses read-only on one DuckDB connection; frames carry a ``model`` column.

    ``warehouses``: directories, ``(label, directory)`` pairs or :class:`WarehouseArg`; the order
    given is the order of ``labels``. ``pushdown``, ``memory_limit``, ``timeout`` and
    ``threads`` and ``check_export`` as for :class:`~query.Warehouse`.
    """

    def __init__(self, warehouses: Sequence[Path | str | tuple[str, Path | str] | WarehouseArg],
                 threads: int | None = None, *, pushdown: bool = True, memory_limit: str | None = None,
                 timeout: float | None = None, check_export: bool = True) -> None:
        args = [_as_arg(w) for w in warehouses]
        if not args:
            raise QueryError("a comparison needs at least one warehouse")
        schema_versions(args)
        self.members: list[WarehouseSources] = []
        try:
            for a in args:
                self.members.append(WarehouseSources(a.path, label=a.label, pushdown=pushdown,
                                                     check_export=check_export))
            self.labels = assign_labels([a.label for a in args], [m.label for m in self.members],
                                        [a.path for a in args])
            for m, label in zip(self.members, self.labels, strict=True):
                m.label = label  # an HDF5 warehouse or a Parquet export (query.export)
            self._connect([a.path for a in args], threads, memory_limit, timeout)
        except QueryError:
            self._release()
            raise
        self._catalog = ident(str(self.con.sql("SELECT current_database()").fetchall()[0][0]))
        self._home = f"{self._catalog}.main"
        self._register()
        self._lock()

    def _register(self) -> None:
        for i, (m, label) in enumerate(zip(self.members, self.labels, strict=True)):
            schema = ident(label)
            self.con.execute(f"CREATE SCHEMA {schema}")
            for v in VIEWS:
                if not v.sql:
                    hidden = f"_m{i}_{v.name}"
                    self.con.register(hidden, m.source(v))
                    self.con.execute(f"CREATE VIEW {schema}.{v.name} AS SELECT * FROM {hidden}")
            for v in VIEWS:
                if v.sql:  # derived: its SQL binds in the warehouse's own schema
                    self.con.execute(f"CREATE VIEW {schema}.{v.name} AS {v.sql}")
        mixed = len({m.d_model for m in self.members}) > 1
        for v in VIEWS:
            vectors = [c.name for c in v.columns if c.type == "FLOAT[D]"]
            cols = "*" + (f" REPLACE ({', '.join(f'{c}::FLOAT[] AS {c}' for c in vectors)})"
                          if vectors and mixed else "")
            parts = [f"SELECT {'' if 'model' in v.names else literal(label) + ' AS model, '}{cols} "
                     f"FROM {ident(label)}.{v.name}" for label in self.labels]
            self.con.execute(f"CREATE VIEW {self._home}.{v.name} AS " + " UNION ALL BY NAME ".join(parts))

    # -- lifecycle and failures ------------------------------------------------------------
    def _release(self) -> None:
        for m in self.members:
            m.close()

    def __enter__(self) -> Comparison:
        return self

    def notes(self) -> list[str]:
        return [m.note for m in self.members if m.note]

    def _settle(self) -> None:
        for m in self.members:
            m.settle()

    def _failure(self) -> QueryError | None:
        return next((m.failure for m in self.members if m.failure is not None), None)

    def _clear_failure(self) -> None:
        for m in self.members:
            m.failure = None

    @property
    def bytes_read(self) -> int:
        """Bytes of heavy-view data read from HDF5 so far, over every warehouse (exports: 0)."""
        return sum(m.bytes_read for m in self.members)

    def _views_hint(self) -> str:
        own = ", ".join(f"{ident(label)}.<view>" for label in self.labels)
        return f"{super()._views_hint()} (with a model column; one model's own: {own})"

    # -- analyses --------------------------------------------------------------------------
    def run_analysis(self, name: str, **params: Any) -> pl.DataFrame:
        """A comparison analysis over the union views; any other once per warehouse, in its
        own schema, with the warehouse's label as a leading ``model`` column."""
        a = get_analysis(name)
        values = a.bind(params) or None
        if is_comparison(a):
            return self.sql(a.sql, values)
        self._check_read_only(self._one_statement(a.sql))
        frames = []
        for label in self.labels:
            self.con.execute(f"USE {self._catalog}.{ident(label)}")
            try:
                df = self._execute(a.sql, values)
            finally:
                self.con.execute(f"USE {self._home}")
            frames.append(df.with_columns(pl.lit(label, dtype=pl.String).alias("model")).select("model", *df.columns))
        return pl.concat(frames, how="diagonal_relaxed")


def _as_arg(w: Path | str | tuple[str, Path | str] | WarehouseArg) -> WarehouseArg:
    if isinstance(w, WarehouseArg):
        return w
    if isinstance(w, tuple):
        return WarehouseArg(Path(w[1]), w[0])
    return WarehouseArg(Path(w))
