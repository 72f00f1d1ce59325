"""The warehouse as Parquet, for engines that scan it at scale (DuckDB, Polars, Spark, Trino).

Layout of an export directory (hive partitioning by template)::

    DIR/export.json                          what this is: views, columns, d_model, templates
    DIR/manifest.json                        the warehouse's manifest, unchanged
    DIR/<view>/template_index=<t>/part-00000.parquet   views with a prompt column
    DIR/<view>/part-00000.parquet            views without one (manifest, heads, vocab)

Every view is exported with the columns and types ``Warehouse`` gives it: scalar columns as
plain Parquet columns, vectors (FLOAT[D]) as fixed-size lists of D float32. The partition
column ``template_index`` is in the directory names, not in the files (the ``prompts`` view's
own ``template_index`` column comes back from the partition when read with hive partitioning).

The export is streamed prompt by prompt: per (view, template) one open Parquet writer holding
at most ``ROW_GROUP_BYTES`` of rows, so memory does not grow with the number of prompts. It is
written under ``DIR.partial`` and renamed to DIR when complete, so DIR is whole or absent.

``Warehouse(DIR)`` recognises an export (``export.json``) and registers each view over its
Parquet files (``ParquetExport.source``): every named analysis runs on either form.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from query.errors import QueryError
from query.heavy import HeavyReader
from query.light import LIGHT, ablation_shard_columns, table
from query.shards import Shards
from query.views import VIEWS, View, arrow_schema, polars_schema
from store.schema import ABLATION_DIR
from store.shard import fsync_dir

EXPORT_FILE = "export.json"
EXPORT_KIND = "echo-warehouse-parquet"
EXPORT_VERSION = 1
PARTITION = "template_index"
ROW_GROUP_BYTES = 16 * 2**20  # rows buffered per (view, template) before a Parquet row group is written
PART_NAME = "part-00000.parquet"


def is_export(path: Path) -> bool:
    return (Path(path) / EXPORT_FILE).is_file()


def partitioned(view: View) -> bool:
    return "prompt" in view.names


def file_schema(view: View, d_model: int) -> pa.Schema:
    """The columns stored in the view's Parquet files (the partition column is in the path)."""
    schema = arrow_schema(view, d_model)
    if partitioned(view) and PARTITION in schema.names:
        schema = schema.remove(schema.get_field_index(PARTITION))
    return schema


@dataclass
class ExportSummary:
    """What an export wrote."""

    path: str
    n_prompts: int
    rows: dict[str, int]
    bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 2**20 / max(self.seconds, 1e-9)


@dataclass
class _Part:
    """One Parquet file, written a row group at a time."""

    path: Path
    schema: pa.Schema
    buffered: list[pa.Table] = field(default_factory=list)
    nbytes: int = 0
    rows: int = 0

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")

    def add(self, t: pa.Table) -> None:
        if t.num_rows == 0:
            return
        self.buffered.append(t.select(self.schema.names).cast(self.schema))
        self.nbytes += t.nbytes
        self.rows += t.num_rows
        if self.nbytes >= ROW_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.buffered:
            self.writer.write_table(pa.concat_tables(self.buffered))
        self.buffered, self.nbytes = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def check_destination(dest: Path, warehouse: Path) -> None:
    """One-line refusals: an existing DIR, or one inside the warehouse."""
    d, w = dest.expanduser().resolve(), warehouse.expanduser().resolve()
    if d == w or w in d.parents:
        raise QueryError(f"refusing to write the export {dest} inside the warehouse {warehouse} "
                         "(warehouses are read-only after extraction); choose a directory outside it")
    if dest.exists():
        raise QueryError(f"{dest} already exists; the export writes a new directory (remove it or choose another)")


