"""One reader for every heavy view, driven by the view's declared dataset axes.

DuckDB's optimizer hands the scan of a heavy view a Polars predicate (the filters it pushed
down, already resolved through aliases, renamed columns, views and ``query_table``) and the
columns it needs. We never look at SQL. For each prompt shard:

1. the AND-ed parts of the predicate that only mention the small index columns (prompt,
   layer/boundary, position/role, head, query_pos/query_role) are evaluated on the index grid
   of the dataset's leading axes: that is the set of slices that can hold a selected row;
2. those slices are read from HDF5, one read per run of layers (= chunks) with the same
   inner selection, and expanded to rows (a superset of the selected rows);
3. the **whole** predicate is applied with Polars to those rows, so the batch holds exactly
   the rows asked for. This step is required: DuckDB does not re-check a filter it pushed
   into the source, so skipping it would return extra rows.

A predicate part we cannot evaluate on the index only costs reads, never rows: it is left to
step 3. The value column (vec / weight) is read only when DuckDB asks for it, so
``count(*)`` reads no vectors at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np
import polars as pl
import pyarrow as pa

from query.shards import Shards
from query.views import View, arrow_schema, polars_schema


def conjuncts(expr: pl.Expr) -> list[pl.Expr]:
    """The AND-ed parts of a Polars expression (the expression itself when it is no AND).

    Reads only the top node of Polars' own serialised expression tree; a format we do not
    recognise means "no AND", which narrows less and is never wrong.
    """
    try:
        node = json.loads(expr.meta.serialize(format="json"))
    except Exception:  # noqa: BLE001 - any failure: treat as one opaque part
        return [expr]
    if isinstance(node, dict) and isinstance(node.get("BinaryExpr"), dict) and node["BinaryExpr"].get("op") == "And":
        return [c for part in expr.meta.pop() for c in conjuncts(part)]
    return [expr]


def _and(parts: list[pl.Expr]) -> pl.Expr | None:
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique indices as [start, stop) runs of consecutive values."""
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [idx.size - 1]])
    return [(int(idx[s]), int(idx[e]) + 1) for s, e in zip(starts, ends, strict=True)]


