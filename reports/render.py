"""Rendering a :class:`Report` to one self-contained HTML page (the Jinja template
reports/templates/report.html.jinja, autoescaped) and writing it whole or not at all.

The Vega/Vega-Lite/Vega-Embed libraries are inlined from vl-convert-python and every chart's
data is in its spec, so the file opens offline and fetches nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import polars as pl
import vl_convert as vlc
from markupsafe import Markup

from reports.model import Report, ReportError, visible

MAX_ROWS = 40  # table rows shown; the rest are one `echowh query -a` away

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("reports", "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


@dataclass
class Table:
    """A frame as the template shows it: formatted cells, at most MAX_ROWS rows."""

    name: str
    columns: list[str]
    rows: list[list[str]]
    n_more: int


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _cell(v: Any, is_token: bool) -> str:
    """A cell's text; token-text columns (``*_text``, ``*_texts``) with visible whitespace."""
    if is_token and isinstance(v, str):
        v = visible(v)
    elif is_token and isinstance(v, list):
        v = [visible(x) if isinstance(x, str) else x for x in v]
    return _fmt(v)


def _table(name: str, df: pl.DataFrame) -> Table:
    tok = [c.endswith(("_text", "_texts")) for c in df.columns]
    rows = [[_cell(v, t) for v, t in zip(row, tok, strict=True)] for row in df.head(MAX_ROWS).rows()]
    return Table(name, list(df.columns), rows, max(0, df.height - MAX_ROWS))


def _script_safe(text: str, closer: str = "</") -> Markup:
    """Text for inside a <script> element, ``closer`` escaped so that nothing can end it early
    (the JSON payload: every '</'; the library bundle: '</script', as its code may hold '</')."""
    return Markup(text.replace(closer, closer.replace("/", "\\/")))


def render_html(report: Report) -> str:
    """One HTML document: the inlined chart libraries, the findings by question, the sections
    with their charts (a placeholder div per chart, drawn by vegaEmbed) and tables."""
    specs: dict[str, dict] = {}
    sections = []
    for si, s in enumerate(report.sections):
        ids = []
        for c in s.charts:
            cid = f"chart{len(specs)}"
            spec = c.to_dict()
            spec.pop("$schema", None)  # metadata only; keeps the file free of external URLs
            specs[cid] = spec
            ids.append(cid)
        sections.append({"id": f"s{si}", "section": s, "chart_ids": ids,
                         "tables": [_table(name, df) for name, df in s.tables]})
    return _ENV.get_template("report.html.jinja").render(
        title=report.title, findings=report.findings, sections=sections,
        bundle=_script_safe(vlc.javascript_bundle(), "</script"), specs=_script_safe(json.dumps(specs)))


def write_html(text: str, out: Path | str) -> Path:
    """Write a rendered report to ``out`` under a temporary name, then rename it over ``out``:
    the file is whole or absent. Creates the parent directory; failures are a ReportError."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write {out}: {e.strerror or e}") from None
    return out
