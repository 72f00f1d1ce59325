"""Sections "Direct logit attribution per head", "DLA vs ablation", "Top-head consistency",
"Attention vs MLP blocks", "Ablation flips": which heads matter, and by which measure?
(headline: the top head by ablation against the top head by DLA.)

The ablation sections adapt to what the warehouse holds: no unit ablation (notes), zero and/or
mean mode, all or last positions, a subset of layers.
"""

from __future__ import annotations

import altair as alt
import polars as pl

from reports.charts import WIDTH, data, layer_head_heatmap
from reports.context import Ctx, most_common_emergence_layer
from reports.model import HEADS, Section


def dla_vs_ablation_scatter(df: pl.DataFrame, n_label: int = 8, mode: str = "zero") -> alt.Chart:
    """dla_vs_ablation_heads: mean DLA (x) against mean ablation effect (y), top heads labelled."""
    df = df.with_columns(("L" + pl.col("layer").cast(pl.Utf8) + "H" + pl.col("head").cast(pl.Utf8)).alias("label"),
                         (pl.col("ablation_rank") <= n_label).alias("top"))
    base = alt.Chart(data(df.select("label", "layer", "mean_dla", "mean_logit_diff", "mean_kl", "top")),
                     title=f"Per head: direct logit attribution vs {mode}-ablation effect (mean over prompts)")
    points = base.mark_circle(size=40, opacity=0.7).encode(
        x=alt.X("mean_dla:Q", title="mean DLA to the target"),
        y=alt.Y("mean_logit_diff:Q", title="mean target-logit drop when ablated"),
        color=alt.Color("layer:Q", scale=alt.Scale(scheme="plasma"), title="layer"),
        tooltip=["label:N", alt.Tooltip("mean_dla:Q", format=".3f"),
                 alt.Tooltip("mean_logit_diff:Q", format=".3f"), alt.Tooltip("mean_kl:Q", format=".3f")],
    )
    labels = base.transform_filter("datum.top").mark_text(dx=6, align="left", fontSize=10).encode(
        x="mean_dla:Q", y="mean_logit_diff:Q", text="label:N")
    diag = alt.Chart(data(pl.DataFrame({"v": [df["mean_dla"].min(), df["mean_dla"].max()]}))).mark_line(
        strokeDash=[4, 4], color="gray").encode(x="v:Q", y="v:Q")
    return (points + labels + diag).properties(width=WIDTH, height=360)


def top_heads_bars(df: pl.DataFrame,
                   title: str = "How often each head is in the top 3 (at each prompt's emergence layer)") -> alt.Chart:
    """top_heads_consistency: fraction of prompts where each head is top-3 by DLA / ablation."""
    long = df.select("head", pl.col("frac_top_dla").alias("DLA"), pl.col("frac_top_ablation").alias("ablation")).unpivot(
        index="head", variable_name="measure", value_name="fraction").drop_nulls()
    return alt.Chart(data(long), title=title).mark_bar().encode(
        x=alt.X("head:O"),
        xOffset="measure:N",
        y=alt.Y("fraction:Q", scale=alt.Scale(domain=[0, 1]), title="fraction of prompts"),
        color=alt.Color("measure:N"),
        tooltip=["head:O", "measure:N", alt.Tooltip("fraction:Q", format=".2f")],
    ).properties(width=WIDTH, height=220)


def block_ablation_lines(df: pl.DataFrame, mode: str = "zero") -> alt.Chart:
    """block_ablation: mean KL when the attention or MLP block of each layer is removed."""
    title = f"Whole-block {mode} ablation: KL(clean ‖ ablated) by layer"
    return alt.Chart(data(df), title=title).mark_line(point=True).encode(
        x=alt.X("layer:Q"),
        y=alt.Y("mean_kl:Q", title="mean KL (nats)"),
        color=alt.Color("unit_kind:N", title="block"),
        tooltip=["layer:Q", "unit_kind:N", alt.Tooltip("mean_kl:Q", format=".3f"),
                 alt.Tooltip("mean_logit_diff:Q", format=".3f"), alt.Tooltip("frac_top1_changed:Q", format=".2f")],
    ).properties(width=WIDTH, height=220)


