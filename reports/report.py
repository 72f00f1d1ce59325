"""The study report: named analyses -> Altair charts and tables -> one self-contained HTML file.

Every chart and table is a named analysis' result (query/analyses/*.sql); the findings are
sentences filled in from those same frames. The Vega/Vega-Lite/Vega-Embed libraries are
inlined from vl-convert-python, so the file opens offline and fetches nothing.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl
import vl_convert as vlc

from query import Warehouse
from reports import charts
from reports.sinks import sink_sections


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


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def visible(text: str | None) -> str | None:
    """Token text with its whitespace shown: ' cat' and 'cat' are different tokens, and the
    study's flips are often just that (a leading space, a capital). HTML would hide it."""
    if text is None:
        return None
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


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
        return _build(wh, words, title)


def _build(wh: Warehouse, words: tuple[str, ...], title: str | None) -> Report:
    m = _manifest(wh)
    templates: list[str] = m.get("templates", [])
    model = m.get("model", {})
    run = lambda name, **p: wh.run_analysis(name, **p)  # noqa: E731
    if wh.sql("SELECT count(*) AS n FROM prompts")["n"][0] == 0:
        raise ReportError(f"{wh.path} holds no finished prompt yet (was the extraction stopped early?); "
                          f"run `echowh extract --out {wh.path} --resume` first")
    has_ablation = wh.sql("SELECT count(*) AS n FROM ablation")["n"][0] > 0
    findings: list[str] = []
    sections: list[Section] = []

    # -- run summary -----------------------------------------------------------------------
    val = run("validation_summary")
    prompts = wh.sql("SELECT count(*) AS n, count(DISTINCT word) AS w FROM prompts").row(0)
    cfg = m.get("config", {})
    word_list = wh.sql("SELECT word FROM prompts GROUP BY word ORDER BY min(prompt)")["word"].to_list()
    first_tokens = ", ".join(repr(t) for t in wh.sql(
        "SELECT DISTINCT token_text FROM tokens WHERE position = 0 ORDER BY 1")["token_text"].to_list())
    summary = pl.DataFrame({
        "item": ["model", "layers × heads (KV heads)", "d_model", "dtype", "prompts", "templates", "words",
                 "chat template", "token at position 0", "ablation", "extraction time", "status"],
        "value": [str(model.get("model")), f"{model.get('n_layers')} × {model.get('n_heads')} ({model.get('n_kv_heads')})",
                  str(model.get("d_model")), str(model.get("dtype")),
                  f"{prompts[0]} ({prompts[1]} words × {len(templates)} templates)", " | ".join(templates),
                  ", ".join(word_list),
                  "on" if cfg.get("chat_template", True) else "off", first_tokens,
                  f"{','.join(cfg.get('ablation', [])) or 'none'} ({cfg.get('ablate_positions', '')} positions)",
                  _duration(m.get("timings", {})), str(m.get("status"))],
    })
    ok = val.filter(pl.col("n_passed") < pl.col("n_prompts")).height == 0
    sections.append(Section("Run summary", "The run's manifest and the invariants checked on every prompt.",
                            tables=[("Run", summary), ("Validation (validation_summary)", val)]))
    findings.append(
        f"All {len(val)} invariants hold on every prompt (largest relative error "
        f"{val['max_rel_err'].max():.2g})." if ok else
        f"Validation FAILED: {', '.join(val.filter(pl.col('n_passed') < pl.col('n_prompts'))['invariant'])}.")

    # -- echo behaviour --------------------------------------------------------------------
    eb = run("echo_behaviour")
    agree = run("echo_agreement")
    sections.append(Section(
        "Echo behaviour", "Greedy continuation per template: first token = target, continuation starts "
        "with the word, continuation is exactly the word (echo_behaviour); words where the templates "
        "disagree (echo_agreement).",
        charts=[charts.accuracy_bars(eb)],
        tables=[("echo_behaviour", eb),
                ("Words whose templates give different first tokens (echo_agreement)",
                 agree.filter(~pl.col("same_top1")))]))
    for r in eb.iter_rows(named=True):
        findings.append(f"“{r['template']}”: the first token is the word for {r['n_echo_first_token']} of "
                        f"{r['n_prompts']} prompts ({r['first_token_accuracy']:.0%}); the continuation starts "
                        f"with the word for {r['n_echo_correct']}.")

    # -- emergence -------------------------------------------------------------------------
    counts = run("emergence_counts")
    sections.append(Section("Emergence layer", "Per prompt, the first layer from which the logit lens keeps "
                            "the target at rank 0 through the last layer (emergence_counts; 'never': the model's "
                            "final top-1 is not the target).", charts=[charts.emergence_histogram(counts, templates)]))
    for t in sorted(set(counts["template_index"].to_list())):
        c = counts.filter((pl.col("template_index") == t) & pl.col("emergence_layer").is_not_null())
        if c.height:
            top = c.sort("n_prompts", descending=True).row(0, named=True)
            findings.append(f"“{templates[t] if t < len(templates) else t}”: the target most often emerges at layer "
                            f"{top['emergence_layer']} ({top['n_prompts']} of {c['n_prompts'].sum()} prompts whose "
                            "answer is the target).")

    # -- logit lens ------------------------------------------------------------------------
    lens = run("lens_target")
    traj_charts = []
    known = set(wh.sql("SELECT DISTINCT word FROM prompts")["word"].to_list())
    missing = [w for w in words if w not in known]
    for w in words:
        for t in range(len(templates)):
            tr = run("lens_trajectory", word=w, template_index=t, k=3)
            tr = tr.with_columns(pl.col("token_text").map_elements(visible, return_dtype=pl.Utf8))
            if tr.height:
                traj_charts.append(charts.lens_trajectory(tr, f"“{w}”, template {t}: logit-lens top-3 per layer (target in red)"))
    sections.append(Section("Logit lens", "Target probability and rank under the logit lens (lens_target), and "
                            f"the top-3 tokens per layer for {', '.join(words)} (lens_trajectory; ␣ marks a space).",
                            charts=[charts.lens_heatmap(lens), charts.lens_rank_heatmap(lens), *traj_charts],
                            note=f"Not in this prompt set: {', '.join(missing)}." if missing else ""))

    # -- DLA -------------------------------------------------------------------------------
    grid = run("head_dla_grid")
    sections.append(Section("Direct logit attribution per head", "Mean DLA of every head to each prompt's target "
                            "(head_dla_grid).", charts=[charts.layer_head_heatmap(grid, "mean_dla", "Mean DLA per head")]))
    best = grid.sort("mean_dla", descending=True).row(0, named=True)
    findings.append(f"The head with the largest mean DLA is L{best['layer']}H{best['head']} ({best['mean_dla']:.3f}).")

    # -- DLA vs ablation, consistency, blocks, flips ---------------------------------------
    cons = run("top_heads_consistency")
    if has_ablation:
        dva = run("dla_vs_ablation_heads")
        corr = run("dla_vs_ablation_corr")
        blocks = run("block_ablation")
        flips = run("ablation_flips")
        sections.append(Section("DLA vs ablation", "Each head's mean DLA against the mean drop of the target logit "
                                "when it is zero-ablated (dla_vs_ablation_heads); heads far above the dashed diagonal "
                                "act indirectly, through later layers. Rank correlation per layer: dla_vs_ablation_corr.",
                                charts=[charts.dla_vs_ablation_scatter(dva)],
                                tables=[("Top heads by ablation effect", dva.head(10)),
                                        ("Spearman(DLA, ablation) per layer", corr)]))
        top = dva.row(0, named=True)
        findings.append(f"Ablating L{top['layer']}H{top['head']} lowers the target logit most (by {top['mean_logit_diff']:.2f} "
                        f"on average) while its mean DLA is {top['mean_dla']:.3f} (DLA rank {top['dla_rank']} of {dva.height}).")
        if corr.height:
            findings.append(f"Across layers the median per-prompt Spearman correlation between DLA and ablation is "
                            f"{corr['median_spearman'].median():.2f}: the two measures "
                            f"{'largely disagree' if corr['median_spearman'].median() < 0.5 else 'mostly agree'}.")
        mode_layer = _most_common_emergence_layer(counts)
        cons_at = run("top_heads_consistency", layer=mode_layer) if mode_layer is not None else None
        cons_charts = [charts.top_heads_bars(cons)]
        cons_tables = [("top_heads_consistency (each prompt's emergence layer)", cons)]
        if cons_at is not None and cons_at["n_prompts_ablation"].max():
            cons_charts.append(charts.top_heads_bars(
                cons_at, f"How often each head of layer {mode_layer} (the most common emergence layer) is in the top 3"))
            cons_tables.append((f"top_heads_consistency(layer={mode_layer})", cons_at))
        sections.append(Section("Top-head consistency", "How often each head is among the top 3 by ablation and by "
                                "DLA, at each prompt's own emergence layer and at the most common emergence layer "
                                "(top_heads_consistency).", charts=cons_charts, tables=cons_tables))
        c = cons.sort("n_top_ablation", descending=True).row(0, named=True)
        layer_txt = _emergence_layer_text(counts)
        if not c["n_prompts_ablation"]:
            findings.append("No prompt's target emerges under the logit lens at an ablated layer, so heads "
                            "cannot be ranked at an emergence layer.")
        else:
            findings.append(f"Head {c['head']} (at the emergence layer{layer_txt}) is in the top 3 by ablation for "
                            f"{c['n_top_ablation']} of {c['n_prompts_ablation']} prompts, and in the top 3 by DLA "
                            f"for {c['n_top_dla']} of {c['n_prompts_dla']}.")
        if cons_at is not None and cons_at["n_prompts_ablation"].max():
            a = cons_at.sort("n_top_ablation", descending=True).row(0, named=True)
            findings.append(f"At layer {mode_layer}, head L{mode_layer}H{a['head']} is in the top 3 by ablation for "
                            f"{a['n_top_ablation']} of {a['n_prompts_ablation']} prompts (top 3 by DLA for "
                            f"{a['n_top_dla']} of {a['n_prompts_dla']}).")
        sections.append(Section("Attention vs MLP blocks", "Removing a whole block per layer (block_ablation).",
                                charts=[charts.block_ablation_lines(blocks)]))
        worst = blocks.sort("mean_kl", descending=True).row(0, named=True)
        findings.append(f"The most damaging single block is the {worst['unit_kind'].upper()} of layer {worst['layer']} "
                        f"(mean KL {worst['mean_kl']:.2f} nats; top-1 changes for {worst['frac_top1_changed']:.0%} of prompts).")
        by_kind = blocks.group_by("unit_kind").agg(pl.col("mean_kl").sum()).sort("unit_kind")
        kinds = dict(by_kind.rows())
        if "mlp" in kinds and "attn" in kinds:
            findings.append(f"Summed over layers, MLP-block ablation costs {kinds['mlp']:.1f} nats of KL against "
                            f"{kinds['attn']:.1f} for attention blocks.")
        show = flips.sort("kl", descending=True).select("word", "template_index", "mode", "layer", "unit_kind", "head",
                                                        "clean_top1_text", "new_top1_text", "new_top1_prob", "kl")
        sections.append(Section("Ablation flips", f"{flips.height} (prompt, layer, unit) ablations change the top-1 token "
                                "(ablation_flips); the 30 with the largest KL:", tables=[("ablation_flips", show.head(30))]))
        heads_only = flips.filter(pl.col("unit_kind") == "head")
        findings.append(f"{heads_only.height} single-head ablations change the model's answer "
                        f"({heads_only.select('prompt').n_unique()} prompts affected).")
    else:
        note = "This warehouse has no ablation data (extracted with --ablation none): these sections are left out."
        sections.append(Section("DLA vs ablation", note=note))
        sections.append(Section("Top-head consistency", "DLA only (top_heads_consistency).",
                                charts=[charts.top_heads_bars(cons)], tables=[("top_heads_consistency", cons)],
                                note=note))
        sections.append(Section("Ablation flips", note=note))

    # -- attention to the first token --------------------------------------------------------
    att = run("first_token_attention_grid")
    first_tok = wh.sql("SELECT any_value(token_text) AS t FROM tokens WHERE position = 0")["t"][0]
    sections.append(Section("Attention to the first token", f"Mean attention weight from the last position to position 0 "
                            f"({visible(first_tok)!r}) for every head (first_token_attention_grid).",
                            charts=[charts.layer_head_heatmap(att, "mean_mass_first", "Attention on position 0",
                                                              scheme="greys", domain_mid=None)]))
    sink = att.sort("mean_mass_first", descending=True).row(0, named=True)
    n_sinks = att.filter(pl.col("mean_mass_first") >= 0.9 - 1e-6).height  # float32 0.9 < 0.9
    findings.append(f"L{sink['layer']}H{sink['head']} puts {sink['mean_mass_first']:.1%} of its attention on position 0 "
                    f"on average (at least {sink['min_mass_first']:.1%} on every prompt); {n_sinks} of {att.height} heads "
                    "put ≥90% there.")

    # -- attention sinks (reports.sinks) -----------------------------------------------------
    sink_secs, sink_finds = sink_sections(wh, Section, visible)
    sections += sink_secs
    findings += sink_finds

    # -- cosine ------------------------------------------------------------------------------
    cos_sections = []
    if len(templates) >= 2:
        rc = run("resid_cosine_by_layer")
        cos_sections.append(charts.cosine_by_layer(rc, "Last-token residual: cosine between the two templates, per word"))
        last = rc.sort("layer").row(-1, named=True)
        findings.append(f"The last-token residuals of the two templates have mean cosine {rc.sort('layer')['mean_cosine'][0]:.3f} "
                        f"at the embeddings and {last['mean_cosine']:.3f} after the last layer (minimum {last['min_cosine']:.3f}).")
    bos = run("bos_cosine")
    cos_sections.append(charts.cosine_by_layer(bos, "Position-0 residual: cosine across all pairs of prompts"))
    if bos.height and bos["n_first_tokens"][0] == 1:
        findings.append(f"Position 0 holds the same token in every prompt, and its residual has cosine ≥ "
                        f"{bos['min_cosine'].min():.4f} across prompts at every layer: by causal masking it cannot "
                        "carry prompt-specific information.")
    elif bos.height:
        findings.append(f"Position 0 holds {bos['n_first_tokens'][0]} different tokens across prompts; its residual's "
                        f"pairwise cosine goes down to {bos['min_cosine'].min():.4f}.")
    sections.append(Section("Residual cosine similarity", "resid_cosine_by_layer and bos_cosine.", charts=cos_sections))

    model_name = model.get("model", "model")
    return Report(title or f"echo-warehouse report: {model_name}", sections, findings)


def _duration(timings: dict[str, Any]) -> str:
    """Total run time, over every session when the run was resumed."""
    total = timings.get("total_s")
    if total is None:
        return "–"
    n = timings.get("sessions", 1)
    return f"{total:.1f} s" + (f" over {n} sessions (resumed)" if n > 1 else "")


def _most_common_emergence_layer(counts: pl.DataFrame) -> int | None:
    """The layer where the target most often emerges, over all templates (None: never emerges)."""
    c = (counts.drop_nulls("emergence_layer").group_by("emergence_layer").agg(pl.col("n_prompts").sum())
         .sort(["n_prompts", "emergence_layer"], descending=[True, False]))
    return int(c["emergence_layer"][0]) if c.height else None


def _emergence_layer_text(counts: pl.DataFrame) -> str:
    layers = sorted({x for x in counts["emergence_layer"].to_list() if x is not None})
    if len(layers) == 1:
        return f" {layers[0]}"
    return ""


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
    report = build(warehouse, words, title)
    out = Path(out)
    text = render_html(report)
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