def export_parquet(warehouse: Path, dest: Path, progress: bool = True) -> ExportSummary:
    """Write every view of ``warehouse`` as Parquet under ``dest`` (see the module docstring)."""
    from query.warehouse import Warehouse

    warehouse, dest = Path(warehouse), Path(dest)
    if is_export(warehouse):
        raise QueryError(f"{warehouse} is already a Parquet export; give the HDF5 warehouse with -w")
    check_destination(dest, warehouse)
    t0 = time.perf_counter()
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by a killed export: never complete
    partial.mkdir(parents=True)
    try:
        with Warehouse(warehouse) as wh:
            rows = _write(wh, partial, progress)
            n_prompts = len(wh.shards.prompts)
        size = sum(p.stat().st_size for p in partial.rglob("*.parquet"))
        os.replace(partial, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ExportSummary(str(dest), n_prompts, rows, size, time.perf_counter() - t0)


def _write(wh: Any, out: Path, progress: bool) -> dict[str, int]:
    s: Shards = wh.shards
    d = s.d_model
    manifest = s.r.manifest
    s.vocab()  # loaded once, shared by the per-prompt copies below
    prompts = s.prompts.tolist()
    have = set(prompts)
    ablated = set(s.r.ablation_indices())
    tpl = _templates(s, sorted(set(prompts) | ablated))
    templates = sorted(set(tpl.values()) | set(range(len(manifest.get("templates", [])))))
    per_prompt = [v for v in VIEWS if partitioned(v) and not v.sql]
    parts = {(v.name, t): _Part(out / v.name / f"{PARTITION}={t}" / PART_NAME, file_schema(v, d))
             for v in VIEWS if partitioned(v) for t in templates}
    heavy = {v.name: HeavyReader(s, v) for v in per_prompt if v.heavy is not None}
    try:
        for p in tqdm(sorted(tpl), desc="export", unit="prompt", disable=not progress, file=sys.stderr):
            for v in per_prompt:
                parts[(v.name, tpl[p])].add(_prompt_rows(s, v, p, heavy.get(v.name), p in ablated, p in have))
        for v in VIEWS:
            if v.sql and partitioned(v):  # derived, per prompt: computed by its SQL, split by template
                df = wh.sql(f"SELECT * FROM {v.name}")
                for t in templates:
                    sel = df.filter(pl.col("prompt").is_in([p for p, x in tpl.items() if x == t]))
                    parts[(v.name, t)].add(sel.to_arrow())
            elif not partitioned(v):  # light, or derived without a prompt column (circuit_edges): whole
                whole = _Part(out / v.name / PART_NAME, file_schema(v, d))
                whole.add(wh.sql(f"SELECT * FROM {v.name}").to_arrow() if v.sql else LIGHT[v.name](s))
                whole.close()
                parts[(v.name, -1)] = whole
    finally:
        for part in parts.values():
            part.close()
    rows: dict[str, int] = {}
    for (name, _), part in parts.items():
        rows[name] = rows.get(name, 0) + part.rows
    shutil.copyfile(s.r.root / "manifest.json", out / "manifest.json")
    meta = {
        "kind": EXPORT_KIND, "version": EXPORT_VERSION, "d_model": d, "partition": PARTITION,
        "templates": templates, "prompts": sorted(tpl), "source": str(s.r.root.resolve()),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "views": {v.name: {"partitioned": partitioned(v), "rows": rows[v.name],
                           "columns": [[c.name, c.type] for c in v.columns]} for v in VIEWS},
    }
    (out / EXPORT_FILE).write_text(json.dumps(meta, indent=2))
    return rows


def _templates(s: Shards, prompts: list[int]) -> dict[int, int]:
    """Template index of each prompt: from the manifest's prompt list, else the shard."""
    known = {int(e["index"]): int(e["template_index"]) for e in s.r.manifest.get("prompts", [])
             if "index" in e and "template_index" in e}
    out = {}
    for p in prompts:
        if p not in known:
            with s.reading(p):
                known[p] = int(s.r.prompt_attrs(p)["template_index"])
        out[p] = known[p]
    return out


def _prompt_rows(s: Shards, v: View, p: int, heavy: HeavyReader | None, ablated: bool,
                 has_shard: bool) -> pa.Table:
    """One prompt's rows of view ``v``, in the warehouse's own types."""
    schema = arrow_schema(v, s.d_model)
    if v.name in ("ablation", "ablation_topk"):
        if not ablated:
            return schema.empty_table()
        with s.reading(p, ABLATION_DIR):  # a damaged ablation shard is named, not the prompt's
            return table(v, s.d_model, ablation_shard_columns(s, p, v.name == "ablation_topk"))
    if not has_shard:
        return schema.empty_table()
    if heavy is not None:
        frames = list(heavy.batches(None, pl.col("prompt") == p))
        return pl.concat(frames).to_arrow().cast(schema) if frames else schema.empty_table()
    one = copy.copy(s)
    one.prompts = np.array([p], dtype=np.int64)
    one._roles = {}
    return LIGHT[v.name](one)


class ParquetExport:
    """An export directory opened for ``Warehouse``: each view a Polars scan of its files."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / EXPORT_FILE).read_text())
        except (OSError, ValueError) as e:
            raise QueryError(f"{self.path / EXPORT_FILE} is unreadable ({e})") from None
        if self.meta.get("kind") != EXPORT_KIND or self.meta.get("version") != EXPORT_VERSION:
            raise QueryError(f"{self.path} is not an echo-warehouse Parquet export of version {EXPORT_VERSION}")
        self.d_model = int(self.meta["d_model"])
        self.manifest = json.loads((self.path / "manifest.json").read_text())

    def source(self, view: View) -> pl.LazyFrame:
        """The view as a lazy scan (DuckDB pushes filters and projections into it)."""
        folder = self.path / view.name
        if not folder.is_dir():
            raise QueryError(f"{self.path} has no {view.name}/ folder: an incomplete export")
        schema = polars_schema(view, self.d_model)
        if partitioned(view):
            lf = pl.scan_parquet(str(folder / f"{PARTITION}=*" / "*.parquet"), hive_partitioning=True)
        else:
            lf = pl.scan_parquet(str(folder / "*.parquet"))
        return lf.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])