def _head_dla(ctx: Ctx) -> tuple[Section, dict]:
    grid = ctx.run("head_dla_grid")
    best = grid.sort("mean_dla", descending=True).row(0, named=True)
    ctx.findings.add(HEADS, f"The head with the largest mean DLA is L{best['layer']}H{best['head']} "
                            f"({best['mean_dla']:.3f}).")
    return Section("Direct logit attribution per head", "Mean DLA of every head to each prompt's target "
                   "(head_dla_grid).", charts=[layer_head_heatmap(grid, "mean_dla", "Mean DLA per head")]), best


def sections(ctx: Ctx) -> list[Section]:
    dla, best = _head_dla(ctx)
    by_dla = f"L{best['layer']}H{best['head']} (mean DLA {best['mean_dla']:.3f})"
    if not ctx.ablation.unit_modes:
        ctx.findings.headline(HEADS, f"By direct logit attribution, {by_dla}; this warehouse has no unit "
                                     "ablation to check it against.")
        return [dla, *_no_ablation(ctx)]
    return [dla, _dla_vs_ablation(ctx, by_dla), _consistency(ctx), _blocks(ctx), _flips(ctx)]


def _no_ablation(ctx: Ctx) -> list[Section]:
    note = ("This warehouse has no ablation data for heads and blocks (zero or mean mode; extract with "
            "--ablation zero): these sections are left out.")
    cons = ctx.run("top_heads_consistency")
    return [Section("DLA vs ablation", note=note),
            Section("Top-head consistency", "DLA only (top_heads_consistency).",
                    charts=[top_heads_bars(cons)], tables=[("top_heads_consistency", cons)], note=note),
            Section("Ablation flips", note=note)]


def _dla_vs_ablation(ctx: Ctx, by_dla: str) -> Section:
    mode = ctx.ablation.mode
    dva = ctx.run("dla_vs_ablation_heads", mode=mode)
    corr = ctx.run("dla_vs_ablation_corr", mode=mode)
    top = dva.row(0, named=True)
    ctx.findings.headline(HEADS, f"By {mode} ablation, L{top['layer']}H{top['head']} (mean target-logit drop "
                                 f"{top['mean_logit_diff']:.3f}); by direct logit attribution, {by_dla}.")
    ctx.findings.add(HEADS, f"Ablating L{top['layer']}H{top['head']} lowers the target logit most (by "
                            f"{top['mean_logit_diff']:.2f} on average, {mode} mode) while its mean DLA is "
                            f"{top['mean_dla']:.3f} (DLA rank {top['dla_rank']} of {dva.height}).")
    if corr.height:
        med = corr["median_spearman"].median()
        ctx.findings.add(HEADS, f"Across layers the median per-prompt Spearman correlation between DLA and ablation "
                                f"is {med:.2f}: the two measures {'largely disagree' if med < 0.5 else 'mostly agree'}.")
    return Section("DLA vs ablation", f"Each head's mean DLA against the mean drop of the target logit when it is "
                   f"{mode}-ablated ({ctx.ablation.describe()}; dla_vs_ablation_heads); heads far above the dashed "
                   "diagonal act indirectly, through later layers. Rank correlation per layer: dla_vs_ablation_corr.",
                   charts=[dla_vs_ablation_scatter(dva, mode=mode)],
                   tables=[("Top heads by ablation effect", dva.head(10)),
                           ("Spearman(DLA, ablation) per layer", corr)])


