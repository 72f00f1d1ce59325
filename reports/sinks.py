"""Report section "Attention sinks": is the first-token head doing anything?

Every number comes from a named analysis (sink_heads, sink_share, sink_norms,
massive_activations, sink_ablation) or a view (lens_first); the findings are sentences filled
in from those frames. The published figures quoted beside ours are constants with their
citations (none is a target: SmolLM2 and Qwen2.5 have no published sink figures).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl

from query import Warehouse
from reports import charts

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


def sink_sections(wh: Warehouse, Section: type, visible: Callable[[str | None], str | None]
                  ) -> tuple[list, list[str]]:
    """(sections, findings) of "Attention sinks"; notes instead when the captures are missing."""
    title = "Attention sinks"
    if wh.sql("SELECT count(*) AS n FROM head_norms")["n"][0] == 0:
        return [Section(title, note="This warehouse was extracted before the attention-sink captures "
                        "(value/key/query norms, the residual's largest values, the lens at position 0): "
                        "re-extract it to get this section.")], []
    findings: list[str] = []
    sections = []
    heads = wh.run_analysis("sink_heads")  # last position, mean over prompts
    grid = heads.with_columns((pl.col("weight_first") - pl.col("norm_share_first")).alias("gap"))
    sections.append(Section(
        title, "Attention weight on position 0 from the last position (left) against the share of what the "
        f"head writes that comes from position 0 (right): a_i0 ||v_0 W_O^h|| / Σ_j a_ij ||v_j W_O^h|| ({KOBAYASHI_CITE}). "
        "A head can attend almost only to position 0 and still write almost nothing from it, when the value "
        "it reads there is small. Mean over prompts (sink_heads).",
        charts=[charts.layer_head_heatmap(grid, "weight_first", "Attention weight on position 0",
                                          scheme="greys", domain_mid=None),
                charts.layer_head_heatmap(grid, "norm_share_first", "Share of output norm from position 0",
                                          scheme="greys", domain_mid=None)],
        tables=[("Heads with the most attention on position 0 (sink_heads)",
                 grid.sort("weight_first", descending=True).head(10))]))
    top = grid.sort("weight_first", descending=True).row(0, named=True)
    findings.append(f"Head {_head(top)} puts {top['weight_first']:.2f} of its last-position attention but "
                    f"{top['norm_share_first']:.2f} of its output norm on position 0 (its value contribution there "
                    f"is {top['value_out_norm_first']:.3g} per unit of attention against {top['value_out_norm_other']:.3g} "
                    "at the other positions).")
    heavy = grid.filter(pl.col("weight_first") > 0.5)
    if heavy.height:
        findings.append(f"{heavy.height} of {grid.height} heads put more than half of their last-position attention "
                        f"on position 0; on those, position 0's share of the output norm has median "
                        f"{heavy['norm_share_first'].median():.3f}.")

    # -- sink share (Gu et al.) ------------------------------------------------------------
    share = wh.run_analysis("sink_share", threshold=0.3)
    overall = share.filter(pl.col("layer").is_null())
    ours = float(overall["sink_share"][0]) if overall.height else float("nan")
    model = wh.sql("SELECT json_extract_string(value, '$.model') AS m FROM manifest WHERE key = 'model'")["m"][0]
    compare = pl.DataFrame({"model": [f"{model} (this warehouse)", *(m for m, _ in GU_2025)],
                            "sink share (ε = 0.3)": [f"{ours:.1%}", *(s for _, s in GU_2025)],
                            "source": ["sink_share", *([GU_CITE] * len(GU_2025))]})
    sections.append(Section(
        "Sink share", f"A head is a sink head when its attention to position 0, averaged over every query position, "
        f"exceeds ε = 0.3; the sink share is the fraction of all heads that are, averaged over prompts ({GU_CITE}). "
        "Published figures beside ours; no figure has been published for this model.",
        tables=[("Sink share: ours and published", compare),
                ("Per layer (sink_share, threshold 0.3)", share.filter(pl.col("layer").is_not_null()))]))
    findings.append(f"Sink share (ε = 0.3, {GU_CITE.split(',')[0]}): {ours:.1%} of this model's heads, against "
                    "92.5% for LLaMA2-7B base and ≈99% for LLaMA3-8B.")

    # -- norms -------------------------------------------------------------------------------
    norms = wh.run_analysis("sink_norms")
    sections.append(Section(
        "First-token keys and values", "Mean key, value, value-contribution and query norms at position 0 against "
        f"the other positions, per layer (sink_norms). {GU_CITE.split(',')[0]} report small keys and values on the sink.",
        tables=[("sink_norms", norms)]))
    later = norms.filter(pl.col("layer") >= norms["layer"].max() // 2)
    if later.height:
        kr = (later["key_norm_first"] / later["key_norm_other"]).median()
        vr = (later["value_norm_first"] / later["value_norm_other"]).median()
        findings.append(f"From the middle layer on, position 0's keys have median {kr:.2f}× and its values {vr:.2f}× "
                        "the norm of the other positions' (sink_norms).")

    # -- massive activations -----------------------------------------------------------------
    mass = wh.run_analysis("massive_activations")
    sections.append(Section(
        "Massive activations", f"Residual values above 100 and above 1000× the median |value| of the layer's whole "
        f"hidden state (every position and dimension), per dimension and position (massive_activations; {SUN_CITE}: "
        "in LLaMA2-7B dimensions 1415 and 2533 on the start token and the first delimiter, from early layers on).",
        tables=[("massive_activations (abs > 100, > 1000× median)", mass.head(20))],
        note="" if mass.height else "No residual value exceeds both thresholds in this warehouse."))
    for r in mass.head(2).iter_rows(named=True):
        findings.append(f"Dimension {r['dim']} at position {r['position']} ({visible(r['token_text'])!r}) is massive "
                        f"from layer {r['first_layer']} to {r['last_layer']} in {r['n_prompts']} prompts: up to "
                        f"{r['max_abs']:.4g}, {r['max_ratio']:.3g}× the hidden state's median (Sun et al.: >100, ~1000×).")
    if not mass.height:
        findings.append("No massive activations (>100 and >1000× the median) in this model's residual stream.")

    # -- logit lens at position 0 ------------------------------------------------------------
    lens = wh.sql("""SELECT layer, list(token_text ORDER BY k) AS top3_texts, list(prob ORDER BY k) AS top3_probs
                     FROM lens_first WHERE k < 3 AND prompt = (SELECT min(prompt) FROM lens_first)
                     GROUP BY layer ORDER BY layer""")
    sections.append(Section(
        "Logit lens at position 0", "Top-3 tokens of position 0's residual at every layer (view lens_first; the first "
        "prompt: position 0 sees only itself, so every prompt with the same first token has the same rows).",
        tables=[("lens_first", lens)]))

    # -- sink removal ------------------------------------------------------------------------
    modes = set(wh.sql("SELECT DISTINCT mode FROM ablation")["mode"].to_list())
    if not modes & {"sink", "sink_norenorm"}:
        sections.append(Section("Removing the sink", note="Not extracted: run `echowh extract --ablation "
                                "zero,sink,sink_norenorm` to see what removing attention to position 0 does."))
        return sections, findings
    pick = grid.sort("weight_first", descending=True).head(TOP_HEADS).select("layer", "head")
    tables = []
    for mode, what in (("sink", "renormalised over the other keys"),
                       ("sink_norenorm", "not renormalised: position 0's value contribution removed")):
        if mode not in modes:
            continue
        ab = wh.run_analysis("sink_ablation", mode=mode)
        rows = pick.join(ab, on=["layer", "head"], how="inner").sort("weight_first", descending=True)
        tables.append((f"{mode}: attention to position 0 removed, {what} (sink_ablation)", rows))
        for r in rows.head(2).iter_rows(named=True):
            findings.append(f"Removing {_head(r)}'s attention to position 0 ({mode}: {what}) changes the target "
                            f"logit by {r['mean_logit_diff']:+.3g} on average (clean minus ablated; largest "
                            f"|change| {r['max_abs_logit_diff']:.3g}, mean KL {r['mean_kl']:.3g} nats, top-1 changed "
                            f"for {r['top1_changed']:.0%} of prompts).")
        whole = ab.filter(pl.col("head").is_null()).sort("mean_kl", descending=True)
        if whole.height:
            w = whole.row(0, named=True)
            findings.append(f"Removing attention to position 0 from every head of layer {w['layer']} at once ({mode}) "
                            f"costs the most of any layer: mean KL "
                            f"{w['mean_kl']:.3g} nats, top-1 changed for {w['top1_changed']:.0%} of prompts.")
    sections.append(Section(
        "Removing the sink", f"For the {TOP_HEADS} heads with the most first-token attention, the effect of removing "
        "their attention to position 0 at the ablated positions, both variants. Renormalising amplifies whatever "
        "the head put elsewhere (a head with weight 0.99999 on position 0 then puts weight 1 on the rest), so "
        "sink_norenorm -- position 0's value contribution removed, the other weights unchanged -- is the measure "
        f"of what the head writes from the sink. {XIAO_CITE}: evicting the first tokens' keys and values wrecks "
        "Llama-2-13B's perplexity (5.40 → 5,158).", tables=tables))
    return sections, findings


def section(ctx: Any) -> list[Any]:
    """The report sections (``reports.sections.SECTIONS`` entry), from ``sink_sections``."""
    from reports.model import Section, visible

    secs, found = sink_sections(ctx.wh, Section, visible)
    ctx.findings.extend(found)
    return secs
