"""The study report: named analyses -> Altair charts and tables -> one self-contained HTML file.

Every chart and table is a named analysis' result (query/analyses/*.sql); the findings are
sentences filled in from those same frames. The Vega/Vega-Lite/Vega-Embed libraries are
inlined from vl-convert-python, so the file opens offline and fetches nothing.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import polars as pl
import vl_convert as vlc

from query import Warehouse
from reports.model import Report, ReportError, Section, visible
from reports.sections import SECTIONS, Ctx, ablation_info

__all__ = ["Report", "ReportError", "Section", "build", "render_html", "visible", "write_html", "write_report"]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _is_token_column(name: str) -> bool:
    return name.endswith(("_text", "_texts"))


def _table_html(df: pl.DataFrame, max_rows: int = 40) -> str:
    """A table; token-text columns (``*_text``, ``*_texts``) with visible whitespace."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    tok = [_is_token_column(c) for c in df.columns]

    def cell(v: Any, is_tok: bool) -> str:
        if is_tok and isinstance(v, str):
            v = visible(v)
        elif is_tok and isinstance(v, list):
            v = [visible(x) if isinstance(x, str) else x for x in v]
        return f"<td>{html.escape(_fmt(v))}</td>"

    rows = "".join(
        "<tr>" + "".join(cell(v, t) for v, t in zip(row, tok, strict=True)) + "</tr>"
        for row in df.head(max_rows).rows()
    )
    more = f"<p class='more'>{df.height - max_rows} more rows: run the analysis with <code>echowh query -a</code>.</p>" \
        if df.height > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{more}"


def _manifest(wh: Warehouse) -> dict[str, Any]:
    df = wh.sql("SELECT key, value FROM manifest")
    return {k: json.loads(v) for k, v in df.rows()}


def build(warehouse: Path | str, words: tuple[str, ...] = ("cat", "dog"), title: str | None = None) -> Report:
    """Run the analyses and assemble the report's sections (no HTML yet)."""
    with Warehouse(warehouse) as wh:
        if wh.sql("SELECT count(*) AS n FROM prompts")["n"][0] == 0:
            raise ReportError(f"{wh.path} holds no finished prompt yet (was the extraction stopped early?); "
                              f"run `echowh extract --out {wh.path} --resume` first")
        ctx = Ctx(wh, _manifest(wh), tuple(words), ablation_info(wh))
        parts = [s for section in SECTIONS for s in section(ctx)]
    model_name = ctx.manifest.get("model", {}).get("model", "model")
    return Report(title or f"echo-warehouse report: {model_name}", parts, ctx.findings)


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0 1em} td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left}
th{background:#f4f4f4} .note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}
.chart{margin:1em 0} .more{font-size:.8em;color:#666} ul.findings li{margin:.3em 0}
"""


def render_html(report: Report) -> str:
    """One HTML document: the inlined chart libraries, the specs, the tables and the findings."""
    parts = [f"<h1>{html.escape(report.title)}</h1>", "<h2 id='findings'>Findings</h2><ul class='findings'>"]
    parts += [f"<li>{html.escape(f)}</li>" for f in report.findings]
    parts.append("</ul>")
    specs: list[tuple[str, dict]] = []
    for si, s in enumerate(report.sections):
        parts.append(f"<h2 id='s{si}'>{html.escape(s.title)}</h2>")
        if s.intro:
            parts.append(f"<p>{html.escape(s.intro)}</p>")
        if s.note:
            parts.append(f"<p class='note'>{html.escape(s.note)}</p>")
        for c in s.charts:
            cid = f"chart{len(specs)}"
            spec = c.to_dict()
            spec.pop("$schema", None)  # metadata only; keeps the file free of external URLs
            specs.append((cid, spec))
            parts.append(f"<div class='chart' id='{cid}'></div>")
        for name, df in s.tables:
            parts.append(f"<h3>{html.escape(name)}</h3>{_table_html(df)}")
    payload = json.dumps(dict(specs)).replace("</", "<\\/")
    # When every chart has settled, <body> gets data-charts-rendered / data-render-ms: the
    # browser test and benchmarks/bench_report.py read them from the dumped DOM.
    script = ("const SPECS = " + payload + ";\n"
              "const jobs = Object.entries(SPECS).map(([id, spec]) =>\n"
              "  vegaEmbed('#' + id, spec, {renderer: 'svg', actions: false}).then(() => 1)\n"
              "    .catch(e => { const el = document.getElementById(id);\n"
              "                  el.setAttribute('data-failed', 'yes'); el.textContent = 'chart failed: ' + e;\n"
              "                  return 0; }));\n"
              "Promise.all(jobs).then(ok => {\n"
              "  document.body.dataset.chartsRendered = ok.reduce((a, b) => a + b, 0);\n"
              "  document.body.dataset.renderMs = Math.round(performance.now());\n"
              "});\n")
    bundle = vlc.javascript_bundle().replace("</script", "<\\/script")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(report.title)}</title><style>{STYLE}</style>"
            f"<script>{bundle}</script></head><body>{''.join(parts)}"
            f"<script>{script}</script></body></html>")


def write_report(warehouse: Path | str, out: Path | str, words: tuple[str, ...] = ("cat", "dog"),
                 title: str | None = None) -> Path:
    """Build and write the report; the file is written under a temporary name and renamed."""
    return write_html(render_html(build(warehouse, words, title)), out)


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
