"""Section "Echo behaviour": does the model echo? (headline: prompts echoed, all templates)."""

from __future__ import annotations

import altair as alt
import polars as pl

from reports.charts import WIDTH, data
from reports.context import Ctx
from reports.model import ECHO, Section


def accuracy_bars(df: pl.DataFrame) -> alt.Chart:
    """echo_behaviour: first-token, starts-with and exact echo accuracy per template."""
    cols = [c for c in ("first_token_accuracy", "echo_accuracy", "exact_accuracy") if c in df.columns]
    long = df.select("template", *cols).unpivot(index="template", variable_name="measure", value_name="accuracy")
    return alt.Chart(data(long), title="Echo behaviour per template").mark_bar().encode(
        y=alt.Y("template:N", title=None),
        yOffset="measure:N",
        x=alt.X("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
        color="measure:N",
        tooltip=["template:N", "measure:N", alt.Tooltip("accuracy:Q", format=".2f")],
    ).properties(width=WIDTH - 200, height=120)


def sections(ctx: Ctx) -> list[Section]:
    eb = ctx.run("echo_behaviour")
    agree = ctx.run("echo_agreement")
    n, n_echo = int(eb["n_prompts"].sum()), int(eb["n_echo_correct"].sum())
    ctx.findings.headline(ECHO, f"The continuation starts with the word for {n_echo} of {n} prompts "
                                f"({n_echo / n:.0%}) over {eb.height} templates.")
    for r in eb.iter_rows(named=True):
        ctx.findings.add(ECHO, f"“{r['template']}”: the first token is the word for {r['n_echo_first_token']} of "
                               f"{r['n_prompts']} prompts ({r['first_token_accuracy']:.0%}); the continuation starts "
                               f"with the word for {r['n_echo_correct']}.")
    return [Section(
        "Echo behaviour", "Greedy continuation per template: first token = target, continuation starts "
        "with the word, continuation is exactly the word (echo_behaviour); words where the templates "
        "disagree (echo_agreement).",
        charts=[accuracy_bars(eb)],
        tables=[("echo_behaviour", eb),
                ("Words whose templates give different first tokens (echo_agreement)",
                 agree.filter(~pl.col("same_top1")))])]
