"""Sections "Attention to the first token" and "Attention sinks" (with "Sink share", "First-token
keys and values", "Massive activations", "Logit lens at position 0", "Removing the sink"): is
position 0 a sink? (headline: how many heads put most of their attention there.)

Every number comes from a named analysis (first_token_attention_grid, sink_heads, sink_share,
sink_norms, massive_activations, sink_ablation) or a view (lens_first). The published figures
quoted beside ours are constants with their citations (none is a target: SmolLM2 and Qwen2.5
have no published sink figures).
"""

from __future__ import annotations

import polars as pl

from reports.charts import layer_head_heatmap
from reports.context import Ctx
from reports.model import SINK, Section, visible

# (model, sink share at threshold 0.3, source): Gu et al. 2025, "When attention sink emerges in
# language models: an empirical view" (ICLR 2025).
GU_2025 = (
    ("LLaMA2-7B base", "92.5%"),
    ("LLaMA2-7B chat", "92.9%"),
    ("LLaMA3-8B base", "≈99%"),
    ("Mistral-7B base", "97.5%"),
    ("Mistral-7B instruct", "88.3%"),
)
GU_CITE = "Gu et al. 2025, “When attention sink emerges in language models: an empirical view”"
SUN_CITE = "Sun et al. 2024, “Massive activations in large language models”"
KOBAYASHI_CITE = "Kobayashi et al. 2020, “Attention is not only a weight: analyzing transformers with vector norms”"
XIAO_CITE = "Xiao et al. 2023, “Efficient streaming language models with attention sinks” (StreamingLLM)"
TOP_HEADS = 5  # heads with the most first-token attention whose sink removal is tabulated


def _head(r: dict) -> str:
    return f"L{r['layer']}H{r['head']}"


def sections(ctx: Ctx) -> list[Section]:
    first = _first_token_attention(ctx)
    if ctx.wh.sql("SELECT count(*) AS n FROM head_norms")["n"][0] == 0:
        return [first, Section("Attention sinks", note="This warehouse was extracted before the attention-sink "
                               "captures (value/key/query norms, the residual's largest values, the lens at "
                               "position 0): re-extract it to get this section.")]
    heads, grid = _sink_heads(ctx)
    return [first, heads, _sink_share(ctx), _norms(ctx), _massive(ctx), _lens_first(ctx), _removal(ctx, grid)]


def _first_token_attention(ctx: Ctx) -> Section:
    att = ctx.run("first_token_attention_grid")
    first_tok = ctx.wh.sql("SELECT any_value(token_text) AS t FROM tokens WHERE position = 0")["t"][0]
    sink = att.sort("mean_mass_first", descending=True).row(0, named=True)
    n_half = att.filter(pl.col("mean_mass_first") > 0.5).height
    n_sinks = att.filter(pl.col("mean_mass_first") >= 0.9 - 1e-6).height  # float32 0.9 < 0.9
    ctx.findings.headline(SINK, f"{n_half} of {att.height} heads put more than half of the last position's "
                                f"attention on position 0; the most, {_head(sink)}, puts "
                                f"{sink['mean_mass_first']:.1%} there.")
    ctx.findings.add(SINK, f"{_head(sink)} puts {sink['mean_mass_first']:.1%} of its attention on position 0 on "
                           f"average (at least {sink['min_mass_first']:.1%} on every prompt); {n_sinks} of "
                           f"{att.height} heads put ≥90% there.")
    return Section("Attention to the first token", f"Mean attention weight from the last position to position 0 "
                   f"({visible(first_tok)!r}) for every head (first_token_attention_grid).",
                   charts=[layer_head_heatmap(att, "mean_mass_first", "Attention on position 0",
                                              scheme="greys", domain_mid=None)])


