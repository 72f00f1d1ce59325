"""The one way to declare a view's column: ``Column(name, T.<type>, doc)``.

A column's type is a :class:`SqlType` (the DuckDB type a user sees), which also knows its
Arrow and Polars types, so a view's tables are built and checked against its declaration.
The columns that several views (and several experiment kinds) share are declared once here;
a view rewords one with :meth:`Column.doc_as`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import polars as pl
import pyarrow as pa

from store import Role


class SqlType(enum.StrEnum):
    """A column's DuckDB type as the README shows it; ``VEC`` is a ``d_model`` float vector."""

    INTEGER = "INTEGER"
    TINYINT = "TINYINT"
    VARCHAR = "VARCHAR"
    BOOLEAN = "BOOLEAN"
    FLOAT = "FLOAT"
    DOUBLE = "DOUBLE"
    VEC = "FLOAT[D]"  # D = d_model

    def arrow(self, d_model: int) -> pa.DataType:
        """The Arrow type (VEC: fixed-size list of ``d_model`` float32)."""
        if self is SqlType.VEC:
            return pa.list_(pa.float32(), d_model)
        return _ARROW[self]

    def polars(self, d_model: int) -> pl.DataType:
        """The Polars type (VEC: ``Array(Float32, d_model)``)."""
        if self is SqlType.VEC:
            return pl.Array(pl.Float32, d_model)
        return _POLARS[self]


T = SqlType  # short alias for declarations: Column("word", T.VARCHAR, "the word")

_ARROW: dict[SqlType, pa.DataType] = {
    T.INTEGER: pa.int32(), T.TINYINT: pa.int8(), T.VARCHAR: pa.string(), T.BOOLEAN: pa.bool_(),
    T.FLOAT: pa.float32(), T.DOUBLE: pa.float64(),
}
_POLARS: dict[SqlType, pl.DataType] = {
    T.INTEGER: pl.Int32(), T.TINYINT: pl.Int8(), T.VARCHAR: pl.String(), T.BOOLEAN: pl.Boolean(),
    T.FLOAT: pl.Float32(), T.DOUBLE: pl.Float64(),
}


@dataclass(frozen=True)
class Column:
    """One column of a view: its name, its type, and what it means (the README's words)."""

    name: str
    type: SqlType
    doc: str

    def __post_init__(self) -> None:
        if not isinstance(self.type, SqlType):
            raise TypeError(f"column {self.name}: type must be a query.columns.SqlType (T.INTEGER, ...), "
                            f"got {self.type!r}")
        if not self.name.isidentifier() or not self.doc:
            raise ValueError(f"column {self.name!r}: needs an identifier name and a doc")

    def doc_as(self, doc: str) -> Column:
        """The same column with another description (one view's wording of a shared column)."""
        return replace(self, doc=doc)


def vec(doc: str) -> Column:
    """The ``vec`` column of a heavy view: one ``d_model`` vector per row."""
    return Column("vec", T.VEC, doc)


ROLE_NAMES = {int(r): r.name.lower() for r in Role}  # the values of a role column, by name

# -- columns shared across views ---------------------------------------------------------------
PROMPT = Column("prompt", T.INTEGER, "prompt index")
BOUNDARY = Column("boundary", T.INTEGER, "residual boundary (0 = embeddings, l = input of block l, L = last output)")
RESID_LAYER = Column("layer", T.INTEGER, "residual after block `layer` (= boundary - 1; -1 = embeddings)")
BLOCK = Column("layer", T.INTEGER, "block index")
HEAD = Column("head", T.INTEGER, "query head")
POSITION = Column("position", T.INTEGER, "token position")
ROLE = Column("role", T.TINYINT, "role of the position")
TOKEN_ID = Column("token_id", T.INTEGER, "token id")
TOKEN_TEXT = Column("token_text", T.VARCHAR, "token text")
K = Column("k", T.INTEGER, "rank within the top-k (0 = top-1)")
QUERY_POS = Column("query_pos", T.INTEGER, "query position")
KEY_POS = Column("key_pos", T.INTEGER, "key position")
QUERY_ROLE = Column("query_role", T.TINYINT, "role of the query position (4 = last)")
KEY_ROLE = Column("key_role", T.TINYINT, "role of the key position (0 = first)")
WORD = Column("word", T.VARCHAR, "the word")
INVARIANT_CHECK = (  # the numbers of a validation row (the validation views)
    Column("max_abs_err", T.DOUBLE, "largest absolute error"),
    Column("rel_err", T.DOUBLE, "max_abs_err / max(1, max |reference|)"),
    Column("tolerance", T.DOUBLE, "allowed rel_err"),
    Column("passed", T.BOOLEAN, "rel_err <= tolerance"),
)
