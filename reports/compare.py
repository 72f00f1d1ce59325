"""The comparison report: several warehouses -> comparison sections, then each model's own study.

Every chart and table of the comparison sections is a ``compare_*`` analysis (or the
``models`` view, or a single-warehouse analysis run per model) over ``query.Comparison``; the
findings are sentences filled in from those same frames. Models of different depths are put
on one axis by relative depth, ``layer / n_layers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import altair as alt
import polars as pl

from query import Comparison, WarehouseArg
from reports.report import Report, ReportError, Section, build, render_html, write_html

WIDTH = 560
SINK_THRESHOLD = 0.3  # Gu et al. 2025: a head is a sink when its mean attention to position 0 exceeds 0.3


def _data(df: pl.DataFrame) -> alt.Data:
    return alt.Data(values=df.to_dicts())


def _model_scale(labels: list[str]) -> alt.Scale:
    return alt.Scale(domain=labels, scheme="category10")


def _pct(n: int, d: int) -> str:
    return f"{n}/{d} ({n / d:.0%})" if d else "0/0"


# -- sections ------------------------------------------------------------------------------
def _models_section(c: Comparison) -> tuple[Section, list[str]]:
    models = c.sql("SELECT model, model_id, model_type, n_layers, n_heads, n_kv_heads, d_model, vocab_size, "
                   "n_prompts, n_ablated FROM models")
    order = {label: i for i, label in enumerate(c.labels)}
    models = models.sort(pl.col("model").replace_strict(order, return_dtype=pl.Int32))
    val = _in_order(c.run_analysis("validation_summary"), c.labels)
    failed = val.filter(pl.col("n_passed") < pl.col("n_prompts"))
    findings = ["Models compared: " + "; ".join(
        f"{r['model']} ({r['model_type']}, {r['n_layers']} layers × {r['n_heads']} heads, d_model {r['d_model']}, "
        f"{r['n_prompts']} prompts)" for r in models.iter_rows(named=True)) + "."]
    if failed.height == 0:
        findings.append(f"Every invariant holds on every prompt of every model (largest relative error "
                        f"{val['max_rel_err'].max():.2g}).")
    else:
        findings.append("Validation FAILED: " + ", ".join(
            f"{r['model']}: {r['invariant']}" for r in failed.iter_rows(named=True)) + ".")
    return Section("Models compared", "One row per warehouse (the models view); the invariants of each "
                   "(validation_summary, run on each warehouse alone).",
                   tables=[("models", models), ("validation_summary per model", val)]), findings


def _echo_section(c: Comparison) -> tuple[Section, list[str]]:
    acc = _in_order(c.run_analysis("compare_echo_accuracy"), c.labels)
    words = c.run_analysis("compare_echo_words")
    chart = alt.Chart(_data(acc.with_columns(pl.col("template_index").cast(pl.Utf8).alias("template_no"))),
                      title="Echo accuracy per template (continuation starts with the word)").mark_bar().encode(
        x=alt.X("template_no:N", title="template"), xOffset="model:N",
        y=alt.Y("echo_accuracy:Q", title="echo accuracy", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("model:N", scale=_model_scale(c.labels), legend=alt.Legend(orient="bottom")),
        tooltip=["model:N", "template:N", "n_prompts:Q", "n_echo_correct:Q",
                 alt.Tooltip("echo_accuracy:Q", format=".2f"), alt.Tooltip("first_token_accuracy:Q", format=".2f")],
    ).properties(width=WIDTH, height=220)
    findings = []
    for t in sorted(set(acc["template_index"].to_list())):
        rows = acc.filter(pl.col("template_index") == t)
        findings.append(f"Template {t}: " + "; ".join(
            f"{r['model']} echoes {_pct(r['n_echo_correct'], r['n_prompts'])} (first token = target for "
            f"{r['n_echo_first_token']})" for r in _in_order(rows, c.labels).iter_rows(named=True)) + ".")
    shared = words.filter(pl.col("n_models") == len(c.labels))
    disagree = shared.filter(~pl.col("agree"))
    if len(c.labels) > 1:
        findings.append(f"The models disagree on {disagree.height} of the {shared.height} (word, template) pairs "
                        "they all ran.")
    return Section("Echo accuracy by model", "Greedy continuation per model and template (compare_echo_accuracy; "
                   "each model's own template text: a base model may run a few-shot form), and the words on which "
                   "the models disagree (compare_echo_words).", charts=[chart],
                   tables=[("compare_echo_accuracy", acc), ("Words the models disagree on", disagree)]), findings


def _emergence_section(c: Comparison) -> tuple[Section, list[str]]:
    summary = _in_order(c.run_analysis("compare_emergence"), c.labels)
    per_prompt = c.run_analysis("compare_emergence_prompts").drop_nulls("rel_depth")
    chart = alt.Chart(_data(per_prompt.with_columns(pl.col("template_index").cast(pl.Utf8).alias("template_no"))),
                      title="Emergence layer / n_layers, per prompt (prompts whose answer is the target)").mark_tick(
        thickness=2).encode(
        x=alt.X("rel_depth:Q", title="relative depth of the emergence layer (layer / n_layers)",
                scale=alt.Scale(domain=[-0.1, 1])),
        y=alt.Y("model:N", sort=c.labels, title=None), yOffset="template_no:N",
        color=alt.Color("template_no:N", title="template", legend=alt.Legend(orient="bottom")),
        tooltip=["model:N", "word:N", "template_no:N", "emergence_layer:Q", "n_layers:Q",
                 alt.Tooltip("rel_depth:Q", format=".2f")],
    ).properties(width=WIDTH, height=40 * max(1, len(c.labels)) + 40)
    findings = []
    for r in _in_order(summary, c.labels).iter_rows(named=True):
        if r["n_emerged"]:
            findings.append(f"{r['model']}, template {r['template_index']}: the target emerges for "
                            f"{_pct(r['n_emerged'], r['n_prompts'])} prompts, at median layer {r['median_layer']:g} "
                            f"of {r['n_layers']} (relative depth {r['median_rel_depth']:.2f}).")
        else:
            findings.append(f"{r['model']}, template {r['template_index']}: the target never ends top-1 "
                            f"({r['n_prompts']} prompts).")
    med = (per_prompt.group_by("model").agg(pl.col("rel_depth").median().alias("m"), pl.len().alias("n")))
    if med.height >= 2:
        med = _in_order(med, c.labels)
        first, last = med.sort("m").row(0, named=True), med.sort("m").row(-1, named=True)
        if first["m"] == last["m"]:
            findings.append(f"Over all templates the target emerges at the same median relative depth "
                            f"({first['m']:.2f}) in every model.")
        else:
            findings.append(f"Over all templates the target emerges earliest, relative to depth, in {first['model']} "
                            f"(median {first['m']:.2f}) and latest in {last['model']} (median {last['m']:.2f}).")
    return Section("Emergence at relative depth", "The first layer from which the logit lens keeps the target "
                   "top-1, divided by the model's number of blocks (compare_emergence, compare_emergence_prompts).",
                   charts=[chart], tables=[("compare_emergence", summary)]), findings


def _heads_section(c: Comparison, has_ablation: bool) -> tuple[Section, list[str]]:
    top = _in_order(c.run_analysis("compare_top_heads", top=5), c.labels)
    top = top.with_columns((pl.lit("L") + pl.col("layer").cast(pl.Utf8) + pl.lit("H")
                            + pl.col("head").cast(pl.Utf8)).alias("unit"),
                           pl.coalesce(pl.when(pl.col("measure") == "ablation").then(pl.col("mean_logit_diff")),
                                       pl.col("mean_dla")).alias("value"))
    chart = alt.Chart(_data(top.select("model", "measure", "rank", "unit", "rel_depth", "value")),
                      title="Top heads per model at relative depth (value: mean ablation effect or mean DLA)").mark_point(
        filled=True, size=70).encode(
        x=alt.X("rel_depth:Q", title="relative depth (layer / n_layers)", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("value:Q", title="mean effect on the target logit"),
        color=alt.Color("model:N", scale=_model_scale(c.labels), legend=alt.Legend(orient="bottom")),
        shape=alt.Shape("measure:N"),
        tooltip=["model:N", "measure:N", "rank:Q", "unit:N", alt.Tooltip("rel_depth:Q", format=".2f"),
                 alt.Tooltip("value:Q", format=".3f")],
    ).properties(width=WIDTH, height=260)
    findings = []
    for label in c.labels:
        mine = top.filter((pl.col("model") == label) & (pl.col("rank") == 1))
        parts = []
        for r in mine.iter_rows(named=True):
            v = r["mean_logit_diff"] if r["measure"] == "ablation" else r["mean_dla"]
            what = "ablation effect" if r["measure"] == "ablation" else "DLA"
            parts.append(f"by {what}, {r['unit']} at relative depth {r['rel_depth']:.2f} (mean {v:.3f})")
        if parts:
            findings.append(f"{label}'s top head: " + "; ".join(parts) + ".")
        if not mine.filter(pl.col("measure") == "ablation").height:
            findings.append(f"{label} has no ablation data: its heads are ranked by DLA only.")
    note = "" if has_ablation else "No warehouse has ablation data: heads are ranked by DLA only."
    return Section("Top heads at relative depth", "Each model's five heads with the largest mean ablation effect "
                   "(zero ablation; ablated layers only) and the largest mean DLA, placed at layer / n_layers "
                   "(compare_top_heads).", charts=[chart], tables=[("compare_top_heads", top.drop("unit", "value"))],
                   note=note), findings


def _attention_section(c: Comparison) -> tuple[Section, list[str]]:
    att = c.run_analysis("compare_first_token_attention")
    prof = _in_order(c.run_analysis("compare_depth_profile", bins=10, threshold=SINK_THRESHOLD), c.labels)
    heat = alt.Chart(_data(att.select("model", "layer", "head", "rel_depth", "mean_mass_first")),
                     title="Attention from the last position to position 0, per head (x: layer / n_layers in "
                           "bins of 0.05; a bin holding two layers shows the larger)").mark_rect(
    ).encode(
        x=alt.X("rel_depth:Q", bin=alt.Bin(step=0.05), title="relative depth (layer / n_layers, bins of 0.05)"),
        y=alt.Y("head:O", title="head"),
        color=alt.Color("mean_mass_first:Q", aggregate="max", title="attention on position 0",
                        scale=alt.Scale(scheme="greys", domain=[0, 1])),
        row=alt.Row("model:N", sort=c.labels, title=None),
        tooltip=["model:N", "layer:Q", "head:Q", alt.Tooltip("mean_mass_first:Q", aggregate="max", format=".3f")],
    ).properties(width=WIDTH, height=120)
    line = alt.Chart(_data(prof.select("model", "rel_lo", "mean_mass_first", "sink_share")),
                     title=f"Per tenth of depth: mean attention on position 0 and the share of heads ≥ {SINK_THRESHOLD}").mark_line(
        point=True).encode(
        x=alt.X("rel_lo:Q", title="relative depth (bin start)", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("sink_share:Q", title=f"share of heads with mean ≥ {SINK_THRESHOLD}", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("model:N", scale=_model_scale(c.labels), legend=alt.Legend(orient="bottom")),
        tooltip=["model:N", "rel_lo:Q", alt.Tooltip("mean_mass_first:Q", format=".3f"),
                 alt.Tooltip("sink_share:Q", format=".2f")],
    ).properties(width=WIDTH, height=200)
    findings = []
    for label in c.labels:
        mine = att.filter(pl.col("model") == label)
        if not mine.height:
            continue
        n_sink = mine.filter(pl.col("mean_mass_first") >= SINK_THRESHOLD).height
        best = mine.sort("mean_mass_first", descending=True).row(0, named=True)
        findings.append(f"{label}: {_pct(n_sink, mine.height)} heads put at least {SINK_THRESHOLD} of the last "
                        f"position's attention on position 0 (Gu et al. 2025's sink criterion); the strongest is "
                        f"L{best['layer']}H{best['head']} at relative depth {best['rel_depth']:.2f} "
                        f"({best['mean_mass_first']:.1%}).")
    return Section("First-token attention at relative depth", "Every head's mean attention from the last position "
                   "to position 0 with its block's relative depth (compare_first_token_attention), and the depth "
                   "profile in tenths of depth (compare_depth_profile).", charts=[heat, line],
                   tables=[("compare_depth_profile", prof)]), findings


def _in_order(df: pl.DataFrame, labels: list[str]) -> pl.DataFrame:
    """Rows in the order the warehouses were given (stable within a model)."""
    order = {label: i for i, label in enumerate(labels)}
    return df.with_row_index("_i").sort(pl.col("model").replace_strict(order, return_dtype=pl.Int32), "_i").drop("_i")


# -- the report --------------------------------------------------------------------------------
def comparison_sections(c: Comparison) -> tuple[list[Section], list[str]]:
    """The comparison sections and their findings, from the open comparison's analyses."""
    empty = c.sql("SELECT model FROM models WHERE n_prompts = 0")["model"].to_list()
    if empty:
        raise ReportError(f"{', '.join(empty)}: no finished prompt yet (was the extraction stopped early?); "
                          "resume it with `echowh extract --resume` first")
    has_ablation = c.sql("SELECT count(*) AS n FROM models WHERE n_ablated > 0")["n"][0] > 0
    sections, findings = [], []
    for make in (_models_section, _echo_section, _emergence_section,
                 lambda cc: _heads_section(cc, has_ablation), _attention_section):
        s, f = make(c)
        sections.append(s)
        findings += f
    return sections, findings


def build_comparison(warehouses: Sequence[WarehouseArg | Path | str], words: tuple[str, ...] = ("cat", "dog"),
                     title: str | None = None, per_model: bool = True) -> Report:
    """The comparison sections, then (``per_model``) each model's own report under its label."""
    with Comparison(list(warehouses)) as c:
        sections, findings = comparison_sections(c)
        labels = list(c.labels)
        paths = [m.path for m in c.members]
    if per_model:
        for label, path in zip(labels, paths, strict=True):
            own = build(path, words)
            for s in own.sections:
                s.title = f"{label}: {s.title}"
            sections += own.sections
            findings += [f"{label}: {f}" for f in own.findings]
    return Report(title or f"echo-warehouse comparison: {' vs '.join(labels)}", sections, findings)


def write_comparison(warehouses: Sequence[WarehouseArg | Path | str], out: Path | str,
                     words: tuple[str, ...] = ("cat", "dog"), title: str | None = None,
                     per_model: bool = True) -> Path:
    """Build and write the comparison report (under a temporary name, then renamed)."""
    return write_html(render_html(build_comparison(warehouses, words, title, per_model)), out)
