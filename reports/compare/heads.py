"""Comparison section "Top heads at relative depth": which heads matter in each model, by
which measure? (headline: each model's top head, by ablation where it has ablation data.)"""

from __future__ import annotations

import altair as alt
import polars as pl

from reports.charts import data
from reports.compare.context import WIDTH, CompareCtx
from reports.model import HEADS, Section


def _chart(ctx: CompareCtx, top: pl.DataFrame) -> alt.Chart:
    return alt.Chart(data(top.select("model", "measure", "rank", "unit", "rel_depth", "value")),
                     title="Top heads per model at relative depth (value: mean ablation effect or mean DLA)").mark_point(
        filled=True, size=70).encode(
        x=alt.X("rel_depth:Q", title="relative depth (layer / n_layers)", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("value:Q", title="mean effect on the target logit"),
        color=alt.Color("model:N", scale=ctx.model_scale(), legend=alt.Legend(orient="bottom")),
        shape=alt.Shape("measure:N"),
        tooltip=["model:N", "measure:N", "rank:Q", "unit:N", alt.Tooltip("rel_depth:Q", format=".2f"),
                 alt.Tooltip("value:Q", format=".3f")],
    ).properties(width=WIDTH, height=260)


def _what(measure: str) -> str:
    return "ablation effect" if measure == "ablation" else "DLA"


def sections(ctx: CompareCtx) -> list[Section]:
    top = ctx.in_order(ctx.run("compare_top_heads", top=5))
    top = top.with_columns((pl.lit("L") + pl.col("layer").cast(pl.Utf8) + pl.lit("H")
                            + pl.col("head").cast(pl.Utf8)).alias("unit"),
                           pl.coalesce(pl.when(pl.col("measure") == "ablation").then(pl.col("mean_logit_diff")),
                                       pl.col("mean_dla")).alias("value"))
    best = []
    for label in ctx.labels:
        mine = top.filter((pl.col("model") == label) & (pl.col("rank") == 1)).sort(
            pl.col("measure") != "ablation")  # ablation first
        if mine.height:
            r = mine.row(0, named=True)
            best.append(f"{label} {r['unit']} by {_what(r['measure'])} (mean {r['value']:.3f}, relative depth "
                        f"{r['rel_depth']:.2f})")
        parts = [f"by {_what(r['measure'])}, {r['unit']} at relative depth {r['rel_depth']:.2f} (mean {r['value']:.3f})"
                 for r in mine.sort("measure").iter_rows(named=True)]
        if parts:
            ctx.findings.add(HEADS, f"{label}'s top head: " + "; ".join(parts) + ".")
        if not mine.filter(pl.col("measure") == "ablation").height:
            ctx.findings.add(HEADS, f"{label} has no ablation data: its heads are ranked by DLA only.")
    ctx.findings.headline(HEADS, "The head that matters most in each model (by ablation where there is ablation "
                                 "data): " + "; ".join(best) + ".")
    note = "" if ctx.has_ablation else "No warehouse has ablation data: heads are ranked by DLA only."
    return [Section("Top heads at relative depth", "Each model's five heads with the largest mean ablation effect "
                    "(zero ablation; ablated layers only) and the largest mean DLA, placed at layer / n_layers "
                    "(compare_top_heads).", charts=[_chart(ctx, top)],
                    tables=[("compare_top_heads", top.drop("unit", "value"))], note=note)]
