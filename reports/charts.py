"""Altair chart builders: one function per figure, each taking a named analysis' frame.

The frames are already aggregated in DuckDB (query/analyses/*.sql); these functions only map
columns to marks, so every number on a chart is one a query returns.
"""

from __future__ import annotations

import altair as alt
import polars as pl

WIDTH = 640
TEMPLATE_COLORS = alt.Scale(scheme="category10")


def _data(df: pl.DataFrame) -> alt.Data:
    return alt.Data(values=df.to_dicts())


def emergence_histogram(counts: pl.DataFrame, templates: list[str]) -> alt.Chart:
    """emergence_counts: prompts per emergence layer, one bar colour per template."""
    df = counts.with_columns(
        pl.col("emergence_layer").cast(pl.Utf8).fill_null("never").alias("emergence"),
        pl.col("template_index").map_elements(lambda i: templates[i] if i < len(templates) else str(i),
                                              return_dtype=pl.Utf8).alias("template"),
    )
    order = [str(x) for x in sorted(v for v in counts["emergence_layer"].to_list() if v is not None)] + ["never"]
    return alt.Chart(_data(df), title="Emergence layer (first layer from which the target stays top-1)").mark_bar().encode(
        x=alt.X("emergence:N", sort=order, title="emergence layer"),
        xOffset="template:N",
        y=alt.Y("n_prompts:Q", title="prompts"),
        color=alt.Color("template:N", scale=TEMPLATE_COLORS, legend=alt.Legend(orient="bottom")),
        tooltip=["template:N", "emergence:N", "n_prompts:Q"],
    ).properties(width=WIDTH, height=220)


def lens_heatmap(df: pl.DataFrame) -> alt.Chart:
    """lens_target: target probability per (prompt, layer)."""
    df = df.with_columns((pl.col("word") + " · t" + pl.col("template_index").cast(pl.Utf8)).alias("prompt_label"))
    order = df.sort(["template_index", "prompt"])["prompt_label"].unique(maintain_order=True).to_list()
    return alt.Chart(_data(df.select("prompt_label", "layer", "target_prob", "target_rank")),
                     title="Logit lens: target probability at each layer (rows: word · template)").mark_rect().encode(
        x=alt.X("layer:O", title="layer (residual after block; -1 = embeddings)"),
        y=alt.Y("prompt_label:N", sort=order, title=None, axis=alt.Axis(labelFontSize=8)),
        color=alt.Color("target_prob:Q", scale=alt.Scale(scheme="viridis", domain=[0, 1]), title="p(target)"),
        tooltip=["prompt_label:N", "layer:O", alt.Tooltip("target_prob:Q", format=".3f"), "target_rank:Q"],
    ).properties(width=WIDTH, height=max(200, 7 * len(order)))


def lens_rank_heatmap(df: pl.DataFrame) -> alt.Chart:
    """lens_target: the target's rank per (prompt, layer), log colour scale (0 = top-1).

    The probability map is dark wherever the target is not yet likely; the rank shows how
    far it has climbed before it wins.
    """
    df = df.with_columns((pl.col("word") + " · t" + pl.col("template_index").cast(pl.Utf8)).alias("prompt_label"),
                         (pl.col("target_rank") + 1).alias("rank1"))
    order = df.sort(["template_index", "prompt"])["prompt_label"].unique(maintain_order=True).to_list()
    return alt.Chart(_data(df.select("prompt_label", "layer", "target_rank", "rank1")),
                     title="Logit lens: target rank at each layer (1 = top-1; log colour scale)").mark_rect().encode(
        x=alt.X("layer:O", title="layer (residual after block; -1 = embeddings)"),
        y=alt.Y("prompt_label:N", sort=order, title=None, axis=alt.Axis(labelFontSize=8)),
        color=alt.Color("rank1:Q", scale=alt.Scale(type="log", scheme="viridis", reverse=True),
                        title="rank + 1"),
        tooltip=["prompt_label:N", "layer:O", "target_rank:Q"],
    ).properties(width=WIDTH, height=max(200, 7 * len(order)))


def lens_trajectory(df: pl.DataFrame, title: str) -> alt.Chart:
    """lens_trajectory for one prompt: top-k token text per layer, shaded by probability.

    Layers run down the rows and the k ranks across, so each token's text is written
    horizontally in a cell wide enough to read (12 px; long tokens are cut with an ellipsis);
    white text on the dark (likely) cells, the target in red.
    """
    n_layers = max(1, df["layer"].n_unique()) if df.height else 1
    df = df.with_columns(pl.when(pl.col("is_target")).then(pl.lit("target"))
                         .when(pl.col("prob") > 0.5).then(pl.lit("on dark")).otherwise(pl.lit("on light")).alias("ink"))
    base = alt.Chart(_data(df.select("layer", "k", "token_text", "prob", "is_target", "ink")), title=title).encode(
        y=alt.Y("layer:O", title="layer", sort="ascending"),
        x=alt.X("k:O", title="rank under the logit lens (0 = top-1)", axis=alt.Axis(labelAngle=0, orient="top")),
    )
    rect = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("prob:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]), title="prob"),
        tooltip=["layer:O", "k:O", "token_text:N", alt.Tooltip("prob:Q", format=".3f"), "is_target:N"],
    )
    text = base.mark_text(fontSize=12, limit=WIDTH // 3 - 12, font="monospace").encode(
        text="token_text:N",
        color=alt.Color("ink:N", legend=None, scale=alt.Scale(domain=["target", "on dark", "on light"],
                                                               range=["#d62728", "white", "black"])),
    )
    return (rect + text).properties(width=WIDTH, height=20 * n_layers)


