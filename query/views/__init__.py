"""Every documented view: the experiment kinds, imported in catalogue order, each registering its
views into ``query.registry`` (how to add a kind: that module's docstring).

A kind's module is ``query/views/<kind>.py``; it imports the registry and the shared columns,
never another kind or this package's consumers (warehouse, export, light, heavy).
"""

from __future__ import annotations

from query import registry
from query.columns import ROLE_NAMES, Column, SqlType
from query.registry import View, arrow_schema, polars_schema, table
from query.views import core, patching, sinks
from query.views.core import SINK_MODES

# The catalogue: every kind, in the order of the README's view reference.
VIEWS: tuple[View, ...] = registry.catalogue((core.KIND, patching.KIND, sinks.KIND))
VIEW_BY_NAME: dict[str, View] = {v.name: v for v in VIEWS}
LOADERS = registry.light_loaders()  # the light views' loaders of every kind but core (query.light's)

__all__ = [
    "LOADERS",
    "ROLE_NAMES",
    "SINK_MODES",
    "VIEWS",
    "VIEW_BY_NAME",
    "Column",
    "SqlType",
    "View",
    "arrow_schema",
    "polars_schema",
    "table",
]
