"""Comparison section "Emergence at relative depth": where does the answer appear in each
model? (headline: each model's median emergence layer / n_layers.)"""

from __future__ import annotations

import altair as alt
import polars as pl

from reports.charts import data
from reports.compare.context import WIDTH, CompareCtx, pct
from reports.model import WHERE, Section


def _chart(ctx: CompareCtx, per_prompt: pl.DataFrame) -> alt.Chart:
    return alt.Chart(data(per_prompt.with_columns(pl.col("template_index").cast(pl.Utf8).alias("template_no"))),
                     title="Emergence layer / n_layers, per prompt (prompts whose answer is the target)").mark_tick(
        thickness=2).encode(
        x=alt.X("rel_depth:Q", title="relative depth of the emergence layer (layer / n_layers)",
                scale=alt.Scale(domain=[-0.1, 1])),
        y=alt.Y("model:N", sort=ctx.labels, title=None), yOffset="template_no:N",
        color=alt.Color("template_no:N", title="template", legend=alt.Legend(orient="bottom")),
        tooltip=["model:N", "word:N", "template_no:N", "emergence_layer:Q", "n_layers:Q",
                 alt.Tooltip("rel_depth:Q", format=".2f")],
    ).properties(width=WIDTH, height=40 * max(1, len(ctx.labels)) + 40)


def sections(ctx: CompareCtx) -> list[Section]:
    summary = ctx.in_order(ctx.run("compare_emergence"))
    per_prompt = ctx.run("compare_emergence_prompts").drop_nulls("rel_depth")
    med = ctx.in_order(per_prompt.group_by("model").agg(pl.col("rel_depth").median().alias("m"), pl.len().alias("n")))
    never = [m for m in ctx.labels if m not in set(med["model"].to_list())]
    ctx.findings.headline(WHERE, "Median relative depth (layer / n_layers) at which the target emerges: " + "; ".join(
        [f"{r['model']} {r['m']:.2f} ({r['n']} prompts)" for r in med.iter_rows(named=True)]
        + [f"{m} never" for m in never]) + ".")
    for r in summary.iter_rows(named=True):
        if r["n_emerged"]:
            ctx.findings.add(WHERE, f"{r['model']}, template {r['template_index']}: the target emerges for "
                                    f"{pct(r['n_emerged'], r['n_prompts'])} prompts, at median layer "
                                    f"{r['median_layer']:g} of {r['n_layers']} (relative depth "
                                    f"{r['median_rel_depth']:.2f}).")
        else:
            ctx.findings.add(WHERE, f"{r['model']}, template {r['template_index']}: the target never ends top-1 "
                                    f"({r['n_prompts']} prompts).")
    if med.height >= 2:
        first, last = med.sort("m").row(0, named=True), med.sort("m").row(-1, named=True)
        if first["m"] == last["m"]:
            ctx.findings.add(WHERE, f"Over all templates the target emerges at the same median relative depth "
                                    f"({first['m']:.2f}) in every model.")
        else:
            ctx.findings.add(WHERE, f"Over all templates the target emerges earliest, relative to depth, in "
                                    f"{first['model']} (median {first['m']:.2f}) and latest in {last['model']} "
                                    f"(median {last['m']:.2f}).")
    return [Section("Emergence at relative depth", "The first layer from which the logit lens keeps the target "
                    "top-1, divided by the model's number of blocks (compare_emergence, compare_emergence_prompts).",
                    charts=[_chart(ctx, per_prompt)], tables=[("compare_emergence", summary)])]
