"""The report's sections: one function per section, each running its named analyses.

Every function takes the shared :class:`Ctx`, returns its sections and appends its findings
(sentences filled in from the same frames) to ``ctx.findings``. The ablation sections adapt to
whatever the warehouse holds: no ablation, zero and/or mean mode, all or last positions, a
subset of layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from query import Warehouse
from reports import charts, patching, sinks
from reports.model import Section, visible


@dataclass
class Ablation:
    """What the warehouse's ablation shards hold (empty ``modes``: no ablation data)."""

    modes: list[str]  # in the order zero, mean
    positions: list[str]  # 'all' and/or 'last'
    layers: list[int]

    @property
    def mode(self) -> str:
        """The mode the head-level sections show: zero when there, else mean."""
        return "zero" if "zero" in self.modes else self.modes[0]

    def describe(self) -> str:
        where = " and ".join(f"{p} positions" if p == "all" else "the last position only" for p in self.positions)
        return f"{'+'.join(self.modes)} ablation, unit removed at {where}, layers {_layer_ranges(self.layers)}"


@dataclass
class Ctx:
    """What every section reads: the warehouse, its manifest, and the findings so far."""

    wh: Warehouse
    manifest: dict[str, Any]
    words: tuple[str, ...]
    ablation: Ablation
    findings: list[str] = field(default_factory=list)
    counts: pl.DataFrame | None = None  # emergence_counts, shared by later sections

    @property
    def templates(self) -> list[str]:
        return self.manifest.get("templates", [])

    def run(self, name: str, **params: Any) -> pl.DataFrame:
        return self.wh.run_analysis(name, **params)


def ablation_info(wh: Warehouse) -> Ablation:
    # Unit-removal modes only: the sink modes have their own section (reports.sinks).
    rows = wh.sql("SELECT DISTINCT mode, positions FROM ablation WHERE mode IN ('zero', 'mean')").rows()
    modes = sorted({m for m, _ in rows}, key=lambda m: (m != "zero", m))
    positions = sorted({p for _, p in rows})
    layers = wh.sql("SELECT DISTINCT layer FROM ablation ORDER BY layer")["layer"].to_list() if rows else []
    return Ablation(modes, positions, layers)


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for x in layers:
        if out and x == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        else:
            out.append(str(x))
    return ", ".join(out)


def _duration(timings: dict[str, Any]) -> str:
    """Total run time, over every session when the run was resumed."""
    total = timings.get("total_s")
    if total is None:
        return "–"
    n = timings.get("sessions", 1)
    return f"{total:.1f} s" + (f" over {n} sessions (resumed)" if n > 1 else "")


def run_summary(ctx: Ctx) -> list[Section]:
    m, wh = ctx.manifest, ctx.wh
    model, cfg = m.get("model", {}), m.get("config", {})
    val = ctx.run("validation_summary")
    prompts = wh.sql("SELECT count(*) AS n, count(DISTINCT word) AS w FROM prompts").row(0)
    word_list = wh.sql("SELECT word FROM prompts GROUP BY word ORDER BY min(prompt)")["word"].to_list()
    first_tokens = ", ".join(repr(t) for t in wh.sql(
        "SELECT DISTINCT token_text FROM tokens WHERE position = 0 ORDER BY 1")["token_text"].to_list())
    summary = pl.DataFrame({
        "item": ["model", "layers × heads (KV heads)", "d_model", "dtype", "prompts", "templates", "words",
                 "chat template", "token at position 0", "ablation", "extraction time", "status"],
        "value": [str(model.get("model")),
                  f"{model.get('n_layers')} × {model.get('n_heads')} ({model.get('n_kv_heads')})",
                  str(model.get("d_model")), str(model.get("dtype")),
                  f"{prompts[0]} ({prompts[1]} words × {len(ctx.templates)} templates)", " | ".join(ctx.templates),
                  ", ".join(word_list), "on" if cfg.get("chat_template", True) else "off", first_tokens,
                  ctx.ablation.describe() if ctx.ablation.modes else "none",
                  _duration(m.get("timings", {})), str(m.get("status"))],
    })
    bad = val.filter(pl.col("n_passed") < pl.col("n_prompts"))
    ctx.findings.append(
        f"All {len(val)} invariants hold on every prompt (largest relative error {val['max_rel_err'].max():.2g})."
        if bad.height == 0 else f"Validation FAILED: {', '.join(bad['invariant'])}.")
    return [Section("Run summary", "The run's manifest and the invariants checked on every prompt.",
                    tables=[("Run", summary), ("Validation (validation_summary)", val)])]


