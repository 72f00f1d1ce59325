"""DuckDB + Polars over a warehouse: documented views and named SQL analyses.

    >>> from query import Warehouse, list_analyses
    >>> wh = Warehouse("out/warehouse")
    >>> wh.sql("SELECT word, echo_correct FROM prompts")          # a polars.DataFrame
    >>> wh.run_analysis("emergence_layer")

Never imports torch, transformers or extract: queries do not touch the model.
"""

from query.analyses import Analysis, Param, get_analysis, list_analyses
from query.errors import QueryError
from query.views import VIEWS, Column, View
from query.warehouse import Warehouse

__all__ = [
    "VIEWS",
    "Analysis",
    "Column",
    "Param",
    "QueryError",
    "View",
    "Warehouse",
    "get_analysis",
    "list_analyses",
]