def _consistency(ctx: Ctx) -> Section:
    mode = ctx.ablation.mode
    counts = ctx.run("emergence_counts")
    cons = ctx.run("top_heads_consistency", mode=mode)
    common = most_common_emergence_layer(counts)
    mode_layer = common[0] if common else None
    cons_at = ctx.run("top_heads_consistency", layer=mode_layer, mode=mode) if mode_layer is not None else None
    has_at = cons_at is not None and bool(cons_at["n_prompts_ablation"].max())
    chart_list = [top_heads_bars(cons)]
    tables = [("top_heads_consistency (each prompt's emergence layer)", cons)]
    if has_at:
        chart_list.append(top_heads_bars(
            cons_at, f"How often each head of layer {mode_layer} (the most common emergence layer) is in the top 3"))
        tables.append((f"top_heads_consistency(layer={mode_layer})", cons_at))
    c = cons.sort("n_top_ablation", descending=True).row(0, named=True)
    layers = sorted({x for x in counts["emergence_layer"].to_list() if x is not None})
    at = f" {layers[0]}" if len(layers) == 1 else ""
    if not c["n_prompts_ablation"]:
        ctx.findings.add(HEADS, "No prompt's target emerges under the logit lens at an ablated layer, so heads "
                                "cannot be ranked at an emergence layer.")
    else:
        ctx.findings.add(HEADS, f"Head {c['head']} (at the emergence layer{at}) is in the top 3 by ablation for "
                                f"{c['n_top_ablation']} of {c['n_prompts_ablation']} prompts, and in the top 3 by DLA "
                                f"for {c['n_top_dla']} of {c['n_prompts_dla']}.")
    if has_at:
        a = cons_at.sort("n_top_ablation", descending=True).row(0, named=True)
        ctx.findings.add(HEADS, f"At layer {mode_layer}, head L{mode_layer}H{a['head']} is in the top 3 by ablation "
                                f"for {a['n_top_ablation']} of {a['n_prompts_ablation']} prompts (top 3 by DLA for "
                                f"{a['n_top_dla']} of {a['n_prompts_dla']}).")
    return Section("Top-head consistency", f"How often each head is among the top 3 by {mode} ablation and by DLA, "
                   "at each prompt's own emergence layer and at the most common emergence layer "
                   "(top_heads_consistency).", charts=chart_list, tables=tables)


def _blocks(ctx: Ctx) -> Section:
    chart_list = []
    for mode in ctx.ablation.unit_modes:
        blocks = ctx.run("block_ablation", mode=mode)
        chart_list.append(block_ablation_lines(blocks, mode=mode))
        worst = blocks.sort("mean_kl", descending=True).row(0, named=True)
        ctx.findings.add(HEADS, f"The most damaging single block ({mode} ablation) is the "
                                f"{worst['unit_kind'].upper()} of layer {worst['layer']} (mean KL "
                                f"{worst['mean_kl']:.2f} nats; top-1 changes for {worst['frac_top1_changed']:.0%} "
                                "of prompts).")
        kinds = dict(blocks.group_by("unit_kind").agg(pl.col("mean_kl").sum()).rows())
        if "mlp" in kinds and "attn" in kinds:
            ctx.findings.add(HEADS, f"Summed over the ablated layers, {mode} ablation of MLP blocks costs "
                                    f"{kinds['mlp']:.1f} nats of KL against {kinds['attn']:.1f} for attention blocks.")
    return Section("Attention vs MLP blocks", "Removing a whole block per layer (block_ablation), against the "
                   "ablation engine's own clean run.", charts=chart_list)


def _flips(ctx: Ctx) -> Section:
    flips = ctx.run("ablation_flips")
    show = flips.sort("kl", descending=True).select("word", "template_index", "mode", "layer", "unit_kind", "head",
                                                    "clean_top1_text", "new_top1_text", "new_top1_prob", "kl")
    heads_only = flips.filter(pl.col("unit_kind") == "head")
    ctx.findings.add(HEADS, f"{heads_only.height} single-head ablations change the model's answer "
                            f"({heads_only.select('prompt').n_unique()} prompts affected).")
    return Section("Ablation flips", f"{flips.height} (prompt, mode, layer, unit) ablations change the top-1 token "
                   "of the ablation engine's clean run (ablation_flips); the 30 with the largest KL:",
                   tables=[("ablation_flips", show.head(30))])
