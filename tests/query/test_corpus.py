"""Differential query corpus: every statement gives the same answer in three forms: with
narrowed reads (DuckDB pushes its filters into the heavy views), with every heavy view read
whole and filtered by DuckDB itself (``Warehouse(pushdown=False)``, the reference), and with
every heavy view wrapped in a ``LIMIT`` subquery, which DuckDB cannot push a filter through
(:class:`Limited`); the issue's two reproductions also give their true answers, counted
straight from the HDF5 files."""

from __future__ import annotations

import math
import re
from typing import Any

import h5py
import numpy as np
import pytest

from query import QueryError, Warehouse
from store.schema import PROMPTS_DIR, prompt_shard_name
from tests.query.conftest import D, L, T
from tests.query.corpus import generated, hand_written

HAND = hand_written()
GENERATED = generated()
_ORDERED = re.compile(r"ORDER BY [^()]*$", re.IGNORECASE | re.S)


def _canon(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else float(f"{v:.5g}")
    if isinstance(v, list | tuple):
        return tuple(_canon(x) for x in v)
    return v


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _run(wh: Warehouse, sql: str) -> tuple[str, Any]:
    try:
        df = wh.sql(sql)
    except QueryError as e:
        return "error", str(e)
    return "rows", (df.columns, df.rows())


def _same(sql: str, got: tuple[str, Any], ref: tuple[str, Any]) -> bool:
    if got[0] != ref[0] or got[0] == "error":
        return got == ref
    (cols_a, rows_a), (cols_b, rows_b) = got[1], ref[1]
    if cols_a != cols_b or len(rows_a) != len(rows_b):
        return False
    if not _ORDERED.search(sql):
        key = lambda r: repr(_canon(r))  # noqa: E731 - order-insensitive comparison
        rows_a, rows_b = sorted(rows_a, key=key), sorted(rows_b, key=key)
    return all(_close(a, b) for a, b in zip(rows_a, rows_b, strict=True))


EVERY_ROW = 2**62  # a LIMIT that keeps every row but stops DuckDB pushing filters into the scan


class Limited(Warehouse):
    """Each heavy view is ``SELECT * FROM <source> LIMIT 2^62``: DuckDB cannot push a filter
    through a LIMIT, so the source gets none and DuckDB filters above it."""

    def _register(self, view, source) -> None:
        if view.heavy is None:
            return super()._register(view, source)
        self.con.register(f"_whole_{view.name}", source)
        self.con.execute(f"CREATE VIEW {view.name} AS SELECT * FROM _whole_{view.name} LIMIT {EVERY_ROW}")


@pytest.fixture(scope="module")
def pair(built_all):
    root, _ = built_all
    with (Warehouse(root, threads=1) as narrowed, Warehouse(root, threads=1, pushdown=False) as whole,
          Limited(root, threads=1) as limited):
        yield narrowed, whole, limited


def test_the_limit_form_pushes_no_filter(pair) -> None:
    """The third form is not the first again: its source gets no filter and reads every slice."""
    narrowed, _, limited = pair
    sql = "SELECT sum(list_sum(vec)) AS s FROM resid WHERE layer = 1 AND prompt = 2"
    n0, l0 = narrowed.bytes_read, limited.bytes_read
    assert math.isclose(narrowed.sql(sql)["s"][0], limited.sql(sql)["s"][0], rel_tol=1e-6)
    assert narrowed.bytes_read - n0 == T * D * 4  # one (prompt, boundary) slice of float32
    assert limited.bytes_read - l0 == 4 * (L + 1) * T * D * 4  # every prompt, every boundary


def _differential(pair, corpus: list[str]) -> list[tuple[str, Any]]:
    narrowed, whole, limited = pair
    results, failures = [], []
    for sql in corpus:
        got, ref, lim = _run(narrowed, sql), _run(whole, sql), _run(limited, sql)
        if not _same(sql, got, ref):
            failures.append(f"{sql}\n  narrowed: {str(got)[:300]}\n  whole:    {str(ref)[:300]}")
        if not _same(sql, lim, ref):
            failures.append(f"{sql}\n  LIMIT form: {str(lim)[:300]}\n  whole:      {str(ref)[:300]}")
        results.append(ref)
    assert not failures, f"{len(failures)} of {len(corpus)} statements differ:\n" + "\n".join(failures[:10])
    return results


def _informative(results: list[tuple[str, Any]]) -> float:
    """Share of statements that ran and returned something other than nothing/zero."""
    def useful(r: tuple[str, Any]) -> bool:
        if r[0] != "rows":
            return False
        rows = r[1][1]
        return bool(rows) and any(v not in (0, None, (), []) for row in rows for v in row)
    return sum(map(useful, results)) / len(results)


def test_corpus_is_large_enough() -> None:
    assert len(HAND) >= 70
    assert len(HAND) + len(GENERATED) >= 300
    assert len(set(GENERATED)) > 0.95 * len(GENERATED)


def test_hand_written_corpus(pair) -> None:
    results = _differential(pair, HAND)
    assert all(kind == "rows" for kind, _ in results), [r for r in results if r[0] != "rows"][:3]
    assert _informative(results) > 0.8


def test_generated_corpus(pair) -> None:
    results = _differential(pair, GENERATED)
    assert sum(kind == "error" for kind, _ in results) < 0.05 * len(results)  # errors must agree too
    assert _informative(results) > 0.5


def test_narrowing_reads_less_than_whole_views(built_all) -> None:
    """The differential is not two copies of one path: narrowing reads a fraction of the bytes."""
    root, _ = built_all
    with Warehouse(root) as narrowed, Warehouse(root, pushdown=False) as whole:
        for sql in HAND[:30]:
            narrowed.sql(sql)
            whole.sql(sql)
        assert 0 < narrowed.bytes_read < whole.bytes_read / 2


def _h5_count(root, layer_of: str, value: int) -> int:
    """Rows of resid where ``layer_of`` ('layer' or 'boundary') == value, counted from h5py."""
    n = 0
    for p in range(4):
        with h5py.File(root / PROMPTS_DIR / prompt_shard_name(p), "r", locking=False) as f:
            b, t = f["resid"].shape[:2]
            boundary = np.arange(b)
            axis = boundary - 1 if layer_of == "layer" else boundary
            n += int((axis == value).sum()) * t
    return n


@pytest.mark.parametrize("pushdown", [True, False])
def test_issue_reproductions_give_true_answers(built_all, pushdown: bool) -> None:
    root, _ = built_all
    with Warehouse(root, pushdown=pushdown) as wh:
        # `layer` here is the view's boundary (DuckDB renames the view's own layer to layer_1)
        n = wh.sql("SELECT count(*) AS n FROM resid r(p, layer) WHERE layer = 1")["n"][0]
        assert n == _h5_count(root, "boundary", 1) == 4 * T
        a, b = wh.sql("SELECT (SELECT count(*) FROM resid WHERE layer=1) a, "
                      "(SELECT count(*) FROM query_table('resid')) b").row(0)
        assert a == _h5_count(root, "layer", 1) == 4 * T
        assert b == sum(_h5_count(root, "boundary", x) for x in range(L + 1)) == 4 * (L + 1) * T
