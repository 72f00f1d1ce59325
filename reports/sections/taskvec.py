"""Section "Is there one 'repeat' inside the model?": task vectors (Hendel et al. 2023), function
vectors (Todd et al. 2024) and steering by contrast (Turner et al. 2023; Rimsky et al. 2024).

Reads only named analyses (taskvec_accuracy_by_layer, taskvec_steering, taskvec_top_heads,
taskvec_cosine) and the taskvec_split view; every number in its findings is a value of those
frames. Present only when the warehouse has task-vector shards (extracted with --task-vectors).
"""

from __future__ import annotations

import altair as alt
import polars as pl

from reports.charts import WIDTH, data
from reports.context import Ctx
from reports.model import Question, Section

REPEAT = Question("Is there one 'repeat' inside the model?", "q-repeat")
TITLE = "Is there one 'repeat' inside the model?"
INTRO = (
    "Three standard probes of a transferable task representation, all built from the TRAIN half of "
    "the word list (even indices) and evaluated on the HELD-OUT half only. Task vector (Hendel et al. "
    "2023): the mean last-position residual of prompts of demonstrations (“w -> w”) or of the repeat "
    "instruction, written over the last position of a zero-shot (“x ->”) or neutral (“the following "
    "word: x”) prompt at one boundary. Function vector (Todd et al. 2024): the sum of the mean outputs "
    "of the k heads with the largest average indirect effect (AIE: the target-probability gain when "
    "one head's mean output is put into prompts whose demonstrations are shuffled), added at one "
    "boundary. Steering (Turner et al. 2023; Rimsky et al. 2024): SV = mean repeat − mean echo "
    "residual, added with a coefficient to echo prompts (towards repeat) or subtracted from repeat "
    "prompts (towards echo), at the last token or at every token from the verb on. Accuracy = the "
    "share of held-out words whose top-1 is the word's first token (with or without a leading space "
    "and capital)."
)
TOP = 10


def _variant(df: pl.DataFrame) -> pl.DataFrame:
    """A label per curve: 'task_vector demo->zero_shot', 'function_vector k=10 ->neutral'."""
    k = pl.when(pl.col("k").is_null()).then(pl.lit("")).otherwise(pl.lit(" k=") + pl.col("k").cast(pl.Utf8))
    return df.with_columns((pl.col("method") + k + pl.lit(" ") + pl.col("source_kind") + pl.lit("->")
                            + pl.col("dest_kind")).alias("variant"))


def accuracy_chart(acc: pl.DataFrame) -> alt.LayerChart:
    """taskvec_accuracy_by_layer: accuracy per layer, one line per variant, rules at the baselines."""
    curves = alt.Chart(data(acc.select("variant", "layer", "accuracy", "mean_target_prob", "n_words")),
                       title="Echo accuracy on held-out words by the layer a vector is put in at").mark_line(
        point=True).encode(
        x=alt.X("layer:Q", title="boundary − 1 (−1 = embeddings)"),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])), color=alt.Color("variant:N"),
        tooltip=["variant:N", "layer:Q", alt.Tooltip("accuracy:Q", format=".3f"),
                 alt.Tooltip("mean_target_prob:Q", format=".4f"), "n_words:Q"])
    base = pl.concat([acc.select(pl.col("dest_kind").alias("kind"), pl.col("dest_clean_accuracy").alias("accuracy")),
                      acc.select(pl.col("source_kind").alias("kind"),
                                 pl.col("source_clean_accuracy").alias("accuracy"))]).unique().drop_nulls()
    rules = alt.Chart(data(base.with_columns(("clean " + pl.col("kind")).alias("baseline")))).mark_rule(
        strokeDash=[4, 3]).encode(y="accuracy:Q", color=alt.Color("baseline:N"),
                                  tooltip=["baseline:N", alt.Tooltip("accuracy:Q", format=".3f")])
    return (curves + rules).properties(width=WIDTH, height=280)


