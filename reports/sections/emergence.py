"""Sections "Emergence layer" and "Logit lens": where does the answer appear? (headline: the
most common emergence layer and how many prompts reach the target there)."""

from __future__ import annotations

import altair as alt
import polars as pl

from reports.charts import WIDTH, data
from reports.context import Ctx, most_common_emergence_layer
from reports.model import WHERE, Section, visible

TEMPLATE_COLORS = alt.Scale(scheme="category10")


def emergence_histogram(counts: pl.DataFrame, templates: list[str]) -> alt.Chart:
    """emergence_counts: prompts per emergence layer, one bar colour per template."""
    df = counts.with_columns(
        pl.col("emergence_layer").cast(pl.Utf8).fill_null("never").alias("emergence"),
        pl.col("template_index").map_elements(lambda i: templates[i] if i < len(templates) else str(i),
                                              return_dtype=pl.Utf8).alias("template"),
    )
    order = [str(x) for x in sorted(v for v in counts["emergence_layer"].to_list() if v is not None)] + ["never"]
    return alt.Chart(data(df), title="Emergence layer (first layer from which the target stays top-1)").mark_bar().encode(
        x=alt.X("emergence:N", sort=order, title="emergence layer"),
        xOffset="template:N",
        y=alt.Y("n_prompts:Q", title="prompts"),
        color=alt.Color("template:N", scale=TEMPLATE_COLORS, legend=alt.Legend(orient="bottom")),
        tooltip=["template:N", "emergence:N", "n_prompts:Q"],
    ).properties(width=WIDTH, height=220)


def _labelled(df: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    df = df.with_columns((pl.col("word") + " · t" + pl.col("template_index").cast(pl.Utf8)).alias("prompt_label"),
                         (pl.col("target_rank") + 1).alias("rank1"))
    return df, df.sort(["template_index", "prompt"])["prompt_label"].unique(maintain_order=True).to_list()


def lens_heatmap(df: pl.DataFrame) -> alt.Chart:
    """lens_target: target probability per (prompt, layer)."""
    df, order = _labelled(df)
    return alt.Chart(data(df.select("prompt_label", "layer", "target_prob", "target_rank")),
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
    df, order = _labelled(df)
    return alt.Chart(data(df.select("prompt_label", "layer", "target_rank", "rank1")),
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
    base = alt.Chart(data(df.select("layer", "k", "token_text", "prob", "is_target", "ink")), title=title).encode(
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


def _findings(ctx: Ctx, counts: pl.DataFrame) -> None:
    n = int(counts["n_prompts"].sum())
    never = int(counts.filter(pl.col("emergence_layer").is_null())["n_prompts"].sum())
    top = most_common_emergence_layer(counts)
    if top is None:
        ctx.findings.headline(WHERE, f"The target never ends top-1 under the logit lens ({n} of {n} prompts).")
    else:
        ctx.findings.headline(WHERE, f"The target emerges at layer {top[0]} for {top[1]} of {n} prompts (top-1 under "
                                     f"the logit lens from there to the last layer); for {never} of {n} it never "
                                     "ends top-1.")
    for t in sorted(set(counts["template_index"].to_list())):
        c = counts.filter((pl.col("template_index") == t) & pl.col("emergence_layer").is_not_null())
        if c.height:
            best = c.sort("n_prompts", descending=True).row(0, named=True)
            ctx.findings.add(WHERE, f"{ctx.template_name(t)}: the target most often emerges at layer "
                                    f"{best['emergence_layer']} ({best['n_prompts']} of {c['n_prompts'].sum()} "
                                    "prompts whose answer is the target).")


def _lens(ctx: Ctx) -> Section:
    lens = ctx.run("lens_target")
    known = set(ctx.wh.sql("SELECT DISTINCT word FROM prompts")["word"].to_list())
    missing = [w for w in ctx.words if w not in known]
    traj = []
    for w in ctx.words:
        for t in range(len(ctx.templates)):
            tr = ctx.run("lens_trajectory", word=w, template_index=t, k=3)
            tr = tr.with_columns(pl.col("token_text").map_elements(visible, return_dtype=pl.Utf8))
            if tr.height:
                traj.append(lens_trajectory(tr, f"“{w}”, template {t}: logit-lens top-3 per layer (target in red)"))
    return Section("Logit lens", "Target probability and rank under the logit lens (lens_target), and the top-3 "
                   f"tokens per layer for {', '.join(ctx.words)} (lens_trajectory; ␣ marks a space).",
                   charts=[lens_heatmap(lens), lens_rank_heatmap(lens), *traj],
                   note=f"Not in this prompt set: {', '.join(missing)}." if missing else "")


def sections(ctx: Ctx) -> list[Section]:
    counts = ctx.run("emergence_counts")
    _findings(ctx, counts)
    return [Section("Emergence layer", "Per prompt, the first layer from which the logit lens keeps the target at "
                    "rank 0 through the last layer (emergence_counts; 'never': the model's final top-1 is not the "
                    "target).", charts=[emergence_histogram(counts, ctx.templates)]),
            _lens(ctx)]
