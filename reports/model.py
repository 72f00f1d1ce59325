"""What a report is made of: sections (charts, tables, notes) and findings grouped by question."""

from __future__ import annotations

from collections.abc import Iterator
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


@dataclass(frozen=True)
class Question:
    """A question the study answers; findings are listed under it. ``anchor``: its HTML id."""

    text: str
    anchor: str


# The study's questions, in the order a report asks them. A new section that answers a new
# question defines its own ``Question`` in its module; questions are listed in the order the
# sections (reports.sections.SECTIONS) first answer them.
ECHO = Question("Does the model echo?", "q-echo")
WHERE = Question("Where does the answer appear?", "q-where")
HEADS = Question("Which heads matter, and by which measure?", "q-heads")
SINK = Question("Is position 0 a sink?", "q-sink")
TEMPLATES = Question("What makes the templates differ?", "q-templates")


@dataclass
class Answer:
    """One question's findings: the headline (the number that answers it) first, then the
    supporting findings, then (in a comparison) each model's own answer under its label."""

    question: Question
    headline: str | None = None
    supporting: list[str] = field(default_factory=list)
    models: list[tuple[str, Answer]] = field(default_factory=list)  # (label, that model's answer)

    def texts(self) -> list[str]:
        """Every sentence in page order; a model's own prefixed with its label ('smol: ...')."""
        own = ([self.headline] if self.headline else []) + self.supporting
        return own + [f"{label}: {t}" for label, a in self.models for t in a.texts()]


@dataclass
class Findings:
    """Sentences written from the analyses' frames, grouped by the question each answers, plus
    the run's own checks (``run``: validation, shown before the questions).

    Iterating yields every sentence in page order (run checks, then each question's headline
    and supporting findings), so ``"\\n".join(report.findings)`` reads the whole list.
    """

    run: list[str] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    def answer(self, q: Question) -> Answer:
        for a in self.answers:
            if a.question == q:
                return a
        self.answers.append(Answer(q))
        return self.answers[-1]

    def headline(self, q: Question, text: str) -> None:
        """The one sentence (with its number) that answers ``q``; one section owns it."""
        a = self.answer(q)
        assert a.headline is None, f"two headlines for {q.text!r}: {a.headline!r} and {text!r}"
        a.headline = text

    def add(self, q: Question, text: str) -> None:
        """A supporting finding under ``q``."""
        self.answer(q).supporting.append(text)

    def merge(self, other: Findings, label: str) -> None:
        """Put another model's findings under the same questions, labelled (a comparison)."""
        self.run += [f"{label}: {t}" for t in other.run]
        for a in other.answers:
            self.answer(a.question).models.append((label, a))

    def __iter__(self) -> Iterator[str]:
        yield from self.run
        for a in self.answers:
            yield from a.texts()

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass
class Report:
    title: str
    sections: list[Section]
    findings: Findings

    def chart_specs(self) -> list[dict[str, Any]]:
        return [c.to_dict() for s in self.sections for c in s.charts]


def visible(text: str | None) -> str | None:
    """Token text with its whitespace shown: ' cat' and 'cat' are different tokens, and the
    study's flips are often just that (a leading space, a capital). HTML would hide it."""
    if text is None:
        return None
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
