"""Comparison section "Echo accuracy by model": does each model echo? (headline: prompts
echoed per model, all templates.)"""

from __future__ import annotations

import altair as alt
import polars as pl

from reports.charts import data
from reports.compare.context import WIDTH, CompareCtx, pct
from reports.model import ECHO, Section


def sections(ctx: CompareCtx) -> list[Section]:
    acc = ctx.in_order(ctx.run("compare_echo_accuracy"))
    words = ctx.run("compare_echo_words")
    chart = alt.Chart(data(acc.with_columns(pl.col("template_index").cast(pl.Utf8).alias("template_no"))),
                      title="Echo accuracy per template (continuation starts with the word)").mark_bar().encode(
        x=alt.X("template_no:N", title="template"), xOffset="model:N",
        y=alt.Y("echo_accuracy:Q", title="echo accuracy", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("model:N", scale=ctx.model_scale(), legend=alt.Legend(orient="bottom")),
        tooltip=["model:N", "template:N", "n_prompts:Q", "n_echo_correct:Q",
                 alt.Tooltip("echo_accuracy:Q", format=".2f"), alt.Tooltip("first_token_accuracy:Q", format=".2f")],
    ).properties(width=WIDTH, height=220)
    total = ctx.in_order(acc.group_by("model", maintain_order=True).agg(pl.col("n_echo_correct").sum(),
                                                                       pl.col("n_prompts").sum()))
    ctx.findings.headline(ECHO, "Prompts whose continuation starts with the word, over every template: " + "; ".join(
        f"{r['model']} {pct(r['n_echo_correct'], r['n_prompts'])}" for r in total.iter_rows(named=True)) + ".")
    for t in sorted(set(acc["template_index"].to_list())):
        rows = acc.filter(pl.col("template_index") == t)
        ctx.findings.add(ECHO, f"Template {t}: " + "; ".join(
            f"{r['model']} echoes {pct(r['n_echo_correct'], r['n_prompts'])} (first token = target for "
            f"{r['n_echo_first_token']})" for r in ctx.in_order(rows).iter_rows(named=True)) + ".")
    shared = words.filter(pl.col("n_models") == len(ctx.labels))
    disagree = shared.filter(~pl.col("agree"))
    if len(ctx.labels) > 1:
        ctx.findings.add(ECHO, f"The models disagree on {disagree.height} of the {shared.height} (word, template) "
                               "pairs they all ran.")
    return [Section("Echo accuracy by model", "Greedy continuation per model and template (compare_echo_accuracy; "
                    "each model's own template text: a base model may run a few-shot form), and the words on which "
                    "the models disagree (compare_echo_words).", charts=[chart],
                    tables=[("compare_echo_accuracy", acc), ("Words the models disagree on", disagree)])]
