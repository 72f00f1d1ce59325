"""Which views a statement reads, and which integer predicates can narrow what is loaded.

Heavy views (residuals, head outputs, attention) are too big to materialise whole for every
query, and their HDF5 chunks hold one layer each, so a query that names one layer should read
one chunk per prompt. We walk DuckDB's own parse tree (``json_serialize_sql``) rather than
pattern-matching text, and only ever *narrow* what is loaded with predicates that the query
itself applies to that table reference; the query still runs every predicate, so anything we
do not understand costs time, never correctness.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np

# A predicate on one integer column: (operator, operand(s)).
Pred = tuple[str, Any]

_CMP = {
    "COMPARE_EQUAL": "=",
    "COMPARE_LESSTHAN": "<",
    "COMPARE_LESSTHANOREQUALTO": "<=",
    "COMPARE_GREATERTHAN": ">",
    "COMPARE_GREATERTHANOREQUALTO": ">=",
}
_FLIP = {"=": "=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


@dataclass
class TableRef:
    """One reference to a view in a statement, with the predicates that filter it."""

    name: str
    preds: dict[str, list[Pred]] = field(default_factory=dict)  # column -> ANDed predicates
    schema_only: bool = False  # DESCRIBE: the columns matter, the rows do not


@dataclass
class Parsed:
    """The outcome of reading a statement's parse tree."""

    refs: list[TableRef]
    ok: bool  # False: the tree was unavailable; refs come from a conservative text scan


def eval_preds(preds: list[Pred], values: np.ndarray) -> np.ndarray:
    """Mask of ``values`` that satisfy every predicate."""
    mask = np.ones(values.shape, dtype=bool)
    for op, v in preds:
        if op == "=":
            mask &= values == v
        elif op == "in":
            mask &= np.isin(values, list(v))
        elif op == "<":
            mask &= values < v
        elif op == "<=":
            mask &= values <= v
        elif op == ">":
            mask &= values > v
        elif op == ">=":
            mask &= values >= v
        elif op == "between":
            mask &= (values >= v[0]) & (values <= v[1])
    return mask


def _const(node: Any, params: Mapping[str, Any]) -> int | None:
    """The integer value of a constant (or bound parameter) expression, else None."""
    if not isinstance(node, dict):
        return None
    cls = node.get("class")
    if cls == "CONSTANT":
        lit = node.get("literal") or node.get("value") or {}
        text = lit.get("text") if isinstance(lit, dict) else None
        if text is None and isinstance(lit, dict) and "value" in lit:
            text = lit["value"]
        try:
            return int(str(text))
        except (TypeError, ValueError):
            return None
    if cls == "PARAMETER":
        v = params.get(str(node.get("identifier")))
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    if cls == "CAST":
        return _const(node.get("child"), params)
    if cls == "FUNCTION" and str(node.get("function_name")).lower() == "coalesce":
        for c in node.get("children", []):  # coalesce($layer, 0): the first bound value
            v = _const(c, params)
            if v is not None:
                return v
            inner = c.get("child") if isinstance(c, dict) and c.get("class") == "CAST" else c
            if not (isinstance(inner, dict) and inner.get("class") == "PARAMETER"):
                return None  # a column or expression: its value is not known here
        return None
    if cls == "OPERATOR" and node.get("type") == "OPERATOR_COALESCE":
        return _const({"class": "FUNCTION", "function_name": "coalesce", "children": node.get("children", [])}, params)
    if cls == "FUNCTION" and node.get("function_name") == "-" and len(node.get("children", [])) == 1:
        v = _const(node["children"][0], params)
        return -v if v is not None else None
    return None


def _colref(node: Any) -> list[str] | None:
    if isinstance(node, dict) and node.get("class") == "COLUMN_REF":
        return [str(c) for c in node.get("column_names", [])]
    return None


def _conjuncts(expr: Any) -> Iterator[dict]:
    if not isinstance(expr, dict):
        return
    if expr.get("class") == "CONJUNCTION" and expr.get("type") == "CONJUNCTION_AND":
        for c in expr.get("children", []):
            yield from _conjuncts(c)
    else:
        yield expr


def _predicate(expr: dict, params: Mapping[str, Any]) -> tuple[list[str], Pred] | None:
    """(column reference, predicate) for ``col OP const``, ``col IN (...)``, BETWEEN."""
    cls, typ = expr.get("class"), expr.get("type")
    if cls == "COMPARISON" and typ in _CMP:
        op = _CMP[typ]
        col, val = _colref(expr.get("left")), _const(expr.get("right"), params)
        if col is None:
            col, val, op = _colref(expr.get("right")), _const(expr.get("left"), params), _FLIP[op]
        if col is not None and val is not None:
            return col, (op, val)
    elif cls == "OPERATOR" and typ == "COMPARE_IN":
        ch = expr.get("children", [])
        col = _colref(ch[0]) if ch else None
        vals = [_const(c, params) for c in ch[1:]]
        if col is not None and vals and all(v is not None for v in vals):
            return col, ("in", frozenset(vals))
    elif cls == "BETWEEN":
        col = _colref(expr.get("input"))
        lo, hi = _const(expr.get("lower"), params), _const(expr.get("upper"), params)
        if col is not None and lo is not None and hi is not None:
            return col, ("between", (lo, hi))
    return None


