"""DuckDB + Polars over a warehouse: documented views and named SQL analyses.

    >>> from query import Comparison, Warehouse, list_analyses
    >>> wh = Warehouse("out/warehouse")
    >>> wh.sql("SELECT word, echo_correct FROM prompts")          # a polars.DataFrame
    >>> wh.run_analysis("emergence_layer")
    >>> with Comparison([("smol", "runs/smol"), ("gemma", "runs/gemma")]) as c:   # a `model` column
    ...     c.sql("SELECT model, avg(echo_correct::INT) FROM prompts GROUP BY model")

Never imports torch, transformers or extract: queries do not touch the model.
"""

from query.analyses import Analysis, Param, get_analysis, is_comparison, list_analyses
from query.compare import Comparison, WarehouseArg, parse_warehouse_arg
from query.errors import QueryError
from query.views import VIEWS, Column, View
from query.warehouse import Warehouse

__all__ = [
    "VIEWS",
    "Analysis",
    "Column",
    "Comparison",
    "Param",
    "QueryError",
    "View",
    "Warehouse",
    "WarehouseArg",
    "get_analysis",
    "is_comparison",
    "list_analyses",
    "parse_warehouse_arg",
]
