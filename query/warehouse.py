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

:class:`WarehouseSources` makes those sources for one warehouse; ``query.compare`` registers
the sources of several warehouses on one connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from polars.io.plugins import register_io_source

from query.analyses import get_analysis, is_comparison
from query.connection import ReadOnlyConnection, default_memory_limit
from query.errors import QueryError
from query.export_read import ParquetExport, is_export
from query.heavy import HeavyReader
from query.light import LIGHT
from query.shards import Shards, model_label, shard_error
from query.views import VIEWS, View, arrow_schema, polars_schema
from store import WarehouseError, WarehouseReader

__all__ = ["Warehouse", "WarehouseSources", "default_memory_limit"]

_READ_ERRORS = (WarehouseError, OSError, KeyError, ValueError, TypeError, IndexError)


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


class WarehouseSources:
    """One warehouse opened read-only, and the source DuckDB scans for each of its views.

    ``label`` names the warehouse's model (the ``models`` view, the ``model`` column of a
    comparison); default: ``query.shards.model_label`` of its manifest. A read that fails
    inside a scan is kept in ``failure`` (DuckDB wraps what a source raises).
    """

    def __init__(self, path: Path | str, *, label: str | None = None, pushdown: bool = True,
                 check_export: bool = True) -> None:
        self.path = Path(path)
        self.pushdown = pushdown
        self.failure: QueryError | None = None
        # A Parquet export (`echowh export --parquet`) opens with the same views over its files.
        self.export: ParquetExport | None = None
        self.reader: WarehouseReader | None = None
        self.shards: Shards | None = None
        self._label = label
        try:
            if is_export(self.path):
                self.export = ParquetExport(self.path, check=check_export)
            else:
                self.reader = WarehouseReader(self.path)
                self.shards = Shards(self.reader, label=label)
        except QueryError:
            raise
        except WarehouseError as e:
            raise QueryError(str(e)) from None
        except (OSError, KeyError) as e:
            raise QueryError(f"{path}: unreadable warehouse ({e})") from None

    @property
    def label(self) -> str:
        if self.shards is not None:
            return self.shards.label
        return self._label or model_label(self.export.manifest)

    @label.setter
    def label(self, value: str) -> None:
        """The label a comparison gives this warehouse (its ``model`` column and ``models`` view)."""
        self._label = value
        if self.shards is not None:
            self.shards.label = value

    @property
    def d_model(self) -> int:
        return self.shards.d_model if self.shards is not None else self.export.d_model

    @property
    def bytes_read(self) -> int:
        """Heavy-view bytes read from HDF5 so far (0 for an export: Parquet scans are not counted)."""
        return self.shards.bytes_read if self.shards is not None else 0

    @property
    def manifest(self) -> dict[str, Any]:
        return self.export.manifest if self.export is not None else self.reader.manifest

    @property
    def note(self) -> str | None:
        """What an unfinished warehouse lacks (store.reader.WarehouseReader.note)."""
        return self.reader.note if self.reader is not None else None

    def settle(self) -> None:
        """Wait for the export checks a statement started (query.export_read); raise the first
        mismatch (and remember it as the failure)."""
        if self.export is not None:
            self._guarded(self.export.settle, "export")

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.export is not None:
            self.export.close()

    def _guarded(self, fn: Callable[[], Any], view: str) -> Any:
        """Run a read for ``view``; a broken shard is remembered (DuckDB wraps what we raise)."""
        try:
            return fn()
        except QueryError as e:
            self.failure = e
            raise
        except _READ_ERRORS as e:
            self.failure = shard_error(e, f"{self.path} (view {view})")
            raise self.failure from None

    def source(self, view: View) -> Any:
        """What DuckDB scans for a light or heavy view (derived views are SQL, not sources;
        an export holds every view, derived ones too, as Parquet)."""
        if self.export is not None:
            return self._export_source(view)
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


    def _export_source(self, view: View) -> Any:
        """An export's view: its files are hashed against the export's ledger on the first
        scan (query.export_read), then DuckDB's filters and columns go to the Parquet scan."""
        lf = self._guarded(lambda: self.export.source(view), view.name)
        if view.name == "models":  # the label given now (-w LABEL=DIR), as the HDF5 form has it
            lf = lf.with_columns(pl.lit(self.label, dtype=pl.String).alias("model"))

        def scan(with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
                 batch_size: int | None) -> Iterator[pl.DataFrame]:
            self._guarded(lambda: self.export.check_view(view), view.name)
            out = lf if predicate is None else lf.filter(predicate)
            out = out if with_columns is None else out.select(with_columns)
            out = out if n_rows is None else out.head(n_rows)
            batches = out.collect_batches()
            while True:
                batch = self._guarded(lambda: next(batches, None), view.name)
                if batch is None:
                    return
                yield batch

        return register_io_source(scan, schema=polars_schema(view, self.export.d_model))


