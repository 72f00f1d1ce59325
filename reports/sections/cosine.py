"""Section "Residual cosine similarity": how far apart the templates' last-token residuals are,
per layer, and whether position 0 carries anything prompt-specific (answers: what makes the
templates differ, and is position 0 a sink)."""

from __future__ import annotations

import altair as alt
import polars as pl

from reports.charts import WIDTH, data
from reports.context import Ctx
from reports.model import SINK, TEMPLATES, Section


def cosine_by_layer(df: pl.DataFrame, title: str) -> alt.Chart:
    """resid_cosine_by_layer / bos_cosine: mean cosine per layer with a min-max band."""
    base = alt.Chart(data(df.select("layer", "mean_cosine", "min_cosine", "max_cosine")), title=title)
    layers = alt.Scale(domain=[df["layer"].min(), df["layer"].max()], nice=False) if df.height else alt.Undefined
    band = base.mark_area(opacity=0.25).encode(x=alt.X("layer:Q", title="layer (-1 = embeddings)", scale=layers),
                                              y=alt.Y("min_cosine:Q", title="cosine similarity", scale=alt.Scale(zero=False)),
                                              y2="max_cosine:Q")
    line = base.mark_line(point=True).encode(
        x="layer:Q", y="mean_cosine:Q",
        tooltip=["layer:Q", alt.Tooltip("mean_cosine:Q", format=".4f"), alt.Tooltip("min_cosine:Q", format=".4f"),
                 alt.Tooltip("max_cosine:Q", format=".4f")])
    return (band + line).properties(width=WIDTH, height=220)


def sections(ctx: Ctx) -> list[Section]:
    chart_list = []
    if len(ctx.templates) >= 2:
        rc = ctx.run("resid_cosine_by_layer").sort("layer")
        chart_list.append(cosine_by_layer(rc, "Last-token residual: cosine between the two templates, per word"))
        last = rc.row(-1, named=True)
        ctx.findings.add(TEMPLATES, f"The last-token residuals of the two templates have mean cosine "
                                    f"{rc['mean_cosine'][0]:.3f} at the embeddings and {last['mean_cosine']:.3f} "
                                    f"after the last layer (minimum {last['min_cosine']:.3f}).")
    bos = ctx.run("bos_cosine")
    chart_list.append(cosine_by_layer(bos, "Position-0 residual: cosine across all pairs of prompts"))
    if bos.height and bos["n_first_tokens"][0] == 1:
        ctx.findings.add(SINK, f"Position 0 holds the same token in every prompt, and its residual has cosine ≥ "
                               f"{bos['min_cosine'].min():.4f} across prompts at every layer: by causal masking it "
                               "cannot carry prompt-specific information.")
    elif bos.height:
        ctx.findings.add(SINK, f"Position 0 holds {bos['n_first_tokens'][0]} different tokens across prompts; its "
                               f"residual's pairwise cosine goes down to {bos['min_cosine'].min():.4f}.")
    return [Section("Residual cosine similarity", "resid_cosine_by_layer and bos_cosine.", charts=chart_list)]
