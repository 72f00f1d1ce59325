"""The comparison report (``echowh report -w A -w B``): comparison sections over several
warehouses, then each model's own study.

Same convention as the study report: every section is a function ``sections(ctx: CompareCtx)
-> list[Section]`` in its own module here, registered in ``COMPARE_SECTIONS``; it reads only
``compare_*`` analyses (or the ``models`` view, or a single-warehouse analysis run per model)
through ``query.Comparison`` and writes its findings to ``ctx.findings`` under the question
they answer. Models of different depths share one axis by relative depth, ``layer /
n_layers``. Each model's own findings are merged under the same questions, under its label;
the page is the same template (reports.render).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from query import Comparison, WarehouseArg
from reports.compare import attention, echo, emergence, heads, models
from reports.compare.context import CompareCtx
from reports.model import Report, ReportError, Section
from reports.render import render_html, write_html
from reports.report import build

COMPARE_SECTIONS: tuple[Callable[[CompareCtx], list[Section]], ...] = (
    models.sections,     # Models compared
    echo.sections,       # Echo accuracy by model                   (does each model echo?)
    emergence.sections,  # Emergence at relative depth              (where does the answer appear?)
    heads.sections,      # Top heads at relative depth              (which heads matter?)
    attention.sections,  # First-token attention at relative depth  (is position 0 a sink?)
)


def comparison_sections(c: Comparison) -> tuple[list[Section], CompareCtx]:
    """The comparison sections, and the context holding their findings."""
    empty = c.sql("SELECT model FROM models WHERE n_prompts = 0")["model"].to_list()
    if empty:
        raise ReportError(f"{', '.join(empty)}: no finished prompt yet (was the extraction stopped early?); "
                          "resume it with `echowh extract --resume` first")
    has_ablation = c.sql("SELECT count(*) AS n FROM models WHERE n_ablated > 0")["n"][0] > 0
    ctx = CompareCtx(c, bool(has_ablation))
    return [s for section in COMPARE_SECTIONS for s in section(ctx)], ctx


def build_comparison(warehouses: Sequence[WarehouseArg | Path | str], words: tuple[str, ...] = ("cat", "dog"),
                     title: str | None = None, per_model: bool = True) -> Report:
    """The comparison sections, then (``per_model``) each model's own report under its label."""
    with Comparison(list(warehouses)) as c:
        sections, ctx = comparison_sections(c)
        labels = list(ctx.labels)
        paths = [m.path for m in c.members]
    findings = ctx.findings
    if per_model:
        for label, path in zip(labels, paths, strict=True):
            own = build(path, words)
            for s in own.sections:
                s.title = f"{label}: {s.title}"
            sections += own.sections
            findings.merge(own.findings, label)
    return Report(title or f"echo-warehouse comparison: {' vs '.join(labels)}", sections, findings)


def write_comparison(warehouses: Sequence[WarehouseArg | Path | str], out: Path | str,
                     words: tuple[str, ...] = ("cat", "dog"), title: str | None = None,
                     per_model: bool = True) -> Path:
    """Build and write the comparison report (under a temporary name, then renamed)."""
    return write_html(render_html(build_comparison(warehouses, words, title, per_model)), out)