class Warehouse(ReadOnlyConnection):
    """Opens a warehouse read-only; ``sql`` and ``run_analysis`` return Polars frames.

    The views have exactly the documented columns (no ``model`` column: that is
    ``query.Comparison``'s, over one or more warehouses).
    ``pushdown=False`` reads every heavy view whole on its first use and lets DuckDB filter
    it (the reference the narrowed reads are tested against; memory grows with the warehouse).
    ``memory_limit`` (DuckDB size, e.g. ``"2GB"``) caps DuckDB's own memory; larger
    intermediates spill to a fresh temporary directory outside the warehouse and the current
    directory, removed on ``close``. ``timeout`` (seconds) interrupts a statement that runs
    longer, with a QueryError. ``label``: the model's name in the ``models`` view.
    ``check_export=False`` (a Parquet export only): do not hash each view's files against the
    export's ledger on its first scan (the file set and export.json are still checked).
    """

    def __init__(self, path: Path | str, threads: int | None = None, *, pushdown: bool = True,
                 memory_limit: str | None = None, timeout: float | None = None,
                 label: str | None = None, check_export: bool = True) -> None:
        self.path = Path(path)
        self.pushdown = pushdown
        if timeout is not None and not timeout > 0:
            raise QueryError(f"timeout must be a positive number of seconds, got {timeout}")
        self.src = WarehouseSources(self.path, label=label, pushdown=pushdown, check_export=check_export)
        self.reader = self.src.reader
        self.shards = self.src.shards
        try:
            self._connect([self.path], threads, memory_limit, timeout)
        except QueryError:
            self.src.close()
            raise
        exported = self.src.export is not None
        for v in VIEWS:
            if not v.sql or exported:
                self._register(v, self.src.source(v))
        for v in VIEWS:
            if v.sql and not exported:
                self.con.execute(f"CREATE VIEW {v.name} AS {v.sql}")
        self._lock()

    def _register(self, view: View, source: Any) -> None:
        """Give ``view``'s source its name on the connection (the differential corpus wraps
        each heavy view in a LIMIT subquery here, a form DuckDB cannot push filters into)."""
        self.con.register(view.name, source)

    def _release(self) -> None:
        self.src.close()

    def notes(self) -> list[str]:
        return [self.src.note] if self.src.note else []

    def _settle(self) -> None:
        self.src.settle()

    def __enter__(self) -> Warehouse:
        return self

    def _failure(self) -> QueryError | None:
        return self.src.failure

    def _clear_failure(self) -> None:
        self.src.failure = None

    @property
    def bytes_read(self) -> int:
        """Bytes of heavy-view data read from HDF5 so far (as stored on disk; 0 for an export)."""
        return self.shards.bytes_read if self.shards is not None else 0

    @staticmethod
    def views() -> tuple[View, ...]:
        return VIEWS

    def run_analysis(self, name: str, **params: Any) -> pl.DataFrame:
        """Run a named analysis (see ``list_analyses``) with parameters over its defaults."""
        a = get_analysis(name)
        if is_comparison(a):
            raise QueryError(f"{name} compares models: open the warehouses with query.Comparison "
                             "(CLI: echowh query -w A -w B -a ...; one -w also works)")
        values = a.bind(params)
        return self.sql(a.sql, values or None)