def echo_behaviour(ctx: Ctx) -> list[Section]:
    eb = ctx.run("echo_behaviour")
    agree = ctx.run("echo_agreement")
    for r in eb.iter_rows(named=True):
        ctx.findings.append(f"“{r['template']}”: the first token is the word for {r['n_echo_first_token']} of "
                            f"{r['n_prompts']} prompts ({r['first_token_accuracy']:.0%}); the continuation starts "
                            f"with the word for {r['n_echo_correct']}.")
    return [Section(
        "Echo behaviour", "Greedy continuation per template: first token = target, continuation starts "
        "with the word, continuation is exactly the word (echo_behaviour); words where the templates "
        "disagree (echo_agreement).",
        charts=[charts.accuracy_bars(eb)],
        tables=[("echo_behaviour", eb),
                ("Words whose templates give different first tokens (echo_agreement)",
                 agree.filter(~pl.col("same_top1")))])]


def emergence(ctx: Ctx) -> list[Section]:
    counts = ctx.counts = ctx.run("emergence_counts")
    templates = ctx.templates
    for t in sorted(set(counts["template_index"].to_list())):
        c = counts.filter((pl.col("template_index") == t) & pl.col("emergence_layer").is_not_null())
        if c.height:
            top = c.sort("n_prompts", descending=True).row(0, named=True)
            ctx.findings.append(f"“{templates[t] if t < len(templates) else t}”: the target most often emerges at "
                                f"layer {top['emergence_layer']} ({top['n_prompts']} of {c['n_prompts'].sum()} "
                                "prompts whose answer is the target).")
    return [Section("Emergence layer", "Per prompt, the first layer from which the logit lens keeps the target at "
                    "rank 0 through the last layer (emergence_counts; 'never': the model's final top-1 is not the "
                    "target).", charts=[charts.emergence_histogram(counts, templates)])]


def logit_lens(ctx: Ctx) -> list[Section]:
    lens = ctx.run("lens_target")
    known = set(ctx.wh.sql("SELECT DISTINCT word FROM prompts")["word"].to_list())
    missing = [w for w in ctx.words if w not in known]
    traj = []
    for w in ctx.words:
        for t in range(len(ctx.templates)):
            tr = ctx.run("lens_trajectory", word=w, template_index=t, k=3)
            tr = tr.with_columns(pl.col("token_text").map_elements(visible, return_dtype=pl.Utf8))
            if tr.height:
                traj.append(charts.lens_trajectory(tr, f"“{w}”, template {t}: logit-lens top-3 per layer (target in red)"))
    return [Section("Logit lens", "Target probability and rank under the logit lens (lens_target), and the top-3 "
                    f"tokens per layer for {', '.join(ctx.words)} (lens_trajectory; ␣ marks a space).",
                    charts=[charts.lens_heatmap(lens), charts.lens_rank_heatmap(lens), *traj],
                    note=f"Not in this prompt set: {', '.join(missing)}." if missing else "")]


def head_dla(ctx: Ctx) -> list[Section]:
    grid = ctx.run("head_dla_grid")
    best = grid.sort("mean_dla", descending=True).row(0, named=True)
    ctx.findings.append(f"The head with the largest mean DLA is L{best['layer']}H{best['head']} ({best['mean_dla']:.3f}).")
    return [Section("Direct logit attribution per head", "Mean DLA of every head to each prompt's target "
                    "(head_dla_grid).", charts=[charts.layer_head_heatmap(grid, "mean_dla", "Mean DLA per head")])]


def ablation_sections(ctx: Ctx) -> list[Section]:
    """DLA vs ablation, top-head consistency, blocks and flips (notes when there is no ablation)."""
    if not ctx.ablation.modes:
        return _no_ablation(ctx)
    return [*_dla_vs_ablation(ctx), *_consistency(ctx), *_blocks(ctx), *_flips(ctx)]


def _no_ablation(ctx: Ctx) -> list[Section]:
    note = "This warehouse has no ablation data (extracted with --ablation none): these sections are left out."
    cons = ctx.run("top_heads_consistency")
    return [Section("DLA vs ablation", note=note),
            Section("Top-head consistency", "DLA only (top_heads_consistency).",
                    charts=[charts.top_heads_bars(cons)], tables=[("top_heads_consistency", cons)], note=note),
            Section("Ablation flips", note=note)]


