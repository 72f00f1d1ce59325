"""Comparison section "First-token attention at relative depth": is position 0 a sink in each
model? (headline: the share of heads at or above Gu et al.'s threshold, per model.)"""

from __future__ import annotations

import altair as alt
import polars as pl

from reports.charts import data
from reports.compare.context import SINK_THRESHOLD, WIDTH, CompareCtx, pct
from reports.model import SINK, Section


def _heatmap(ctx: CompareCtx, att: pl.DataFrame) -> alt.Chart:
    return alt.Chart(data(att.select("model", "layer", "head", "rel_depth", "mean_mass_first")),
                     title="Attention from the last position to position 0, per head (x: layer / n_layers in "
                           "bins of 0.05; a bin holding two layers shows the larger)").mark_rect().encode(
        x=alt.X("rel_depth:Q", bin=alt.Bin(step=0.05), title="relative depth (layer / n_layers, bins of 0.05)"),
        y=alt.Y("head:O", title="head"),
        color=alt.Color("mean_mass_first:Q", aggregate="max", title="attention on position 0",
                        scale=alt.Scale(scheme="greys", domain=[0, 1])),
        row=alt.Row("model:N", sort=ctx.labels, title=None),
        tooltip=["model:N", "layer:Q", "head:Q", alt.Tooltip("mean_mass_first:Q", aggregate="max", format=".3f")],
    ).properties(width=WIDTH, height=120)


def _profile(ctx: CompareCtx, prof: pl.DataFrame) -> alt.Chart:
    return alt.Chart(data(prof.select("model", "rel_lo", "mean_mass_first", "sink_share")),
                     title=f"Per tenth of depth: mean attention on position 0 and the share of heads ≥ "
                           f"{SINK_THRESHOLD}").mark_line(point=True).encode(
        x=alt.X("rel_lo:Q", title="relative depth (bin start)", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("sink_share:Q", title=f"share of heads with mean ≥ {SINK_THRESHOLD}", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("model:N", scale=ctx.model_scale(), legend=alt.Legend(orient="bottom")),
        tooltip=["model:N", "rel_lo:Q", alt.Tooltip("mean_mass_first:Q", format=".3f"),
                 alt.Tooltip("sink_share:Q", format=".2f")],
    ).properties(width=WIDTH, height=200)


def sections(ctx: CompareCtx) -> list[Section]:
    att = ctx.run("compare_first_token_attention")
    prof = ctx.in_order(ctx.run("compare_depth_profile", bins=10, threshold=SINK_THRESHOLD))
    shares = []
    for label in ctx.labels:
        mine = att.filter(pl.col("model") == label)
        if not mine.height:
            continue
        n_sink = mine.filter(pl.col("mean_mass_first") >= SINK_THRESHOLD).height
        best = mine.sort("mean_mass_first", descending=True).row(0, named=True)
        shares.append(f"{label} {pct(n_sink, mine.height)}")
        ctx.findings.add(SINK, f"{label}: {pct(n_sink, mine.height)} heads put at least {SINK_THRESHOLD} of the last "
                               f"position's attention on position 0 (Gu et al. 2025's sink criterion); the strongest "
                               f"is L{best['layer']}H{best['head']} at relative depth {best['rel_depth']:.2f} "
                               f"({best['mean_mass_first']:.1%}).")
    ctx.findings.headline(SINK, f"Heads putting at least {SINK_THRESHOLD} of the last position's attention on "
                                "position 0: " + "; ".join(shares) + ".")
    return [Section("First-token attention at relative depth", "Every head's mean attention from the last position "
                    "to position 0 with its block's relative depth (compare_first_token_attention), and the depth "
                    "profile in tenths of depth (compare_depth_profile).",
                    charts=[_heatmap(ctx, att), _profile(ctx, prof)], tables=[("compare_depth_profile", prof)])]
