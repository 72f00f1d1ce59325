"""Comparison section "Models compared": one row per warehouse and every invariant of each."""

from __future__ import annotations

import polars as pl

from reports.compare.context import CompareCtx
from reports.model import Section


def sections(ctx: CompareCtx) -> list[Section]:
    models = ctx.c.sql("SELECT model, model_id, model_type, n_layers, n_heads, n_kv_heads, d_model, vocab_size, "
                       "n_prompts, n_ablated FROM models")
    models = ctx.in_order(models)
    val = ctx.in_order(ctx.run("validation_summary"))
    failed = val.filter(pl.col("n_passed") < pl.col("n_prompts"))
    ctx.findings.run.append("Models compared: " + "; ".join(
        f"{r['model']} ({r['model_type']}, {r['n_layers']} layers × {r['n_heads']} heads, d_model {r['d_model']}, "
        f"{r['n_prompts']} prompts)" for r in models.iter_rows(named=True)) + ".")
    if failed.height == 0:
        ctx.findings.run.append(f"Every invariant holds on every prompt of every model (largest relative error "
                                f"{val['max_rel_err'].max():.2g}).")
    else:
        ctx.findings.run.append("Validation FAILED: " + ", ".join(
            f"{r['model']}: {r['invariant']}" for r in failed.iter_rows(named=True)) + ".")
    return [Section("Models compared", "One row per warehouse (the models view); the invariants of each "
                    "(validation_summary, run on each warehouse alone).",
                    tables=[("models", models), ("validation_summary per model", val)])]
