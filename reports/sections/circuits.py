"""Section "Which paths carry the word": edge attribution (EAP, EAP-IG) and circuits (issue 17).

Reads only named analyses (circuit_top_edges, circuit_faithfulness_curve, circuit_head_rankings,
circuit_agreement) and the circuit views, and writes its findings from their frames. Absent
(no section, no finding) when the warehouse has no circuits.
"""

from __future__ import annotations

from dataclasses import dataclass

import altair as alt
import polars as pl

from reports.context import Ctx
from reports.model import Question, Section

PATHS = Question("Which paths carry the word?", "q-paths")
TITLE = "Which paths carry the word"
METHOD = "eap_ig_inputs"  # the diagram's and the findings' scores (Hanna et al.'s recommendation)
TOP = 30  # edges drawn per pair kind
INTRO = (
    "Edge attribution over the model's computational graph (Syed et al. 2023; Hanna et al. 2024): every "
    "upstream node (embeddings, each head, each MLP) sends an edge into every later input (each head's "
    "query, each KV head's key and value, each MLP, the logits). An edge's score is the gradient × "
    "activation-difference estimate of how much the metric (the logit difference of the pair's two "
    "answers) changes when that edge alone carries the counterfactual prompt's value. Two kinds of "
    "counterfactual: 'template' (the same word under the other template) and 'word' (another word, same "
    "template: the copy circuit). A circuit is the top edges by |score|; its faithfulness is the metric "
    "of the clean run with every other edge patched from the counterfactual, normalised to 0 "
    "(counterfactual) .. 1 (clean). CPR is the area under the faithfulness curve over circuit sizes "
    "(higher is better), CMD the area between it and 1 (lower is better), as in MIB (Mueller et al. 2025)."
)


@dataclass(frozen=True)
class Shape:
    """The graph's sizes: layers, query heads, query heads per KV head."""

    n_layers: int
    n_heads: int
    group: int