def _dla_vs_ablation(ctx: Ctx) -> list[Section]:
    mode = ctx.ablation.mode
    dva = ctx.run("dla_vs_ablation_heads", mode=mode)
    corr = ctx.run("dla_vs_ablation_corr", mode=mode)
    top = dva.row(0, named=True)
    ctx.findings.append(f"Ablating L{top['layer']}H{top['head']} lowers the target logit most (by "
                        f"{top['mean_logit_diff']:.2f} on average, {mode} mode) while its mean DLA is {top['mean_dla']:.3f} "
                        f"(DLA rank {top['dla_rank']} of {dva.height}).")
    if corr.height:
        med = corr["median_spearman"].median()
        ctx.findings.append(f"Across layers the median per-prompt Spearman correlation between DLA and ablation is "
                            f"{med:.2f}: the two measures {'largely disagree' if med < 0.5 else 'mostly agree'}.")
    return [Section("DLA vs ablation", f"Each head's mean DLA against the mean drop of the target logit when it is "
                    f"{mode}-ablated ({ctx.ablation.describe()}; dla_vs_ablation_heads); heads far above the dashed "
                    "diagonal act indirectly, through later layers. Rank correlation per layer: dla_vs_ablation_corr.",
                    charts=[charts.dla_vs_ablation_scatter(dva, mode=mode)],
                    tables=[("Top heads by ablation effect", dva.head(10)),
                            ("Spearman(DLA, ablation) per layer", corr)])]


def _most_common_emergence_layer(counts: pl.DataFrame) -> int | None:
    """The layer where the target most often emerges, over all templates (None: never emerges)."""
    c = (counts.drop_nulls("emergence_layer").group_by("emergence_layer").agg(pl.col("n_prompts").sum())
         .sort(["n_prompts", "emergence_layer"], descending=[True, False]))
    return int(c["emergence_layer"][0]) if c.height else None


def _emergence_layer_text(counts: pl.DataFrame) -> str:
    layers = sorted({x for x in counts["emergence_layer"].to_list() if x is not None})
    return f" {layers[0]}" if len(layers) == 1 else ""


def _consistency(ctx: Ctx) -> list[Section]:
    mode = ctx.ablation.mode
    counts = ctx.counts if ctx.counts is not None else ctx.run("emergence_counts")
    cons = ctx.run("top_heads_consistency", mode=mode)
    mode_layer = _most_common_emergence_layer(counts)
    cons_at = ctx.run("top_heads_consistency", layer=mode_layer, mode=mode) if mode_layer is not None else None
    has_at = cons_at is not None and bool(cons_at["n_prompts_ablation"].max())
    chart_list = [charts.top_heads_bars(cons)]
    tables = [("top_heads_consistency (each prompt's emergence layer)", cons)]
    if has_at:
        chart_list.append(charts.top_heads_bars(
            cons_at, f"How often each head of layer {mode_layer} (the most common emergence layer) is in the top 3"))
        tables.append((f"top_heads_consistency(layer={mode_layer})", cons_at))
    c = cons.sort("n_top_ablation", descending=True).row(0, named=True)
    if not c["n_prompts_ablation"]:
        ctx.findings.append("No prompt's target emerges under the logit lens at an ablated layer, so heads "
                            "cannot be ranked at an emergence layer.")
    else:
        ctx.findings.append(f"Head {c['head']} (at the emergence layer{_emergence_layer_text(counts)}) is in the top 3 "
                            f"by ablation for {c['n_top_ablation']} of {c['n_prompts_ablation']} prompts, and in the "
                            f"top 3 by DLA for {c['n_top_dla']} of {c['n_prompts_dla']}.")
    if has_at:
        a = cons_at.sort("n_top_ablation", descending=True).row(0, named=True)
        ctx.findings.append(f"At layer {mode_layer}, head L{mode_layer}H{a['head']} is in the top 3 by ablation for "
                            f"{a['n_top_ablation']} of {a['n_prompts_ablation']} prompts (top 3 by DLA for "
                            f"{a['n_top_dla']} of {a['n_prompts_dla']}).")
    return [Section("Top-head consistency", f"How often each head is among the top 3 by {mode} ablation and by DLA, "
                    "at each prompt's own emergence layer and at the most common emergence layer "
                    "(top_heads_consistency).", charts=chart_list, tables=tables)]


