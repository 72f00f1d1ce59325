"""The study report: the registered sections (reports.sections.SECTIONS) run over one
warehouse, then rendered (reports.render) to one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path

from query import Warehouse
from reports.context import Ctx
from reports.model import Report, ReportError, Section, visible
from reports.render import render_html, write_html
from reports.sections import SECTIONS

__all__ = ["Report", "ReportError", "Section", "build", "render_html", "visible", "write_html", "write_report"]


def build(warehouse: Path | str, words: tuple[str, ...] = ("cat", "dog"), title: str | None = None) -> Report:
    """Run every registered section over the warehouse (no HTML yet)."""
    with Warehouse(warehouse) as wh:
        if wh.sql("SELECT count(*) AS n FROM prompts")["n"][0] == 0:
            raise ReportError(f"{wh.path} holds no finished prompt yet (was the extraction stopped early?); "
                              f"run `echowh extract --out {wh.path} --resume` first")
        ctx = Ctx.open(wh, tuple(words))
        parts = [s for section in SECTIONS for s in section(ctx)]
    model_name = ctx.manifest.get("model", {}).get("model", "model")
    return Report(title or f"echo-warehouse report: {model_name}", parts, ctx.findings)


def write_report(warehouse: Path | str, out: Path | str, words: tuple[str, ...] = ("cat", "dog"),
                 title: str | None = None) -> Path:
    """Build and write the report; the file is written under a temporary name and renamed."""
    return write_html(render_html(build(warehouse, words, title)), out)
