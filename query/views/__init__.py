"""Every documented view: the experiment kinds, each registering its views into
``query.registry`` from its own module here (how to add a kind: ``query.registry``'s docstring).

A kind's module is ``query/views/<kind>.py``; it imports the registry and the shared columns
(``query.columns``), never another kind nor a reader of views (warehouse, export, light,
heavy). This package imports every kind and lists them in the README catalogue's order;
the readers import ``VIEWS``, ``VIEW_BY_NAME`` and ``LOADERS`` from here.
"""

from __future__ import annotations

from query import registry
from query.columns import ROLE_NAMES, Column, SqlType
from query.registry import View, arrow_schema, polars_schema, table
from query.views import circuits, core, patching, sinks, taskvec
from query.views.core import SINK_MODES

# The catalogue: every kind, in the order of the README's view reference.
VIEWS: tuple[View, ...] = registry.catalogue((core.KIND, patching.KIND, sinks.KIND, circuits.KIND, taskvec.KIND))
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
