"""Chart primitives shared by several sections (the one rule: a chart drawn by one section is
defined in that section's module; one drawn by two or more is defined here).

The frames are already aggregated in DuckDB (query/analyses/*.sql); these functions only map
columns to marks, so every number on a chart is one a query returns.
"""

from __future__ import annotations

import altair as alt
import polars as pl

WIDTH = 640  # px, every single-column chart of the study report


def data(df: pl.DataFrame) -> alt.Data:
    """A frame's rows inlined into the spec (the report fetches nothing)."""
    return alt.Data(values=df.to_dicts())


def layer_head_heatmap(df: pl.DataFrame, value: str, title: str, scheme: str = "redblue",
                       domain_mid: float | None = 0.0) -> alt.Chart:
    """A layer x head grid of one aggregated value (head_dla_grid, first_token_attention_grid)."""
    scale = alt.Scale(scheme=scheme, domainMid=domain_mid) if domain_mid is not None else alt.Scale(scheme=scheme)
    return alt.Chart(data(df.select("layer", "head", value)), title=title).mark_rect().encode(
        x=alt.X("head:O"),
        y=alt.Y("layer:O", sort="descending"),
        color=alt.Color(f"{value}:Q", scale=scale),
        tooltip=["layer:O", "head:O", alt.Tooltip(f"{value}:Q", format=".4f")],
    ).properties(width=260, height=420)
