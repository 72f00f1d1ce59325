"""Section "What makes the templates differ": activation patching between template pairs
(headline: from which layer the last position alone carries the difference, per direction).

Reads only named analyses (patching_recovery_map, patching_top_heads, patching_attribution,
patching_disagreements, echo_agreement) and views, and writes its findings from their frames.
Left out (with a note, and a headline from echo_agreement) without --patching.
"""

from __future__ import annotations

from dataclasses import dataclass

import altair as alt
import polars as pl

from reports.context import Ctx
from reports.model import TEMPLATES, Section

TITLE = "What makes the templates differ"
INTRO = (
    "Activation patching between the two prompts of each word (Meng et al. 2022; Wang et al. 2022; "
    "Heimersheim & Nanda 2024): one activation of the source prompt is put into the destination "
    "prompt's run and the destination's answer is measured at its last position. Recovery = "
    "(LD patched − LD destination) / (LD source − LD destination) of the logit difference LD "
    "(the source's top-1 minus the destination's when they differ; when they agree, the target minus the "
    "destination's strongest other token): 1 means that one activation carries "
    "the whole difference between the templates. Direction 0 patches template a into b (denoising b "
    "towards a's answer), direction 1 the reverse. Positions are counted from the end so words of "
    "different lengths line up; the shared prefix is identical in both prompts and never patched. "
    "Attribution patching (Nanda 2023; Syed et al. 2023), a gradient × activation-difference estimate "
    "from one backward pass, is shown beside the exact grid: it is known to be good for head outputs "
    "and poor for early residual positions."
)


def recovery_heatmap(df: pl.DataFrame, title: str, resid: bool = True) -> alt.Chart:
    """patching_recovery_map: layer (y) x position from the end (x), colour = mean recovery."""
    df = df.with_columns((pl.col("from_end").cast(pl.Utf8) + " " + pl.col("token").fill_null("")).alias("position"))
    order = df.sort("from_end", descending=True)["position"].unique(maintain_order=True).to_list()
    return alt.Chart(alt.Data(values=df.select("direction", "layer", "position", "mean_recovery",
                                               "mean_attribution_recovery", "pooled_recovery", "n_words").to_dicts()),
                     title=title).mark_rect().encode(
        x=alt.X("position:N", sort=order, title="destination position (tokens before the last · token)"),
        y=alt.Y("layer:O", sort="descending",
                title="layer (residual after block; -1 = embeddings)" if resid else "block (layer) patched"),
        color=alt.Color("mean_recovery:Q", scale=alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True),
                        title="recovery"),
        column=alt.Column("direction:N", title="direction"),
        tooltip=["direction:N", "layer:O", "position:N", alt.Tooltip("mean_recovery:Q", format=".3f"),
                 alt.Tooltip("pooled_recovery:Q", format=".3f"),
                 alt.Tooltip("mean_attribution_recovery:Q", format=".3f"), "n_words:Q"],
    ).properties(width=300, height=360)


def attribution_scatter(df: pl.DataFrame) -> alt.Chart:
    """patching_attribution: Spearman correlation per layer, one line per patch kind."""
    return alt.Chart(alt.Data(values=df.select("direction", "kind", "layer", "spearman", "n").to_dicts()),
                     title="Attribution vs exact patching: rank correlation per layer").mark_line(point=True).encode(
        x=alt.X("layer:O"), y=alt.Y("spearman:Q", title="Spearman ρ", scale=alt.Scale(domain=[-1, 1])),
        color="kind:N", strokeDash="direction:N",
        tooltip=["kind:N", "direction:N", "layer:O", alt.Tooltip("spearman:Q", format=".3f"), "n:Q"],
    ).properties(width=640, height=260)


@dataclass
class Frames:
    """The analyses the findings read, run once."""

    resid: pl.DataFrame
    attn: pl.DataFrame
    mlp: pl.DataFrame
    heads: pl.DataFrame
    every: pl.DataFrame  # per (pair, direction, layer): the worst word's last-position recovery


