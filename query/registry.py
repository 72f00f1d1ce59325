"""The view registry: what a view is, and the list every experiment kind registers its views into.

Adding an experiment kind (circuits, task vectors, ...) to the query side is:

1. **one module**, ``query/views/<kind>.py``, holding the kind's views declared as data
   (:class:`View`; columns are ``query.columns.Column(name, T.<type>, doc)``, the shared ones
   imported from ``query.columns``), the loaders of its light views (functions of a
   ``query.shards.Shards`` that return :func:`table`), and at its end **one register call**::

       KIND = register(ViewKind("circuits", VIEWS, light={"circuit_edges": circuit_edges}))

2. its ``KIND`` in ``query/views/__init__.py``: one import, one place in the catalogue order;
3. its named SQL analyses as ``.sql`` files in ``query/analyses/`` (``query.analyses`` finds
   them by their header; nothing to register);
4. ``python -m query.catalogue`` to regenerate the README's view reference.

Nothing else in ``query/`` changes: the warehouse, comparisons, the Parquet export and the
catalogue read every view from here. A heavy view (a vector or pattern per layer and
position, :class:`Heavy`) needs no loader at all: ``query.heavy`` reads any declared dataset;
a derived view is SQL over other views (``sql``, ``depends``).

This module imports no kind: kinds import it (downward only; import-linter contracts in
pyproject.toml keep it so). The core views' loaders are ``query.light``'s own (the only kind
whose loaders live outside its module: ``ViewKind.loaders_in``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa

from query.columns import Column
from store.schema import Field

if TYPE_CHECKING:
    from query.shards import Shards

Loader = Callable[["Shards"], pa.Table]  # a light view's rows: all of them, one Arrow table


@dataclass(frozen=True)
class Axis:
    """One leading axis of a heavy view's HDF5 dataset (the prompt is the shard, not an axis).

    ``column`` holds the index along the axis. A token axis may also expose each position's
    role (``role``); the residual's boundary axis also exposes ``layer`` = boundary - 1.
    Reads are narrowed on every axis whose ``narrows`` is set; the others are read whole.
    """

    column: str
    role: str | None = None
    minus_one: str | None = None
    narrows: bool = True


@dataclass(frozen=True)
class Heavy:
    """Where a heavy view's rows come from: one dataset per prompt shard.

    The dataset's shape is ``(*axes, D)`` when ``value`` is a vector column (FLOAT[D]) and
    ``(*axes)`` when it is one number per row. ``causal`` names (query, key) axis columns of
    which only the entries with key <= query are rows. ``optional``: a prompt without the
    dataset has no rows (instead of being an error).
    """

    field: Field
    axes: tuple[Axis, ...]
    value: str
    causal: tuple[str, str] | None = None
    optional: bool = False

    @property
    def index_columns(self) -> tuple[str, ...]:
        """The view's integer columns that a predicate can narrow reads on (prompt first)."""
        out = ["prompt"]
        for a in self.axes:
            if a.narrows:
                out += [c for c in (a.column, a.minus_one, a.role) if c]
        return tuple(out)


@dataclass(frozen=True)
class View:
    """One documented view: light unless ``heavy`` is given, derived when ``sql`` is."""

    name: str
    doc: str
    columns: tuple[Column, ...]
    heavy: Heavy | None = None
    depends: tuple[str, ...] = ()  # derived views: the views their SQL reads
    sql: str = ""  # derived views: their SELECT

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ValueError(f"view {self.name}: duplicate column names {names}")
        if self.heavy is not None and self.sql:
            raise ValueError(f"view {self.name}: a view is heavy or derived, not both")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def is_light(self) -> bool:
        """Read whole by a loader (neither a heavy dataset nor derived SQL)."""
        return self.heavy is None and not self.sql


@dataclass(frozen=True)
class ViewKind:
    """One experiment kind's views, and the loaders of those that are light (by view name).

    ``loaders_in`` names the module that holds the loaders instead, when that is not the kind's
    own (only the core kind: ``query.light``); otherwise every light view needs its loader here.
    """

    name: str
    views: tuple[View, ...]
    light: Mapping[str, Loader] = field(default_factory=dict)
    loaders_in: str | None = None


_KINDS: list[ViewKind] = []


def register(kind: ViewKind) -> ViewKind:
    """Add ``kind``'s views to the registry (after those registered before); returns ``kind``."""
    known = {v.name for v in views()}
    if any(k.name == kind.name for k in _KINDS):
        raise ValueError(f"view kind {kind.name!r} is registered twice")
    names = [v.name for v in kind.views]
    mine = {v.name: v for v in kind.views}
    if clash := sorted({n for n in names if n in known or names.count(n) > 1}):
        raise ValueError(f"view kind {kind.name!r}: view names already taken: {', '.join(clash)}")
    if stray := sorted(n for n in kind.light if n not in mine or not mine[n].is_light):
        raise ValueError(f"view kind {kind.name!r}: loaders for views that are not its light views: "
                         f"{', '.join(stray)}")
    unread = [v.name for v in kind.views if v.is_light and v.name not in kind.light]
    if unread and kind.loaders_in is None:
        raise ValueError(f"view kind {kind.name!r}: light views without a loader: {', '.join(unread)} "
                         "(give each a function of Shards in ViewKind(light=...))")
    _KINDS.append(kind)
    return kind


def catalogue(order: Sequence[ViewKind]) -> tuple[View, ...]:
    """Every registered view, kind by kind in ``order`` (which lists every registered kind once).

    Also checks that each derived view depends on known views only (across kinds).
    """
    if sorted(k.name for k in order) != sorted(k.name for k in _KINDS):
        raise ValueError(f"the catalogue order {[k.name for k in order]} must list every registered kind "
                         f"once: {[k.name for k in _KINDS]} (query/views/__init__.py)")
    out = tuple(v for k in order for v in k.views)
    known = {v.name for v in out}
    for v in out:
        if missing := [d for d in v.depends if d not in known]:
            raise ValueError(f"view {v.name}: depends on unknown views {', '.join(missing)}")
    return out


def kinds() -> tuple[ViewKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS)


def views() -> tuple[View, ...]:
    """Every registered view, kind by kind in registration order."""
    return tuple(v for k in _KINDS for v in k.views)


def light_loaders() -> dict[str, Loader]:
    """The registered kinds' light-view loaders, by view name."""
    return {name: fn for k in _KINDS for name, fn in k.light.items()}


# -- a view's Arrow and Polars types ----------------------------------------------------------
def arrow_schema(view: View, d_model: int) -> pa.Schema:
    """The view's columns as an Arrow schema (FLOAT[D] = fixed-size list of D float32)."""
    return pa.schema([(c.name, c.type.arrow(d_model)) for c in view.columns])


def polars_schema(view: View, d_model: int) -> pl.Schema:
    """The view's columns as a Polars schema (FLOAT[D] = Array(Float32, D))."""
    return pl.Schema([(c.name, c.type.polars(d_model)) for c in view.columns])


def table(view: View, d_model: int, cols: Mapping[str, Any]) -> pa.Table:
    """An Arrow table in the view's exact column order and types (a light loader's result)."""
    schema = arrow_schema(view, d_model)
    arrays = []
    for f in schema:
        v = cols[f.name]
        if isinstance(f.type, pa.FixedSizeListType):
            flat = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), f.type.list_size))
        else:
            arrays.append(pa.array(v, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)