def _sink_heads(ctx: Ctx) -> tuple[Section, pl.DataFrame]:
    heads = ctx.run("sink_heads")  # last position, mean over prompts
    grid = heads.with_columns((pl.col("weight_first") - pl.col("norm_share_first")).alias("gap"))
    top = grid.sort("weight_first", descending=True).row(0, named=True)
    ctx.findings.add(SINK, f"Head {_head(top)} puts {top['weight_first']:.2f} of its last-position attention but "
                           f"{top['norm_share_first']:.2f} of its output norm on position 0 (its value contribution "
                           f"there is {top['value_out_norm_first']:.3g} per unit of attention against "
                           f"{top['value_out_norm_other']:.3g} at the other positions).")
    heavy = grid.filter(pl.col("weight_first") > 0.5)
    if heavy.height:
        ctx.findings.add(SINK, f"On the {heavy.height} heads that put more than half of their last-position "
                               "attention on position 0, position 0's share of the output norm has median "
                               f"{heavy['norm_share_first'].median():.3f}.")
    return Section(
        "Attention sinks", "Attention weight on position 0 from the last position (left) against the share of what "
        f"the head writes that comes from position 0 (right): a_i0 ||v_0 W_O^h|| / Σ_j a_ij ||v_j W_O^h|| "
        f"({KOBAYASHI_CITE}). A head can attend almost only to position 0 and still write almost nothing from it, "
        "when the value it reads there is small. Mean over prompts (sink_heads).",
        charts=[layer_head_heatmap(grid, "weight_first", "Attention weight on position 0",
                                   scheme="greys", domain_mid=None),
                layer_head_heatmap(grid, "norm_share_first", "Share of output norm from position 0",
                                   scheme="greys", domain_mid=None)],
        tables=[("Heads with the most attention on position 0 (sink_heads)",
                 grid.sort("weight_first", descending=True).head(10))]), grid


def _sink_share(ctx: Ctx) -> Section:
    share = ctx.run("sink_share", threshold=0.3)
    overall = share.filter(pl.col("layer").is_null())
    ours = float(overall["sink_share"][0]) if overall.height else float("nan")
    model = ctx.manifest.get("model", {}).get("model", "model")
    compare = pl.DataFrame({"model": [f"{model} (this warehouse)", *(m for m, _ in GU_2025)],
                            "sink share (ε = 0.3)": [f"{ours:.1%}", *(s for _, s in GU_2025)],
                            "source": ["sink_share", *([GU_CITE] * len(GU_2025))]})
    published = dict(GU_2025)
    ctx.findings.add(SINK, f"Sink share (ε = 0.3, {GU_CITE.split(',')[0]}): {ours:.1%} of this model's heads, "
                           f"against {published['LLaMA2-7B base']} for LLaMA2-7B base and "
                           f"{published['LLaMA3-8B base']} for LLaMA3-8B.")
    return Section(
        "Sink share", f"A head is a sink head when its attention to position 0, averaged over every query position, "
        f"exceeds ε = 0.3; the sink share is the fraction of all heads that are, averaged over prompts ({GU_CITE}). "
        "Published figures beside ours; no figure has been published for this model.",
        tables=[("Sink share: ours and published", compare),
                ("Per layer (sink_share, threshold 0.3)", share.filter(pl.col("layer").is_not_null()))])