def steering_chart(st: pl.DataFrame) -> alt.Chart:
    """taskvec_steering: accuracy by |coefficient|, one line per layer, per direction and position mode."""
    df = st.with_columns(pl.col("coefficient").abs().alias("c")).select(
        "direction", "position_mode", "layer", "c", "accuracy", "mean_target_prob", "mean_kl")
    return alt.Chart(data(df), title="Steering response: echo accuracy by coefficient").mark_line(point=True).encode(
        x=alt.X("c:Q", title="|coefficient| of SV"), y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("layer:O", title="layer"), column=alt.Column("direction:N"),
        row=alt.Row("position_mode:N"),
        tooltip=["direction:N", "position_mode:N", "layer:O", "c:Q", alt.Tooltip("accuracy:Q", format=".3f"),
                 alt.Tooltip("mean_target_prob:Q", format=".4f"), alt.Tooltip("mean_kl:Q", format=".3f")],
    ).properties(width=280, height=180)


def cosine_chart(cos: pl.DataFrame) -> alt.Chart:
    """taskvec_cosine: each vector's cosine with SV per layer, beside the templates' own cosine."""
    vec = cos.select("vector", "layer", pl.col("cosine_with_steer").alias("cosine"))
    tmpl = cos.filter(pl.col("vector") == cos["vector"][0])
    lines = pl.concat([
        vec.with_columns(pl.lit("cos(vector, SV)").alias("measure")),
        tmpl.select(pl.lit("templates: cos(mean repeat, mean echo)").alias("vector"), "layer",
                    pl.col("template_mean_cosine").alias("cosine"), pl.lit("template cosine").alias("measure")),
        tmpl.select(pl.lit("templates: mean per-word cosine").alias("vector"), "layer",
                    pl.col("template_word_cosine").alias("cosine"), pl.lit("template cosine").alias("measure")),
    ]).drop_nulls("cosine")
    return alt.Chart(data(lines), title="Cosine of each vector with the template difference SV, per layer").mark_line(
        point=True).encode(
        x=alt.X("layer:Q", title="layer (−1 = embeddings)"), y=alt.Y("cosine:Q", scale=alt.Scale(domain=[-1, 1])),
        color="vector:N", strokeDash="measure:N",
        tooltip=["vector:N", "layer:Q", alt.Tooltip("cosine:Q", format=".4f")],
    ).properties(width=WIDTH, height=260)


def _best(g: pl.DataFrame) -> dict:
    return g.sort(["accuracy", "mean_target_prob"], descending=True).row(0, named=True)


def _where_it_works(ctx: Ctx, acc: pl.DataFrame) -> None:
    """Headline: the demo task vector's best layer against the zero-shot floor and demo ceiling;
    then the repeat task vector's, and the best function vector (over k, destination and layer)."""
    tv = acc.filter(pl.col("method") == "task_vector").sort("source_kind")
    rows = [_best(g) for _, g in tv.group_by(["source_kind", "dest_kind"], maintain_order=True)]
    fv = acc.filter(pl.col("method") == "function_vector")
    rows += [_best(fv)] if fv.height else []
    for i, best in enumerate(rows):
        k = "" if best["k"] is None else f" of the top {best['k']} AIE heads"
        text = (f"The {best['method'].replace('_', ' ')}{k} from {best['source_kind']} prompts, put into "
                f"{best['dest_kind']} prompts, works best at layer {best['layer']}: {best['accuracy']:.0%} of "
                f"{best['n_words']} held-out words echo (mean target probability {best['mean_target_prob']:.3f}), "
                f"against {best['dest_clean_accuracy']:.0%} for the clean {best['dest_kind']} prompt and "
                f"{best['source_clean_accuracy']:.0%} for the clean {best['source_kind']} prompt.")
        (ctx.findings.headline if i == 0 else ctx.findings.add)(REPEAT, text)


