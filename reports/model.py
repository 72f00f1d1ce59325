"""What a report is made of: sections of charts, tables and notes, plus the findings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import altair as alt
import polars as pl


class ReportError(Exception):
    """A user-facing problem building the report."""


@dataclass
class Section:
    title: str
    intro: str = ""
    charts: list[alt.TopLevelMixin] = field(default_factory=list)
    tables: list[tuple[str, pl.DataFrame]] = field(default_factory=list)
    note: str = ""


@dataclass
class Report:
    title: str
    sections: list[Section]
    findings: list[str]

    def chart_specs(self) -> list[dict[str, Any]]:
        return [c.to_dict() for s in self.sections for c in s.charts]


def visible(text: str | None) -> str | None:
    """Token text with its whitespace shown: ' cat' and 'cat' are different tokens, and the
    study's flips are often just that (a leading space, a capital). HTML would hide it."""
    if text is None:
        return None
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