def _norms(ctx: Ctx) -> Section:
    norms = ctx.run("sink_norms")
    later = norms.filter(pl.col("layer") >= norms["layer"].max() // 2)
    if later.height:
        kr = (later["key_norm_first"] / later["key_norm_other"]).median()
        vr = (later["value_norm_first"] / later["value_norm_other"]).median()
        ctx.findings.add(SINK, f"From the middle layer on, position 0's keys have median {kr:.2f}× and its values "
                               f"{vr:.2f}× the norm of the other positions' (sink_norms).")
    return Section(
        "First-token keys and values", "Mean key, value, value-contribution and query norms at position 0 against "
        f"the other positions, per layer (sink_norms). {GU_CITE.split(',')[0]} report small keys and values on the sink.",
        tables=[("sink_norms", norms)])


def _massive(ctx: Ctx) -> Section:
    mass = ctx.run("massive_activations")
    for r in mass.head(2).iter_rows(named=True):
        ctx.findings.add(SINK, f"Dimension {r['dim']} at position {r['position']} ({visible(r['token_text'])!r}) is "
                               f"massive from layer {r['first_layer']} to {r['last_layer']} in {r['n_prompts']} "
                               f"prompts: up to {r['max_abs']:.4g}, {r['max_ratio']:.3g}× the hidden state's median "
                               "(Sun et al.: >100, ~1000×).")
    if not mass.height:
        ctx.findings.add(SINK, "No massive activations (>100 and >1000× the median) in this model's residual stream.")
    return Section(
        "Massive activations", f"Residual values above 100 and above 1000× the median |value| of the layer's whole "
        f"hidden state (every position and dimension), per dimension and position (massive_activations; {SUN_CITE}: "
        "in LLaMA2-7B dimensions 1415 and 2533 on the start token and the first delimiter, from early layers on).",
        tables=[("massive_activations (abs > 100, > 1000× median)", mass.head(20))],
        note="" if mass.height else "No residual value exceeds both thresholds in this warehouse.")


def _lens_first(ctx: Ctx) -> Section:
    lens = ctx.wh.sql("""SELECT layer, list(token_text ORDER BY k) AS top3_texts, list(prob ORDER BY k) AS top3_probs
                         FROM lens_first WHERE k < 3 AND prompt = (SELECT min(prompt) FROM lens_first)
                         GROUP BY layer ORDER BY layer""")
    return Section(
        "Logit lens at position 0", "Top-3 tokens of position 0's residual at every layer (view lens_first; the first "
        "prompt: position 0 sees only itself, so every prompt with the same first token has the same rows).",
        tables=[("lens_first", lens)])


SINK_MODES = (("sink", "renormalised over the other keys"),
              ("sink_norenorm", "not renormalised: position 0's value contribution removed"))


def _removal(ctx: Ctx, grid: pl.DataFrame) -> Section:
    modes = [(m, what) for m, what in SINK_MODES if m in ctx.ablation.modes]
    if not modes:
        return Section("Removing the sink", note="Not extracted: run `echowh extract --ablation "
                       "zero,sink,sink_norenorm` to see what removing attention to position 0 does.")
    pick = grid.sort("weight_first", descending=True).head(TOP_HEADS).select("layer", "head")
    tables = []
    for mode, what in modes:
        ab = ctx.run("sink_ablation", mode=mode)
        rows = pick.join(ab, on=["layer", "head"], how="inner").sort("weight_first", descending=True)
        tables.append((f"{mode}: attention to position 0 removed, {what} (sink_ablation)", rows))
        for r in rows.head(2).iter_rows(named=True):
            ctx.findings.add(SINK, f"Removing {_head(r)}'s attention to position 0 ({mode}: {what}) changes the "
                                   f"target logit by {r['mean_logit_diff']:+.3g} on average (clean minus ablated; "
                                   f"largest |change| {r['max_abs_logit_diff']:.3g}, mean KL {r['mean_kl']:.3g} "
                                   f"nats, top-1 changed for {r['top1_changed']:.0%} of prompts).")
        whole = ab.filter(pl.col("head").is_null()).sort("mean_kl", descending=True)
        if whole.height:
            w = whole.row(0, named=True)
            ctx.findings.add(SINK, f"Removing attention to position 0 from every head of layer {w['layer']} at once "
                                   f"({mode}) costs the most of any layer: mean KL {w['mean_kl']:.3g} nats, top-1 "
                                   f"changed for {w['top1_changed']:.0%} of prompts.")
    return Section(
        "Removing the sink", f"For the {TOP_HEADS} heads with the most first-token attention, the effect of removing "
        "their attention to position 0 at the ablated positions, both variants. Renormalising amplifies whatever "
        "the head put elsewhere (a head with weight 0.99999 on position 0 then puts weight 1 on the rest), so "
        "sink_norenorm -- position 0's value contribution removed, the other weights unchanged -- is the measure "
        f"of what the head writes from the sink. {XIAO_CITE}: evicting the first tokens' keys and values wrecks "
        "Llama-2-13B's perplexity (5.40 → 5,158).", tables=tables)