def sections(ctx: Ctx) -> list[Section]:
    if ctx.wh.sql("SELECT count(*) AS n FROM patching")["n"][0] == 0:
        agree = ctx.run("echo_agreement")
        differ = agree.filter(~pl.col("same_top1")).height
        ctx.findings.headline(TEMPLATES, f"The templates give different first tokens for {differ} of "
                                         f"{agree.height} words; where that difference is made needs a "
                                         "--patching extraction.")
        return [Section(TITLE, note="This warehouse has no patching data (extract with --patching): "
                                    "this section is left out.")]
    f = Frames(resid=ctx.run("patching_recovery_map", kind="resid"),
               attn=ctx.run("patching_recovery_map", kind="attn"),
               mlp=ctx.run("patching_recovery_map", kind="mlp"),
               heads=ctx.run("patching_top_heads", top=10),
               every=ctx.wh.sql("SELECT pair, direction, layer, min(recovery) AS worst FROM patching "
                                "WHERE kind = 'resid' AND from_end = 0 GROUP BY pair, direction, layer"))
    attr = ctx.run("patching_attribution")
    info = ctx.wh.sql("SELECT pair, direction, count(*) AS n_words, "
                      "sum(CASE WHEN ld_rule = 'top1' THEN 1 ELSE 0 END) AS n_differ, "
                      "min(abs(ld_source - ld_dest)) AS gap_min, median(abs(ld_source - ld_dest)) AS gap_median, "
                      "max(abs(ld_source - ld_dest)) AS gap_max FROM patching_pairs "
                      "GROUP BY pair, direction ORDER BY pair, direction")
    _headline(ctx, info, f.resid)
    for row in info.iter_rows(named=True):
        _direction_findings(ctx, row, f)
    _attribution_findings(ctx, attr)
    return [Section(TITLE, INTRO, charts=_charts(ctx, f, attr), tables=_tables(ctx, f.heads, attr))]


def _names(ctx: Ctx, pair: str, direction: int) -> tuple[str, str]:
    """(source, destination) template names of a pair direction."""
    a, b = (int(x) for x in pair.split("-"))
    s, d = (a, b) if direction == 0 else (b, a)
    return ctx.template_name(s), ctx.template_name(d)


def _headline(ctx: Ctx, info: pl.DataFrame, resid: pl.DataFrame) -> None:
    """From which layer on (to the last) the last position alone recovers ≥ 0.5 on average, per
    pair direction (templates by index; one clause when every direction agrees)."""
    first: dict[str, int | None] = {}
    for pair, r in info.select("pair", "direction").rows():
        last = resid.filter((pl.col("pair") == pair) & (pl.col("direction") == r) & (pl.col("from_end") == 0))
        below = last.filter(pl.col("mean_recovery") < 0.5)["layer"].max()  # the last layer still under 0.5
        a, b = pair.split("-")
        first[f"template {a} into {b}" if r == 0 else f"template {b} into {a}"] = (
            last.filter(pl.col("layer") > below)["layer"].min() if below is not None else last["layer"].min())
    head = ("The last position's residual alone carries at least half of the difference between the templates "
            "(mean patching recovery ≥ 0.5) ")
    layers = set(first.values())
    if len(layers) == 1 and None not in layers:
        text = f"from layer {layers.pop()} on, in all {len(first)} directions patched."
    else:
        text = "; ".join(f"from layer {x} on for {d}" if x is not None else f"at no layer for {d}"
                         for d, x in first.items()) + "."
    ctx.findings.headline(TEMPLATES, head + text)


def _direction_findings(ctx: Ctx, row: dict, f: Frames) -> None:
    pair, r = row["pair"], row["direction"]
    src, dst = _names(ctx, pair, r)
    ctx.findings.add(TEMPLATES, f"Patching {src} into {dst}: the two prompts' top-1 tokens differ for "
                                f"{row['n_differ']} of {row['n_words']} words; the gap |LD source − LD destination| "
                                f"that recovery divides by is {row['gap_median']:.2f} (median; {row['gap_min']:.2f} to "
                                f"{row['gap_max']:.2f}), where LD's two tokens are each word's own (patching_pairs).")
    mine = (pl.col("pair") == pair) & (pl.col("direction") == r)
    m = f.resid.filter(mine)
    if m.height:
        ctx.findings.add(TEMPLATES, _resid_text(src, dst, m, f.every.filter(mine).sort("layer")))
    for kind, df in (("attention", f.attn), ("MLP", f.mlp)):
        k = df.filter(mine)
        if k.height:
            b = k.sort("mean_recovery", descending=True).row(0, named=True)
            ctx.findings.add(TEMPLATES, f"Best single {kind}-block patch ({src} into {dst}): layer {b['layer']}, "
                                        f"{b['from_end']} before the last ({b['token']!r}), mean recovery "
                                        f"{b['mean_recovery']:.2f}.")
    h = f.heads.filter(mine)
    if h.height:
        top = h.row(0, named=True)
        labels = ", ".join(f"L{x['layer']}H{x['head']} ({x['mean_recovery']:.2f})" for x in h.head(3).iter_rows(named=True))
        text = f"Top heads by recovery ({src} into {dst}): {labels}."
        if h["ablation_rank"].null_count() < h.height:
            both = h.filter(pl.col("ablation_rank") <= 10).height
            text += (f" {both} of the top {h.height} patching heads are also among the 10 heads whose zero "
                     f"ablation hurts the destination's target most (the best patching head ranks "
                     f"{top['ablation_rank']} by ablation and {top['dla_rank']} by DLA). The two measure different "
                     "things: ablation removes a head at every position and reads the target logit, patching swaps "
                     "it at the differing positions only and reads LD.")
        ctx.findings.add(TEMPLATES, text)