def _blocks(ctx: Ctx) -> list[Section]:
    chart_list = []
    for mode in ctx.ablation.modes:
        blocks = ctx.run("block_ablation", mode=mode)
        chart_list.append(charts.block_ablation_lines(blocks, mode=mode))
        worst = blocks.sort("mean_kl", descending=True).row(0, named=True)
        ctx.findings.append(f"The most damaging single block ({mode} ablation) is the {worst['unit_kind'].upper()} of "
                            f"layer {worst['layer']} (mean KL {worst['mean_kl']:.2f} nats; top-1 changes for "
                            f"{worst['frac_top1_changed']:.0%} of prompts).")
        kinds = dict(blocks.group_by("unit_kind").agg(pl.col("mean_kl").sum()).rows())
        if "mlp" in kinds and "attn" in kinds:
            ctx.findings.append(f"Summed over the ablated layers, {mode} ablation of MLP blocks costs "
                                f"{kinds['mlp']:.1f} nats of KL against {kinds['attn']:.1f} for attention blocks.")
    return [Section("Attention vs MLP blocks", "Removing a whole block per layer (block_ablation), against the "
                    "ablation engine's own clean run.", charts=chart_list)]


def _flips(ctx: Ctx) -> list[Section]:
    flips = ctx.run("ablation_flips")
    show = flips.sort("kl", descending=True).select("word", "template_index", "mode", "layer", "unit_kind", "head",
                                                    "clean_top1_text", "new_top1_text", "new_top1_prob", "kl")
    heads_only = flips.filter(pl.col("unit_kind") == "head")
    ctx.findings.append(f"{heads_only.height} single-head ablations change the model's answer "
                        f"({heads_only.select('prompt').n_unique()} prompts affected).")
    return [Section("Ablation flips", f"{flips.height} (prompt, mode, layer, unit) ablations change the top-1 token "
                    "of the ablation engine's clean run (ablation_flips); the 30 with the largest KL:",
                    tables=[("ablation_flips", show.head(30))])]


def first_token_attention(ctx: Ctx) -> list[Section]:
    att = ctx.run("first_token_attention_grid")
    first_tok = ctx.wh.sql("SELECT any_value(token_text) AS t FROM tokens WHERE position = 0")["t"][0]
    sink = att.sort("mean_mass_first", descending=True).row(0, named=True)
    n_sinks = att.filter(pl.col("mean_mass_first") >= 0.9 - 1e-6).height  # float32 0.9 < 0.9
    ctx.findings.append(f"L{sink['layer']}H{sink['head']} puts {sink['mean_mass_first']:.1%} of its attention on "
                        f"position 0 on average (at least {sink['min_mass_first']:.1%} on every prompt); {n_sinks} of "
                        f"{att.height} heads put ≥90% there.")
    return [Section("Attention to the first token", f"Mean attention weight from the last position to position 0 "
                    f"({visible(first_tok)!r}) for every head (first_token_attention_grid).",
                    charts=[charts.layer_head_heatmap(att, "mean_mass_first", "Attention on position 0",
                                                      scheme="greys", domain_mid=None)])]


def cosine(ctx: Ctx) -> list[Section]:
    chart_list = []
    if len(ctx.templates) >= 2:
        rc = ctx.run("resid_cosine_by_layer").sort("layer")
        chart_list.append(charts.cosine_by_layer(rc, "Last-token residual: cosine between the two templates, per word"))
        last = rc.row(-1, named=True)
        ctx.findings.append(f"The last-token residuals of the two templates have mean cosine {rc['mean_cosine'][0]:.3f} "
                            f"at the embeddings and {last['mean_cosine']:.3f} after the last layer (minimum "
                            f"{last['min_cosine']:.3f}).")
    bos = ctx.run("bos_cosine")
    chart_list.append(charts.cosine_by_layer(bos, "Position-0 residual: cosine across all pairs of prompts"))
    if bos.height and bos["n_first_tokens"][0] == 1:
        ctx.findings.append(f"Position 0 holds the same token in every prompt, and its residual has cosine ≥ "
                            f"{bos['min_cosine'].min():.4f} across prompts at every layer: by causal masking it "
                            "cannot carry prompt-specific information.")
    elif bos.height:
        ctx.findings.append(f"Position 0 holds {bos['n_first_tokens'][0]} different tokens across prompts; its "
                            f"residual's pairwise cosine goes down to {bos['min_cosine'].min():.4f}.")
    return [Section("Residual cosine similarity", "resid_cosine_by_layer and bos_cosine.", charts=chart_list)]


SECTIONS: tuple[Callable[[Ctx], list[Section]], ...] = (
    run_summary, echo_behaviour, emergence, logit_lens, head_dla, ablation_sections, first_token_attention,
    sinks.section, cosine, patching.section,
)
