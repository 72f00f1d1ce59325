"""The HTML report: named analyses (through query) -> sections and findings -> one
self-contained HTML file.

Layout
    model.py       Section, Report, and the findings grouped by question (Question, Findings)
    context.py     Ctx: the one object every study section is a function of
    sections/      the study's sections, one module each; ``SECTIONS`` in sections/__init__.py
                   is the one list they are registered in, in page order
    compare/       the comparison report (several warehouses): the same convention with
                   CompareCtx, its sections registered in ``COMPARE_SECTIONS``
    charts.py      chart primitives shared by several sections
    render.py      the page: templates/report.html.jinja (autoescaped), inlined Vega libraries,
                   written under a temporary name and renamed (write_html)
    report.py      build / write_report: run every registered section over one warehouse

One section convention. A section is a function ``sections(ctx) -> list[Section]`` (Ctx for the
study, CompareCtx for the comparison). It reads only named analyses (``ctx.run(NAME, ...)``) or
views, and writes its findings into ``ctx.findings`` under the question they answer:
``ctx.findings.headline(Q, text)`` for the one sentence, with its number, that answers Q first
(one section owns each question's headline), ``ctx.findings.add(Q, text)`` for the supporting
findings, ``ctx.findings.run`` for checks on the run itself. The five questions are in
model.py; a section answering a new question defines its ``Question`` in its own module, and
questions are listed in the order the registered sections first answer them.

One chart rule. A chart drawn by one section is defined in that section's module; a chart
drawn by two or more sections is defined in charts.py (nothing section-specific lives there).

Adding a section (e.g. "Which paths carry the word", "Is there one 'repeat' inside the model?"):
write reports/sections/NAME.py with ``def sections(ctx: Ctx) -> list[Section]`` (its charts and
findings beside it) and add ``NAME.sections`` to ``SECTIONS`` in reports/sections/__init__.py.
Nothing else changes: the template renders any section and any question.
"""

from reports.model import Report, ReportError, Section
from reports.render import render_html
from reports.report import build, write_report

__all__ = ["Report", "ReportError", "Section", "build", "render_html", "write_report"]