def _resid_text(src: str, dst: str, m: pl.DataFrame, ev: pl.DataFrame) -> str:
    """Where the residual carries the difference: the best cell, earlier positions, the last position."""
    best = m.sort("mean_recovery", descending=True).row(0, named=True)
    took = m.filter(pl.col("from_end") == 0).sort("layer").filter(pl.col("mean_recovery") >= 0.5)
    early = m.filter((pl.col("from_end") > 0) & (pl.col("mean_recovery") >= 0.5)).sort("layer")
    text = (f"Residual patching ({src} into {dst}): the largest mean recovery is {best['mean_recovery']:.2f} at "
            f"layer {best['layer']}, {best['from_end']} positions before the last (token {best['token']!r})"
            + (" -- above 1: the patched LD overshoots the source's." if best["mean_recovery"] > 1 else "."))
    if early.height:
        e = early.row(-1, named=True)
        text += (f" An earlier position recovers at least half the difference on average (mean recovery "
                 f"≥ 0.5) up to layer {e['layer']} (token {e['token']!r}: {e['mean_recovery']:.2f})")
        text += (f"; the last position does from layer {took.row(0, named=True)['layer']} on."
                 if took.height else "; the last position alone never reaches 0.5.")
    elif took.height:
        text += f" Only the last position reaches mean recovery 0.5, from layer {took.row(0, named=True)['layer']} on."
    below = ev.filter(pl.col("worst") < 0.5)
    first_all = (ev.filter(pl.col("layer") > below["layer"].max()) if below.height else ev)["layer"].min()
    if first_all is not None:
        text += (f" For every word the last position alone recovers at least 0.5 from layer {first_all} on "
                 "(the hand-off between the two is gradual where these layers differ).")
    return text


def _attribution_findings(ctx: Ctx, attr: pl.DataFrame) -> None:
    if not attr.height:
        return
    by_kind = attr.group_by("kind").agg(pl.col("spearman").mean().alias("rho")).sort("rho", descending=True)
    parts = ", ".join(f"{k['kind']} ρ = {k['rho']:.2f}" for k in by_kind.iter_rows(named=True) if k["rho"] is not None)
    ctx.findings.add(TEMPLATES, f"Attribution patching vs exact, mean rank correlation over layers: {parts}.")
    r0 = attr.filter(pl.col("kind") == "resid")
    if r0["layer"].n_unique() > 2:
        mid = (r0["layer"].min() + r0["layer"].max()) / 2
        lo = r0.filter(pl.col("layer") <= mid)["spearman"].mean()
        hi = r0.filter(pl.col("layer") > mid)["spearman"].mean()
        text = (f"For the residual stream the approximation is {'worse' if lo < hi else 'not worse'} in the "
                f"first half of the layers (≤ {mid:g}: mean ρ {lo:.2f}) than in the second ({hi:.2f}).")
        neg = r0.filter(pl.col("pearson") < 0).sort("direction", "layer")
        if neg.height:
            text += (f" At {neg.height} (direction, layer) groups its Pearson correlation is negative (worst "
                     f"{neg['pearson'].min():.2f}): there attribution gets the sign of the exact effects wrong.")
        ctx.findings.add(TEMPLATES, text)


def _charts(ctx: Ctx, f: Frames, attr: pl.DataFrame) -> list[alt.TopLevelMixin]:
    charts = [recovery_heatmap(f.resid, "Residual patching: mean recovery per layer and position (averaged over words)"),
              recovery_heatmap(f.attn, "Attention-block patching: mean recovery", resid=False),
              recovery_heatmap(f.mlp, "MLP-block patching: mean recovery", resid=False)]
    for w in ctx.words:
        one = ctx.run("patching_recovery_map", kind="resid", word=w)
        if one.height:
            charts.append(recovery_heatmap(one, f"Residual patching for “{w}”"))
    if attr.height:
        charts.append(attribution_scatter(attr))
    return charts


def _tables(ctx: Ctx, heads: pl.DataFrame, attr: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    return [("Pair directions (patching_pairs)",
             ctx.wh.sql("SELECT pair, word, direction, ld_rule, token0_text, token1_text, ld_source, ld_dest, "
                        "shared_prefix, n_unpatchable FROM patching_pairs ORDER BY pair, direction, word")),
            ("Top heads by recovery, with DLA and ablation ranks (patching_top_heads)", heads),
            ("Attribution vs exact per kind and layer (patching_attribution)", attr),
            ("Largest attribution errors (patching_disagreements)", ctx.run("patching_disagreements", top=15)),
            ("Patching invariants, worst over pairs (patching_validation)",
             ctx.wh.sql("SELECT invariant, count(*) AS n_shards, max(rel_err) AS max_rel_err, any_value(tolerance) "
                        "AS tolerance, bool_and(passed) AS passed FROM patching_validation GROUP BY invariant "
                        "ORDER BY invariant"))]
