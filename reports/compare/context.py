"""The one object every comparison section is a function of: :class:`CompareCtx`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import altair as alt
import polars as pl

from query import Comparison
from reports.model import Findings

WIDTH = 560
SINK_THRESHOLD = 0.3  # Gu et al. 2025: a head is a sink when its mean attention to position 0 exceeds 0.3


def pct(n: int, d: int) -> str:
    return f"{n}/{d} ({n / d:.0%})" if d else "0/0"


@dataclass
class CompareCtx:
    """What every comparison section reads (the open comparison, whether any warehouse has
    ablation data) and where it writes its findings."""

    c: Comparison
    has_ablation: bool
    findings: Findings = field(default_factory=Findings)

    @property
    def labels(self) -> list[str]:
        return list(self.c.labels)

    def run(self, name: str, **params: Any) -> pl.DataFrame:
        """A named analysis over every warehouse (a ``model`` column tells them apart)."""
        return self.c.run_analysis(name, **params)

    def in_order(self, df: pl.DataFrame) -> pl.DataFrame:
        """Rows in the order the warehouses were given (stable within a model)."""
        order = {label: i for i, label in enumerate(self.labels)}
        return (df.with_row_index("_i").sort(pl.col("model").replace_strict(order, return_dtype=pl.Int32), "_i")
                .drop("_i"))

    def model_scale(self) -> alt.Scale:
        """One colour per model, the same in every chart."""
        return alt.Scale(domain=self.labels, scheme="category10")
