"""The HTML report: named analyses (through query) -> Altair charts -> one self-contained file."""

from reports.report import Report, ReportError, Section, build, render_html, write_report

__all__ = ["Report", "ReportError", "Section", "build", "render_html", "write_report"]