def _heads(ctx: Ctx, heads: pl.DataFrame) -> None:
    """Whether the top AIE heads are the heads ablation (and DLA, patching) ranks high."""
    if not heads.height:
        return
    top = heads.row(0, named=True)
    n = heads.height
    ranks = ", ".join(f"{name} rank {top[col]}" for name, col in (("ablation", "ablation_rank"), ("DLA", "dla_rank"),
                                                                ("patching", "patching_rank"), ("sink", "sink_rank"))
                      if top[col] is not None)
    ctx.findings.add(REPEAT, f"The head with the largest AIE is L{top['layer']}H{top['head']} "
                             f"(AIE {top['aie']:.3g}){f'; {ranks}' if ranks else ''}.")
    if heads["ablation_rank"].null_count() < n:
        both = heads.filter(pl.col("ablation_rank") <= n).height
        ctx.findings.add(REPEAT, f"Of the top {n} heads by AIE, {both} are also among the top {n} by zero "
                                 "ablation: " + ("mostly the same heads." if 2 * both > n else
                                                 "the heads that carry the task are mostly not the heads "
                                                 "whose removal hurts the answer."))


def _steering(ctx: Ctx, st: pl.DataFrame) -> None:
    """Per direction: the largest accuracy change steering makes from the clean prompt towards the
    other template's clean accuracy (up for echo -> repeat, down for repeat -> echo)."""
    for (direction,), g in st.group_by(["direction"], maintain_order=True):
        way = (pl.col("towards_clean_accuracy") - pl.col("dest_clean_accuracy")).sign()
        way = pl.when(way == 0).then(1).otherwise(way)
        g = g.with_columns(((pl.col("accuracy") - pl.col("dest_clean_accuracy")) * way).alias("gain"),
                           (pl.col("mean_target_prob") * way).alias("prob_gain"))
        best = g.sort(["gain", "prob_gain"], descending=True).row(0, named=True)
        dest, towards = direction.split("->")
        ctx.findings.add(REPEAT, f"Steering {dest} prompts towards {towards} ({best['position_mode']} position mode, "
                                 f"layer {best['layer']}, coefficient {best['coefficient']:g}) gives "
                                 f"{best['accuracy']:.0%} echo accuracy (mean target probability "
                                 f"{best['mean_target_prob']:.3f}) against {best['dest_clean_accuracy']:.0%} for "
                                 f"the clean {dest} prompt and {best['towards_clean_accuracy']:.0%} for the clean "
                                 f"{towards} prompt.")


def _cosine(ctx: Ctx, cos: pl.DataFrame) -> None:
    tv = cos.filter(pl.col("vector").str.starts_with("tv_")).drop_nulls("cosine_with_steer")
    if not tv.height:
        return
    big = tv.sort(pl.col("cosine_with_steer").abs(), descending=True).row(0, named=True)
    low = cos.drop_nulls("template_mean_cosine").sort("template_mean_cosine").row(0, named=True)
    verdict = ("nearly orthogonal to" if abs(big["cosine_with_steer"]) < 0.3 else "partly aligned with")
    ctx.findings.add(REPEAT, f"The largest |cosine| of a task vector with the template difference SV is "
                             f"{big['cosine_with_steer']:.3f} ({big['vector']}, layer {big['layer']}): the task "
                             f"vectors are {verdict} what separates the templates. The two templates' mean "
                             f"residuals have their lowest cosine, {low['template_mean_cosine']:.3f}, at layer "
                             f"{low['layer']}.")


def sections(ctx: Ctx) -> list[Section]:
    split = ctx.wh.sql("SELECT split, count(*) AS n FROM taskvec_split GROUP BY split ORDER BY split")
    if not split.height:
        return []  # no --task-vectors: the section is absent
    acc = _variant(ctx.run("taskvec_accuracy_by_layer"))
    st = ctx.run("taskvec_steering")
    heads = ctx.run("taskvec_top_heads", top=TOP)
    cos = ctx.run("taskvec_cosine")
    n = dict(split.rows())
    _where_it_works(ctx, acc)
    _heads(ctx, heads)
    _steering(ctx, st)
    _cosine(ctx, cos)
    intro = INTRO + f" This warehouse: {n.get('train', 0)} train and {n.get('held_out', 0)} held-out words."
    return [Section(TITLE, intro, charts=[accuracy_chart(acc), steering_chart(st), cosine_chart(cos)],
                    tables=[(f"Top {TOP} heads by AIE, with their ablation, DLA, patching and sink ranks", heads)])]