def _shape(ctx: Ctx) -> Shape:
    r = ctx.wh.sql("SELECT max(down_layer) FILTER (WHERE input_kind = 'logits') AS l, "
                   "count(DISTINCT down_head) FILTER (WHERE input_kind = 'q') AS h, "
                   "count(DISTINCT down_head) FILTER (WHERE input_kind = 'k') AS kv FROM circuit_graph").row(0)
    return Shape(int(r[0]), int(r[1]), max(1, int(r[1]) // max(1, int(r[2]))))


def node_positions(df: pl.DataFrame, s: Shape) -> pl.DataFrame:
    """Each edge's (x, y) ends: heads at (layer, head), an MLP at (layer + 0.5, H), input at
    (-1, H / 2), logits at (L, H / 2); a key or value input sits at the middle of its KV group."""
    mid = (s.n_heads - 1) / 2
    up_x = pl.when(pl.col("up_layer") < 0).then(-1.0).when(pl.col("up_head").is_null()) \
        .then(pl.col("up_layer") + 0.5).otherwise(pl.col("up_layer").cast(pl.Float64))
    up_y = pl.when(pl.col("up_layer") < 0).then(mid).when(pl.col("up_head").is_null()) \
        .then(float(s.n_heads)).otherwise(pl.col("up_head").cast(pl.Float64))
    kind = pl.col("input_kind")
    down_x = pl.when(kind == "mlp").then(pl.col("down_layer") + 0.5).otherwise(pl.col("down_layer").cast(pl.Float64))
    down_y = (pl.when(kind == "q").then(pl.col("down_head").cast(pl.Float64))
              .when(kind.is_in(["k", "v"])).then(pl.col("down_head") * s.group + (s.group - 1) / 2)
              .when(kind == "mlp").then(float(s.n_heads)).otherwise(mid))
    return df.with_columns(x=up_x, y=up_y, x2=down_x, y2=down_y, abs_score=pl.col("mean_score").abs())


def circuit_diagram(edges: pl.DataFrame, s: Shape, title: str) -> alt.LayerChart:
    """Layered node-link diagram: nodes at (layer, head), edges as rules (width |score|, colour input kind);
    a key or value input is drawn as its KV group's node ``a{l}.kv{g}``."""
    df = node_positions(edges, s).select("upstream", "downstream", "input_kind", "mean_score", "abs_score",
                                         "x", "y", "x2", "y2")
    receivers = df.select(name="downstream", x="x2", y="y2").with_columns(  # a key/value input: its KV group
        pl.col("name").str.replace(r"\.h(\d+)<[kv]>$", ".kv$1").str.replace(r"<q>$", ""))
    nodes = pl.concat([df.select(name="upstream", x="x", y="y"), receivers]).unique(["x", "y"], keep="first")
    xs = alt.X("x:Q", title="layer (input at -1, MLPs at layer + 0.5, logits at L)")
    ys = alt.Y("y:Q", title="head (KV group aN.kvG at its heads' middle; MLPs below)",
               scale=alt.Scale(reverse=True))
    lines = alt.Chart(alt.Data(values=df.to_dicts())).mark_rule(opacity=0.7).encode(
        x=xs, y=ys, x2="x2:Q", y2="y2:Q",
        strokeWidth=alt.StrokeWidth("abs_score:Q", title="|mean score|", scale=alt.Scale(range=[0.5, 6])),
        color=alt.Color("input_kind:N", title="input", scale=alt.Scale(domain=["q", "k", "v", "mlp", "logits"])),
        tooltip=["upstream:N", "downstream:N", "input_kind:N", alt.Tooltip("mean_score:Q", format=".4f")])
    dots = alt.Chart(alt.Data(values=nodes.to_dicts())).mark_circle(size=60, color="black").encode(
        x=xs, y=ys, tooltip=["name:N"])
    text = alt.Chart(alt.Data(values=nodes.to_dicts())).mark_text(dy=-9, fontSize=9).encode(x=xs, y=ys, text="name:N")
    return alt.layer(lines, dots, text).properties(title=title, width=640, height=320)


def faithfulness_chart(curve: pl.DataFrame) -> alt.Chart:
    """circuit_faithfulness_curve: mean faithfulness vs circuit size, one line per method and selection."""
    df = curve.select("pair_kind", "method", "selection", "fraction", "mean_faithfulness", "n_pairs")
    return alt.Chart(alt.Data(values=df.to_dicts())).mark_line(point=True).encode(
        x=alt.X("fraction:Q", title="circuit size (fraction of edges)", scale=alt.Scale(type="symlog", constant=0.001)),
        y=alt.Y("mean_faithfulness:Q", title="mean faithfulness"),
        color="method:N", strokeDash="selection:N", column=alt.Column("pair_kind:N", title="pair kind"),
        tooltip=["method:N", "selection:N", "fraction:Q", alt.Tooltip("mean_faithfulness:Q", format=".3f"), "n_pairs:Q"],
    ).properties(title="Faithfulness of the top-edge circuits (metric ld, counterfactual patching)",
                 width=300, height=240)


def sections(ctx: Ctx) -> list[Section]:
    if ctx.wh.sql("SELECT count(*) AS n FROM circuit_pairs")["n"][0] == 0:
        return []
    s = _shape(ctx)
    top = ctx.run("circuit_top_edges", method=METHOD, top=TOP)
    curve = ctx.run("circuit_faithfulness_curve")
    summary = curve.group_by("pair_kind", "method", "selection").agg(
        pl.col("n_pairs").first(), pl.col("mean_cpr").first(), pl.col("mean_cmd").first()
    ).sort("pair_kind", "method", "selection")
    ranks = ctx.run("circuit_head_rankings", pair_kind="word", method=METHOD)
    agree = ctx.run("circuit_agreement", method=METHOD)
    _headline(ctx, curve, summary)
    _sink_finding(ctx, top, ranks)
    _indirect_finding(ctx, top, ranks)
    if agree.height:
        ctx.findings.add(PATHS, f"The template and copy circuits of the same prompt share on average "
                                f"{agree['jaccard'].mean():.2f} of their top-{int(agree['n_top'][0])} edges (Jaccard) "
                                f"and their edge scores rank-correlate at ρ = {agree['spearman'].mean():.2f} "
                                f"({agree.height} prompts).")
    charts: list[alt.TopLevelMixin] = [
        circuit_diagram(top.filter(pl.col("pair_kind") == k), s,
                        f"Top {TOP} edges of the {k} pairs ({METHOD}, ld, mean over pairs)")
        for k in top["pair_kind"].unique(maintain_order=True).to_list()]
    charts.append(faithfulness_chart(curve))
    val = ctx.wh.sql("SELECT invariant, count(*) AS n_pairs, max(rel_err) AS max_rel_err, any_value(tolerance) "
                     "AS tolerance, bool_and(passed) AS passed FROM circuit_validation GROUP BY invariant "
                     "ORDER BY invariant")
    tables = [("CPR and CMD per method (circuit_faithfulness_curve; metric ld, patch)", summary),
              (f"Top edges ({METHOD}, circuit_top_edges)", top),
              ("Circuit heads against DLA, ablation and sink ranks (circuit_head_rankings, word pairs)",
               ranks.head(15)),
              ("Template vs copy circuit (circuit_agreement)", agree),
              ("Circuit invariants, worst over pairs (circuit_validation)", val)]
    return [Section(TITLE, INTRO, charts=charts, tables=tables)]


def _headline(ctx: Ctx, curve: pl.DataFrame, summary: pl.DataFrame) -> None:
    """The best method by CPR on the copy circuit, and the smallest circuit that reaches 0.8."""
    kind = "word" if (summary["pair_kind"] == "word").any() else summary["pair_kind"][0]
    best = summary.filter((pl.col("pair_kind") == kind) & (pl.col("selection") == "abs")).sort(
        "mean_cpr", descending=True).row(0, named=True)
    c = curve.filter((pl.col("pair_kind") == kind) & (pl.col("method") == best["method"])
                     & (pl.col("selection") == "abs") & (pl.col("mean_faithfulness") >= 0.8))
    reach = (f"its circuits reach a mean faithfulness of 0.8 with {c['fraction'].min():.1%} of the edges"
             if c.height else "its circuits never reach a mean faithfulness of 0.8 short of all edges")
    ctx.findings.headline(PATHS, f"For the {kind} pairs ({best['n_pairs']} pairs) {best['method']} gives the most "
                                 f"faithful circuits (CPR {best['mean_cpr']:.3f}, CMD {best['mean_cmd']:.3f}): "
                                 f"{reach}.")


def _sink_finding(ctx: Ctx, top: pl.DataFrame, ranks: pl.DataFrame) -> None:
    """Is the head that attends most to the first token a sender of the copy circuit's top edges?"""
    sink = ranks.filter(pl.col("sink_rank") == 1)
    if sink.height == 0:
        return
    h = sink.row(0, named=True)
    name = f"a{h['layer']}.h{h['head']}"
    word_top = top.filter(pl.col("pair_kind") == "word")
    sends = word_top.filter(pl.col("upstream") == name).height
    receives = word_top.filter(pl.col("downstream").str.starts_with(name + "<")).height
    on = "is on" if sends or receives else "is not on"
    ctx.findings.add(PATHS, f"The first-token head {name} (attention on position 0 at the last position "
                            f"{h['weight_first']:.2f}, sink rank 1) {on} the copy circuit: it sends {sends} and "
                            f"receives {receives} of its top {word_top.height} edges; its rank by outgoing "
                            f"|score| is {h['circuit_rank']} of {ranks.height} heads.")


def _indirect_finding(ctx: Ctx, top: pl.DataFrame, ranks: pl.DataFrame) -> None:
    """Do heads with a small DLA but a large ablation effect feed later heads' q/k/v in the top edges?"""
    if ranks["ablation_rank"].null_count() == ranks.height:
        return
    n = ranks.height
    indirect = ranks.filter((pl.col("dla_rank") > n / 2) & (pl.col("ablation_rank") <= max(1, n // 4)))
    names = [f"a{r['layer']}.h{r['head']}" for r in indirect.iter_rows(named=True)]
    word_top = top.filter(pl.col("pair_kind") == "word")
    feeds = word_top.filter(pl.col("upstream").is_in(names) & pl.col("input_kind").is_in(["q", "k", "v"]))
    share = feeds["mean_score"].abs().sum() / max(word_top["mean_score"].abs().sum(), 1e-300)
    ctx.findings.add(PATHS, f"{len(names)} heads have a small DLA (lower half) but a large zero-ablation effect "
                            f"(top quarter){': ' + ', '.join(names) if names else ''}; {feeds.height} of the copy "
                            f"circuit's top {word_top.height} edges run from them into later heads' query, key or "
                            f"value ({share:.0%} of those edges' |score|).")