def _from_refs(node: Any, inner_conds: list[Any], out: list[dict]) -> bool:
    """Base tables directly in a FROM clause; False if it holds something with unknown columns."""
    if not isinstance(node, dict):
        return True
    t = node.get("type")
    if t == "BASE_TABLE":
        out.append(node)
        return True
    if t == "JOIN":
        known = _from_refs(node.get("left"), inner_conds, out)
        known &= _from_refs(node.get("right"), inner_conds, out)
        if node.get("join_type") == "INNER" and node.get("condition") is not None:
            inner_conds.append(node["condition"])
        return known and not node.get("using_columns")
    return t == "EMPTY"


class _Walker:
    def __init__(self, columns: Mapping[str, tuple[str, ...]], pushable: Mapping[str, set[str]],
                 params: Mapping[str, Any]) -> None:
        self.columns = columns  # view -> column names (known views)
        self.pushable = pushable  # heavy view -> columns we can narrow on
        self.params = params
        self.refs: dict[int, TableRef] = {}

    def walk(self, o: Any, schema_only: bool = False) -> None:
        if isinstance(o, list):
            for x in o:
                self.walk(x, schema_only)
            return
        if not isinstance(o, dict):
            return
        if o.get("type") == "SHOW_REF":
            schema_only = o.get("show_type") == "DESCRIBE"
        if o.get("type") == "BASE_TABLE" and id(o) not in self.refs:
            name = str(o.get("table_name", "")).lower()
            if name:
                self.refs[id(o)] = TableRef(name, schema_only=schema_only)
        if o.get("type") == "SELECT_NODE":
            self._select(o, schema_only)
        for v in o.values():
            self.walk(v, schema_only)

    def _select(self, node: dict, schema_only: bool) -> None:
        tables: list[dict] = []
        conds: list[Any] = []
        known = _from_refs(node.get("from_table"), conds, tables)
        conds.append(node.get("where_clause"))
        for t in tables:  # register refs first so walk() keeps these objects
            name = str(t.get("table_name", "")).lower()
            self.refs.setdefault(id(t), TableRef(name, schema_only=schema_only))
        for cond in conds:
            for expr in _conjuncts(cond):
                got = _predicate(expr, self.params)
                if got is None:
                    continue
                col, pred = got
                owner = self._owner(col, tables, known)
                if owner is not None:
                    target, column = owner
                    self.refs[id(target)].preds.setdefault(column, []).append(pred)

    def _visible(self, t: dict) -> dict[str, str] | None:
        """Column names a table reference exposes -> the view's own column (None: unknown).

        ``FROM resid r(p, layer)`` renames the view's first columns by position: there ``layer``
        is the view's ``boundary``, and a predicate on it must narrow ``boundary``.
        """
        cols = self.columns.get(str(t.get("table_name", "")).lower())
        if cols is None:
            return None
        aliases = [str(a).lower() for a in (t.get("column_name_alias") or [])]
        if len(aliases) > len(cols):
            return None
        names = aliases + list(cols[len(aliases):])
        return dict(zip(names, cols, strict=True))

    def _owner(self, col: list[str], tables: list[dict], known: bool) -> tuple[dict, str] | None:
        """The heavy table reference a column belongs to and the view column it is, if unambiguous."""
        name = col[-1].lower()
        if len(col) == 2:
            q = col[0].lower()
            hits = [t for t in tables if (t.get("alias") or t.get("table_name", "")).lower() == q]
        elif len(col) == 1:
            if not known:
                return None
            visible = [self._visible(t) for t in tables]
            if any(v is None for v in visible):
                return None  # a table with columns we do not know could own it
            hits = [t for t, v in zip(tables, visible, strict=True) if v is not None and name in v]
        else:
            return None
        if len(hits) != 1:
            return None
        visible_cols = self._visible(hits[0])
        if visible_cols is None or name not in visible_cols:
            return None
        column = visible_cols[name]
        tname = str(hits[0].get("table_name", "")).lower()
        return (hits[0], column) if column in self.pushable.get(tname, set()) else None


def parse(con: duckdb.DuckDBPyConnection, sql: str, views: Mapping[str, tuple[str, ...]],
          pushable: Mapping[str, set[str]], params: Mapping[str, Any] | None = None) -> Parsed:
    """Table references of one statement with their narrowing predicates."""
    try:
        raw = con.execute("SELECT json_serialize_sql($1::VARCHAR)", [sql]).fetchall()[0][0]
        tree = json.loads(raw)
    except (duckdb.Error, json.JSONDecodeError, IndexError):
        tree = {"error": True}
    if tree.get("error"):
        # Not a plain SELECT (EXPLAIN, PRAGMA ...): every view named anywhere, unnarrowed.
        words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sql)}
        return Parsed([TableRef(v) for v in views if v in words], ok=False)
    w = _Walker(views, pushable, params or {})
    w.walk(tree.get("statements", []))
    return Parsed(list(w.refs.values()), ok=True)
