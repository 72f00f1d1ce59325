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

Integrity: every Parquet page carries a CRC32 checksum (``write_page_checksum``), and the
SHA-256 of every file is written to ``export.sha256`` (``sha256sum`` format) before DIR.partial
is renamed to DIR, so a published export always has its ledger.

Reading (``Warehouse(DIR)``, ``echowh verify -w DIR``) is ``query.export_read``; this module
only writes (it opens the warehouse with ``query.warehouse``, which imports only the reader).
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
from query.export_read import (
    EXPORT_FILE,
    EXPORT_KIND,
    EXPORT_LEDGER,
    EXPORT_VERSION,
    PART_NAME,
    PARTITION,
    ParquetExport,
    file_schema,
    is_export,
    partitioned,
)
from query.heavy import HeavyReader
from query.light import LIGHT, ablation_shard_columns, table
from query.shards import Shards
from query.views import VIEWS, View, arrow_schema
from query.warehouse import Warehouse
from store.ledger import sha256_file
from store.schema import ABLATION_DIR
from store.shard import fsync_dir

__all__ = ["EXPORT_FILE", "ExportSummary", "ParquetExport", "check_destination", "export_parquet", "is_export"]

ROW_GROUP_BYTES = 16 * 2**20  # rows buffered per (view, template) before a Parquet row group is written


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
        self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd", write_page_checksum=True)

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
        _write_ledger(partial)
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


def _write_ledger(out: Path) -> None:
    """SHA-256 of every file of the export, durable before the export is renamed into place."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    lines = "".join(f"{sha256_file(p)}  {p.relative_to(out).as_posix()}\n" for p in files)
    with open(out / EXPORT_LEDGER, "w") as fh:
        fh.write(lines)
        fh.flush()
        os.fsync(fh.fileno())
    for folder in {p.parent for p in files} | {out}:
        fsync_dir(folder)


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