def layer_head_heatmap(df: pl.DataFrame, value: str, title: str, scheme: str = "redblue",
                       domain_mid: float | None = 0.0) -> alt.Chart:
    """A layer x head grid of one aggregated value (head_dla_grid, first_token_attention_grid)."""
    scale = alt.Scale(scheme=scheme, domainMid=domain_mid) if domain_mid is not None else alt.Scale(scheme=scheme)
    return alt.Chart(_data(df.select("layer", "head", value)), title=title).mark_rect().encode(
        x=alt.X("head:O"),
        y=alt.Y("layer:O", sort="descending"),
        color=alt.Color(f"{value}:Q", scale=scale),
        tooltip=["layer:O", "head:O", alt.Tooltip(f"{value}:Q", format=".4f")],
    ).properties(width=260, height=420)


def dla_vs_ablation_scatter(df: pl.DataFrame, n_label: int = 8, mode: str = "zero") -> alt.Chart:
    """dla_vs_ablation_heads: mean DLA (x) against mean ablation effect (y), top heads labelled."""
    df = df.with_columns(("L" + pl.col("layer").cast(pl.Utf8) + "H" + pl.col("head").cast(pl.Utf8)).alias("label"),
                         (pl.col("ablation_rank") <= n_label).alias("top"))
    base = alt.Chart(_data(df.select("label", "layer", "mean_dla", "mean_logit_diff", "mean_kl", "top")),
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
    diag = alt.Chart(_data(pl.DataFrame({"v": [df["mean_dla"].min(), df["mean_dla"].max()]}))).mark_line(
        strokeDash=[4, 4], color="gray").encode(x="v:Q", y="v:Q")
    return (points + labels + diag).properties(width=WIDTH, height=360)


def top_heads_bars(df: pl.DataFrame,
                   title: str = "How often each head is in the top 3 (at each prompt's emergence layer)") -> alt.Chart:
    """top_heads_consistency: fraction of prompts where each head is top-3 by DLA / ablation."""
    long = df.select("head", pl.col("frac_top_dla").alias("DLA"), pl.col("frac_top_ablation").alias("ablation")).unpivot(
        index="head", variable_name="measure", value_name="fraction").drop_nulls()
    return alt.Chart(_data(long), title=title).mark_bar().encode(
        x=alt.X("head:O"),
        xOffset="measure:N",
        y=alt.Y("fraction:Q", scale=alt.Scale(domain=[0, 1]), title="fraction of prompts"),
        color=alt.Color("measure:N"),
        tooltip=["head:O", "measure:N", alt.Tooltip("fraction:Q", format=".2f")],
    ).properties(width=WIDTH, height=220)


def cosine_by_layer(df: pl.DataFrame, title: str) -> alt.Chart:
    """resid_cosine_by_layer / bos_cosine: mean cosine per layer with a min-max band."""
    base = alt.Chart(_data(df.select("layer", "mean_cosine", "min_cosine", "max_cosine")), title=title)
    layers = alt.Scale(domain=[df["layer"].min(), df["layer"].max()], nice=False) if df.height else alt.Undefined
    band = base.mark_area(opacity=0.25).encode(x=alt.X("layer:Q", title="layer (-1 = embeddings)", scale=layers),
                                              y=alt.Y("min_cosine:Q", title="cosine similarity", scale=alt.Scale(zero=False)),
                                              y2="max_cosine:Q")
    line = base.mark_line(point=True).encode(
        x="layer:Q", y="mean_cosine:Q",
        tooltip=["layer:Q", alt.Tooltip("mean_cosine:Q", format=".4f"), alt.Tooltip("min_cosine:Q", format=".4f"),
                 alt.Tooltip("max_cosine:Q", format=".4f")])
    return (band + line).properties(width=WIDTH, height=220)


def block_ablation_lines(df: pl.DataFrame, mode: str = "zero") -> alt.Chart:
    """block_ablation: mean KL when the attention or MLP block of each layer is removed."""
    title = f"Whole-block {mode} ablation: KL(clean ‖ ablated) by layer"
    return alt.Chart(_data(df), title=title).mark_line(point=True).encode(
        x=alt.X("layer:Q"),
        y=alt.Y("mean_kl:Q", title="mean KL (nats)"),
        color=alt.Color("unit_kind:N", title="block"),
        tooltip=["layer:Q", "unit_kind:N", alt.Tooltip("mean_kl:Q", format=".3f"),
                 alt.Tooltip("mean_logit_diff:Q", format=".3f"), alt.Tooltip("frac_top1_changed:Q", format=".2f")],
    ).properties(width=WIDTH, height=220)


def accuracy_bars(df: pl.DataFrame) -> alt.Chart:
    """echo_behaviour: first-token, starts-with and exact echo accuracy per template."""
    cols = [c for c in ("first_token_accuracy", "echo_accuracy", "exact_accuracy") if c in df.columns]
    long = df.select("template", *cols).unpivot(index="template", variable_name="measure", value_name="accuracy")
    return alt.Chart(_data(long), title="Echo behaviour per template").mark_bar().encode(
        y=alt.Y("template:N", title=None),
        yOffset="measure:N",
        x=alt.X("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
        color="measure:N",
        tooltip=["template:N", "measure:N", alt.Tooltip("accuracy:Q", format=".2f")],
    ).properties(width=WIDTH - 200, height=120)