class HeavyReader:
    """Reads one heavy view: exactly the rows a pushed-down predicate selects, or all of them."""

    def __init__(self, shards: Shards, view: View) -> None:
        assert view.heavy is not None
        self.s = shards
        self.view = view
        self.spec = view.heavy
        self.schema = polars_schema(view, shards.d_model)
        self.index = set(self.spec.index_columns)
        n_narrow = sum(a.narrows for a in self.spec.axes)
        assert all(a.narrows for a in self.spec.axes[:n_narrow]), "axes read whole come last"
        self.n_narrow = n_narrow

    # -- the source callback -------------------------------------------------------------------
    def batches(self, columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None = None,
                narrow: bool = True) -> Iterator[pl.DataFrame]:
        """The view's rows that satisfy ``predicate``, projected to ``columns``, one frame per prompt."""
        cols = list(self.schema.names()) if columns is None else list(columns)
        parts = conjuncts(predicate) if predicate is not None and narrow else []
        index_parts = [c for c in parts if set(c.meta.root_names()) <= self.index]
        prompt_pred = _and([c for c in index_parts if set(c.meta.root_names()) <= {"prompt"}])
        index_pred = _and(index_parts)
        wanted = set(cols) | (set(predicate.meta.root_names()) if predicate is not None else set())
        need_value = self.spec.value in wanted
        left = n_rows
        for p in self._prompts(prompt_pred):
            with self.s.reading(p):
                df = self._prompt_rows(p, index_pred, need_value)
            if df is None or df.height == 0:
                continue
            if predicate is not None:
                df = df.filter(predicate)
            df = df.select(cols)
            if left is not None:
                df = df.head(left)
                left -= df.height
            if df.height:
                yield df
            if left is not None and left <= 0:
                return

    def whole(self) -> pa.Table:
        """Every row of the view, read without narrowing (the reference for narrowed reads)."""
        frames = list(self.batches(None, None, narrow=False))
        schema = arrow_schema(self.view, self.s.d_model)
        if not frames:
            return schema.empty_table()
        return pl.concat(frames).to_arrow().cast(schema)

    # -- per prompt -----------------------------------------------------------------------------
    def _prompts(self, prompt_pred: pl.Expr | None) -> list[int]:
        prompts = self.s.prompts
        if prompt_pred is None:
            return prompts.tolist()
        frame = pl.DataFrame({"prompt": prompts}, schema={"prompt": pl.Int32})
        try:
            return frame.filter(prompt_pred)["prompt"].to_list()
        except pl.exceptions.PolarsError:
            return prompts.tolist()

    def _index_frame(self, p: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Index columns of every element of the dataset's narrowing axes, flattened (C order)."""
        grid = [g.reshape(-1) for g in np.indices(shape[: self.n_narrow])]
        return self._columns(p, grid, self.spec.axes[: self.n_narrow])

    def _columns(self, p: int, grid: list[np.ndarray], axes: tuple) -> dict[str, np.ndarray]:
        n = grid[0].size if grid else 0
        out: dict[str, np.ndarray] = {"prompt": np.full(n, p, dtype=np.int32)}
        roles = self.s.roles(p) if any(a.role for a in axes) else None
        for a, g in zip(axes, grid, strict=True):
            out[a.column] = g.astype(np.int32)
            if a.minus_one:
                out[a.minus_one] = (g - 1).astype(np.int32)
            if a.role and roles is not None:
                out[a.role] = roles[g]
        return out

    def _frame(self, cols: dict[str, Any]) -> pl.DataFrame:
        return pl.DataFrame({k: pl.Series(k, v, dtype=self.schema[k]) for k, v in cols.items()})

    def _prompt_rows(self, p: int, index_pred: pl.Expr | None, need_value: bool) -> pl.DataFrame | None:
        f = self.s.r.shard(p)
        name = self.spec.field.name
        if name not in f:
            if self.spec.optional:
                return None
            raise KeyError(f"dataset {name!r} missing")
        ds = f[name]
        n_axes = len(self.spec.axes)
        shape = tuple(int(x) for x in ds.shape[:n_axes])
        sel = self._index_frame(p, shape)
        if index_pred is not None:
            try:
                rows = self._frame(sel).with_row_index("__row").filter(index_pred)["__row"].to_numpy()
                sel = {k: v[rows] for k, v in sel.items()}
            except pl.exceptions.PolarsError:
                pass  # evaluated on the whole batch below instead
        first = sel[self.spec.axes[0].column]
        if first.size == 0:
            return None
        inner_cols = [a.column for a in self.spec.axes[1: self.n_narrow]]
        frames = [self._block(p, ds, shape, lo, hi, boxes, need_value)
                  for lo, hi, boxes in self._blocks(first, [sel[c] for c in inner_cols])]
        return pl.concat(frames) if len(frames) > 1 else frames[0]

    @staticmethod
    def _blocks(first: np.ndarray, inner: list[np.ndarray]) -> list[tuple[int, int, list[np.ndarray]]]:
        """Runs of consecutive first-axis values (chunks) that share their inner selection."""
        out: list[tuple[int, int, list[np.ndarray]]] = []
        for v in np.unique(first):
            m = first == v
            boxes = [np.unique(x[m]) for x in inner]
            if out and out[-1][1] == v and all(np.array_equal(a, b) for a, b in zip(out[-1][2], boxes, strict=True)):
                out[-1] = (out[-1][0], int(v) + 1, boxes)
            else:
                out.append((int(v), int(v) + 1, boxes))
        return out

    def _block(self, p: int, ds: h5py.Dataset, shape: tuple[int, ...], lo: int, hi: int,
               boxes: list[np.ndarray], need_value: bool) -> pl.DataFrame:
        """Rows of one hyperslab: first axis lo:hi, the inner narrowing axes at ``boxes``, the rest whole."""
        axes = self.spec.axes
        idx = [np.arange(lo, hi), *boxes, *(np.arange(shape[i]) for i in range(self.n_narrow, len(axes)))]
        block_shape = tuple(x.size for x in idx)
        grid = [ix[g.reshape(-1)] for ix, g in zip(idx, np.indices(block_shape), strict=True)]
        cols: dict[str, Any] = self._columns(p, grid, axes)
        keep = None
        if self.spec.causal:
            q, k = self.spec.causal
            keep = cols[k] <= cols[q]
            cols = {c: v[keep] for c, v in cols.items()}
        if need_value:
            data = self._read(ds, lo, hi, boxes)  # (*block_shape[, D])
            flat = data.reshape(int(np.prod(block_shape)), *data.shape[len(block_shape):])
            cols[self.spec.value] = flat if keep is None else flat[keep]
        return self._frame(cols)

    def _read(self, ds: h5py.Dataset, lo: int, hi: int, boxes: list[np.ndarray]) -> np.ndarray:
        """``ds[lo:hi, boxes...]``: h5py takes one index list per read, so further lists are read
        as their bounding slice and taken in numpy."""
        sel: list[Any] = [slice(lo, hi)]
        after: list[tuple[int, np.ndarray]] = []
        has_list = False
        for ax, box in enumerate(boxes, start=1):
            runs = _runs(box)
            if box.size == ds.shape[ax]:
                sel.append(slice(None))
            elif len(runs) == 1:
                sel.append(slice(*runs[0]))
            elif not has_list:
                sel.append(box.tolist())
                has_list = True
            else:
                start = int(box[0])
                sel.append(slice(start, int(box[-1]) + 1))
                after.append((ax, box - start))
        out = self.s.read_counted(ds, tuple(sel))
        for ax, rel in after:
            out = np.take(out, rel, axis=ax)
        return out
