"""Views over the circuits shards (``circuits/<kind>/pNNNNN.h5``, store.circuits_schema.CI) and
the edge graph (``circuits/graph.h5``, CG); the numbers are defined in the circuits spec.

A pair is named by (``pair_kind``, ``clean_prompt``): one shard per pair. Light views, read
whole on first use: ``circuit_pairs``, ``circuit_nodes``, ``circuit_scores`` (the compact edge scores: a pair,
method, metric, edge index and score per row), ``circuit_graph`` (one row per edge),
``circuit_faithfulness``, ``circuit_summary``, ``circuit_exact``, ``circuit_validation``.
``circuit_edges`` is derived (SQL): ``circuit_scores`` joined with the pair and the graph, so
a filter on a graph column (layer, head, input kind) or a pair column is a join DuckDB filters
on the small side first. Registered as the kind ``circuits`` (this module's last line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pyarrow as pa

from query.columns import INVARIANT_CHECK, WORD, Column, T
from query.registry import View, ViewKind, register, table
from store.circuits_schema import (
    CG,
    CI,
    CIRCUITS_DIR,
    INPUT_KINDS,
    METHODS,
    METRICS,
    SELECTIONS,
    SIZES,
)
from store.warehouse import shard_indices

if TYPE_CHECKING:
    from query.shards import Shards as Loader

PAIR_KINDS = ("template", "word")
PAIR_KIND = Column("pair_kind", T.VARCHAR, "'template' (the word under the other template) or 'word' (another "
                   "word, same template: the copy circuit)")
CLEAN = Column("clean_prompt", T.INTEGER, "the clean prompt (with pair_kind: the pair)")
CLEAN_WORD = WORD.doc_as("the clean prompt's word")
TEMPLATE = Column("template", T.INTEGER, "the clean prompt's template index")
DIRECTION = Column("direction", T.INTEGER, "template pairs: 0 = template a clean, 1 = template b clean; "
                   "word pairs: NULL")
METHOD = Column("method", T.VARCHAR, "'eap', 'eap_ig_inputs' or 'eap_ig_activations'")
METRIC = Column("metric", T.VARCHAR, "'ld' (logit difference of the pair's answers) or 'kl' (KL from the clean "
                "run)")
EDGE = Column("edge", T.INTEGER, "edge index (row-major over (upstream, downstream) existing edges)")
UPSTREAM = Column("upstream", T.VARCHAR, "sender: 'input' (embeddings), 'a{l}.h{h}' (head), 'm{l}' (MLP)")
DOWNSTREAM = Column("downstream", T.VARCHAR, "receiver: 'a{l}.h{h}<q>', 'a{l}.h{g}<k|v>' (KV head g), 'm{l}', "
                    "'logits'")
INPUT_KIND = Column("input_kind", T.VARCHAR, "the receiver's input: 'q', 'k', 'v', 'mlp' or 'logits'")
UP_LAYER = Column("up_layer", T.INTEGER, "sender's layer (-1: input)")
UP_HEAD = Column("up_head", T.INTEGER, "sender's head (NULL: input or an MLP)")
DOWN_LAYER = Column("down_layer", T.INTEGER, "receiver's layer (logits: L)")
DOWN_HEAD = Column("down_head", T.INTEGER, "receiver's query head (q) or KV head (k, v); NULL otherwise")
SCORE = Column("score", T.FLOAT, "sum over positions of (a_u(corrupted) - a_u(clean)) . dM/d input_d: the "
               "estimated change of M when the edge carries the corrupted value")
SELECTION = Column("selection", T.VARCHAR, "'abs' (top edges by |score|) or 'signed' (by the score moving M "
                   "towards clean)")
REPLACEMENT = Column("replacement", T.VARCHAR, "what edges outside the circuit carry: 'patch' (the corrupted "
                     "run), 'mean' or 'zero'")
_GRAPH_COLS = (EDGE, UPSTREAM, UP_LAYER, UP_HEAD, DOWNSTREAM, INPUT_KIND, DOWN_LAYER, DOWN_HEAD)
_PAIR_COLS = (PAIR_KIND, CLEAN, CLEAN_WORD, TEMPLATE, DIRECTION)

VIEWS: tuple[View, ...] = (
    View("circuit_pairs", "circuits: one row per counterfactual pair (empty unless extracted with --circuits)", (
        *_PAIR_COLS,
        Column("corrupted_prompt", T.INTEGER, "the corrupted (counterfactual) prompt"),
        Column("corrupted_word", T.VARCHAR, "its word"),
        Column("answer_rule", T.VARCHAR, "'top1' (the two runs' top-1s) or 'other' (the clean top-1 and its "
               "strongest other token)"),
        Column("t_clean", T.INTEGER, "ld = logit[t_clean] - logit[t_corr]"),
        Column("t_clean_text", T.VARCHAR, "its text"),
        Column("t_corr", T.INTEGER, "the other answer token"),
        Column("t_corr_text", T.VARCHAR, "its text"),
        Column("ld_clean", T.DOUBLE, "ld of the clean run"),
        Column("ld_corrupted", T.DOUBLE, "ld of the corrupted run"),
        Column("kl_corrupted", T.DOUBLE, "KL(clean || corrupted) (kl of the clean run is 0)"),
        Column("ig_steps", T.INTEGER, "m of EAP-IG"),
    )),
    View("circuit_graph", "circuits: the model's edge graph, one row per edge (empty unless extracted with "
         "--circuits)", _GRAPH_COLS),
    View("circuit_nodes", "circuits: the model graph's nodes, senders then receivers (empty unless extracted with "
         "--circuits)", (
        Column("node", T.VARCHAR, "sender: input, a{l}.h{h}, m{l}; receiver: a{l}.h{h}<q>, a{l}.h{g}<k|v>, m{l}, "
               "logits"),
        Column("side", T.VARCHAR, "'upstream' (a sender) or 'downstream' (a receiver's input)"),
        Column("layer", T.INTEGER, "layer (-1: input; logits: L)"),
        Column("head", T.INTEGER, "head (query head; KV head for k, v); NULL otherwise"),
        INPUT_KIND.doc_as("a receiver's input: q, k, v, mlp or logits (NULL for a sender)"),
        Column("n_edges", T.INTEGER, "edges the node sends (upstream) or receives (downstream)"),
    )),
    View("circuit_scores", "circuits: edge scores, compact (one row per pair, method, metric and edge; "
         "circuit_edges names them)", (PAIR_KIND, CLEAN, METHOD, METRIC, EDGE, SCORE)),
    View("circuit_edges", "circuits: every edge's score per pair, method and metric, with its sender and "
         "receiver (derived from circuit_scores, circuit_pairs, circuit_graph)",
         (*_PAIR_COLS, METHOD, METRIC, *_GRAPH_COLS, SCORE),
         depends=("circuit_scores", "circuit_pairs", "circuit_graph"), sql="""
SELECT p.pair_kind, p.clean_prompt, p.word, p.template, p.direction, s.method, s.metric, g.edge, g.upstream,
       g.up_layer, g.up_head, g.downstream, g.input_kind, g.down_layer, g.down_head, s.score
FROM circuit_scores s
JOIN circuit_pairs p ON p.pair_kind = s.pair_kind AND p.clean_prompt = s.clean_prompt
JOIN circuit_graph g ON g.edge = s.edge"""),
    View("circuit_faithfulness", "circuits: the faithfulness curve, one row per pair, method, metric, "
         "selection, replacement and circuit size (empty unless extracted with --circuits)", (
        *_PAIR_COLS, METHOD, METRIC, SELECTION, REPLACEMENT,
        Column("fraction", T.DOUBLE, "circuit size as a fraction of all edges (0 = empty circuit)"),
        Column("n_edges", T.INTEGER, "edges in the circuit"),
        Column("circuit_metric", T.DOUBLE, "M of the clean input with every edge outside the circuit replaced"),
        Column("faithfulness", T.DOUBLE, "(M(C) - M_ref) / (M(clean) - M_ref): 0 = counterfactual, 1 = clean"),
    )),
    View("circuit_summary", "circuits: CPR and CMD per pair, method, metric, selection and replacement", (
        *_PAIR_COLS, METHOD, METRIC, SELECTION, REPLACEMENT,
        Column("cpr", T.DOUBLE, "trapezoid integral of faithfulness over the sizes (higher is better)"),
        Column("cmd", T.DOUBLE, "trapezoid integral of |1 - faithfulness| (lower is better)"),
        Column("metric_clean", T.DOUBLE, "M of the clean run (kl: 0)"),
        Column("metric_corrupted", T.DOUBLE, "M of the corrupted run"),
        Column("metric_ref", T.DOUBLE, "the normaliser's M_ref (patch: M corrupted; mean/zero: M of the empty "
               "circuit)"),
    )),
    View("circuit_exact", "circuits: sampled single edges, their exact effect beside each method's score", (
        *_PAIR_COLS, METHOD, METRIC, EDGE, UPSTREAM, DOWNSTREAM, INPUT_KIND, SCORE,
        Column("exact_effect", T.DOUBLE, "M(all edges but this one) - M(clean), corrupted replacement: what "
               "the score estimates"),
        Column("spearman", T.DOUBLE, "the pair's rank correlation of score and exact effect over the sampled "
               "edges of this input kind (NULL: < 3 edges or constant)"),
    )),
    View("circuit_validation", "circuits: invariant checks of each pair's shard", (
        PAIR_KIND, CLEAN, Column("invariant", T.VARCHAR, "store.circuits_schema.CIRCUIT_INVARIANTS"),
        *INVARIANT_CHECK)),
)
_BY_NAME = {v.name: v for v in VIEWS}


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _empty(name: str) -> dict[str, list]:
    return {c: [] for c in _BY_NAME[name].names}


def _shards(lo: Loader) -> list[tuple[str, int, h5py.File]]:
    """(pair kind, clean prompt, open shard) of every circuits shard, through the warehouse reader
    (which checks each shard against store.circuits_schema on open and each dataset on first read)."""
    out = []
    for kind in PAIR_KINDS:
        sub = f"{CIRCUITS_DIR}/{kind}"
        for i in shard_indices(lo.r.root / sub):
            with lo.reading(i, sub):
                out.append((kind, i, lo.r.shard(i, sub)))
    return out


class _Pairs:
    """The pair columns of a shard (the clean prompt's template from the manifest, read once)."""

    def __init__(self, lo: Loader) -> None:
        self.template = {int(p["index"]): int(p["template_index"]) for p in lo.r.manifest.get("prompts", [])
                         if p.get("template_index") is not None}

    def __call__(self, kind: str, i: int, f: h5py.File) -> dict[str, Any]:
        return {"pair_kind": kind, "clean_prompt": i, "word": _str(f.attrs["clean_word"]),
                "template": self.template.get(i),
                "direction": int(f.attrs["direction"]) if kind == "template" else None}


def _repeat(cols: dict[str, list], pair: dict[str, Any], n: int) -> None:
    for k, v in pair.items():
        cols[k] += [v] * n


def _grid(*sizes: int) -> list[np.ndarray]:
    """Index arrays of every element of an array of shape ``sizes``, flattened in C order."""
    return [g.reshape(-1) for g in np.indices(sizes)]


def _pairs(lo: Loader) -> pa.Table:
    cols, pair = _empty("circuit_pairs"), _Pairs(lo)
    for kind, i, f in _shards(lo):
        with lo.reading(i, f"{CIRCUITS_DIR}/{kind}"):
            prompts, answers = f[CI.PROMPTS.name][()], f[CI.ANSWER_TOKENS.name][()]
            mc, mx = f[CI.METRIC_CLEAN.name][()], f[CI.METRIC_CORRUPTED.name][()]
            row = {**pair(kind, i, f), "corrupted_prompt": int(prompts[1]),
                   "corrupted_word": _str(f.attrs["corrupted_word"]), "answer_rule": _str(f.attrs["answer_rule"]),
                   "t_clean": int(answers[0]), "t_corr": int(answers[1]),
                   "ld_clean": float(mc[METRICS.index("ld")]), "ld_corrupted": float(mx[METRICS.index("ld")]),
                   "kl_corrupted": float(mx[METRICS.index("kl")]), "ig_steps": int(f.attrs["ig_steps"])}
        row["t_clean_text"], row["t_corr_text"] = lo.text(answers)
        _repeat(cols, row, 1)
    return table(_BY_NAME["circuit_pairs"], lo.d_model, cols)


def _graph(lo: Loader) -> pa.Table:
    cols = _empty("circuit_graph")
    with lo.reading():
        g = lo.r.circuits_graph()
        if g is None:
            return table(_BY_NAME["circuit_graph"], lo.d_model, cols)
        up, down = g[CG.EDGE_UP.name][()], g[CG.EDGE_DOWN.name][()]  # (E,) each
        up_name = np.array([_str(x) for x in g[CG.UP_NAME.name][()]], dtype=object)
        down_name = np.array([_str(x) for x in g[CG.DOWN_NAME.name][()]], dtype=object)
        up_layer, up_head = g[CG.UP_LAYER.name][()][up], g[CG.UP_HEAD.name][()][up]
        kind, d_layer, d_head = (g[fl.name][()][down] for fl in (CG.DOWN_KIND, CG.DOWN_LAYER, CG.DOWN_HEAD))
    cols.update(edge=np.arange(up.size), upstream=up_name[up].tolist(), up_layer=up_layer,
                up_head=[int(h) if h >= 0 else None for h in up_head], downstream=down_name[down].tolist(),
                input_kind=[INPUT_KINDS[k] for k in kind], down_layer=d_layer,
                down_head=[int(h) if h >= 0 else None for h in d_head])
    return table(_BY_NAME["circuit_graph"], lo.d_model, cols)


def _n_edges(lo: Loader) -> int | None:
    """The graph's edge count (the E axis of every shard), None without a graph."""
    with lo.reading():
        g = lo.r.circuits_graph()
        return None if g is None else int(g.attrs["n_edges"])


def _nodes(lo: Loader) -> pa.Table:
    cols = _empty("circuit_nodes")
    with lo.reading():
        g = lo.r.circuits_graph()
        if g is None:
            return table(_BY_NAME["circuit_nodes"], lo.d_model, cols)
        up_name, down_name = ([_str(x) for x in g[fl.name][()]] for fl in (CG.UP_NAME, CG.DOWN_NAME))
        out = np.bincount(g[CG.EDGE_UP.name][()], minlength=len(up_name))
        into = np.bincount(g[CG.EDGE_DOWN.name][()], minlength=len(down_name))
        heads = (g[CG.UP_HEAD.name][()], g[CG.DOWN_HEAD.name][()])
        layers, kinds = (g[CG.UP_LAYER.name][()], g[CG.DOWN_LAYER.name][()]), g[CG.DOWN_KIND.name][()]
    for side, names, n, layer, head in (("upstream", up_name, out, layers[0], heads[0]),
                                        ("downstream", down_name, into, layers[1], heads[1])):
        cols["node"] += names
        cols["side"] += [side] * len(names)
        cols["layer"] += layer.tolist()
        cols["head"] += [int(h) if h >= 0 else None for h in head]
        cols["input_kind"] += [INPUT_KINDS[k] for k in kinds] if side == "downstream" else [None] * len(names)
        cols["n_edges"] += n.tolist()
    return table(_BY_NAME["circuit_nodes"], lo.d_model, cols)


def _scores(lo: Loader) -> pa.Table:
    parts, n_edges = [], _n_edges(lo)
    for kind, i, f in _shards(lo):
        with lo.reading(i, f"{CIRCUITS_DIR}/{kind}"):
            s = f[CI.SCORES.name][()]  # (Me, Mt, E)
            if s.shape != (len(METHODS), len(METRICS), n_edges):
                raise ValueError(f"scores has shape {s.shape}, the graph has {n_edges} edges "
                                 f"({len(METHODS)}, {len(METRICS)}, E)")
        me, mt, e = _grid(*s.shape)
        cols = {"pair_kind": [kind] * s.size, "clean_prompt": np.full(s.size, i), "method": np.array(METHODS)[me],
                "metric": np.array(METRICS)[mt], "edge": e, "score": s.reshape(-1)}
        parts.append(table(_BY_NAME["circuit_scores"], lo.d_model, cols))
    if not parts:
        return table(_BY_NAME["circuit_scores"], lo.d_model, _empty("circuit_scores"))
    return pa.concat_tables(parts)


def _curves(lo: Loader, summary: bool) -> pa.Table:
    """``circuit_faithfulness`` (one row per size) or ``circuit_summary`` (CPR, CMD)."""
    name = "circuit_summary" if summary else "circuit_faithfulness"
    cols, pair = _empty(name), _Pairs(lo)
    for kind, i, f in _shards(lo):
        with lo.reading(i, f"{CIRCUITS_DIR}/{kind}"):
            reps = np.array([_str(r) for r in f.attrs["replacements"]])
            faith, metric = f[CI.FAITHFULNESS.name][()], f[CI.CIRCUIT_METRIC.name][()]  # (Me, Mt, Sel, R, X)
            cpr, cmd, ref = f[CI.CPR.name][()], f[CI.CMD.name][()], f[CI.METRIC_REF.name][()]  # ref (Mt, R)
            mc, mx, n_edges = f[CI.METRIC_CLEAN.name][()], f[CI.METRIC_CORRUPTED.name][()], f[CI.CIRCUIT_EDGES.name][()]
        shape = cpr.shape if summary else faith.shape
        idx = _grid(*shape)
        me, mt, sel, r = idx[:4]
        _repeat(cols, pair(kind, i, f), me.size)
        cols["method"] += np.array(METHODS)[me].tolist()
        cols["metric"] += np.array(METRICS)[mt].tolist()
        cols["selection"] += np.array(SELECTIONS)[sel].tolist()
        cols["replacement"] += reps[r].tolist()
        if summary:
            cols["cpr"] += cpr.reshape(-1).tolist()
            cols["cmd"] += cmd.reshape(-1).tolist()
            cols["metric_clean"] += mc[mt].tolist()
            cols["metric_corrupted"] += mx[mt].tolist()
            cols["metric_ref"] += ref[mt, r].tolist()
        else:
            x = idx[4]
            cols["fraction"] += np.array(SIZES)[x].tolist()
            cols["n_edges"] += n_edges[x].tolist()
            cols["circuit_metric"] += metric.reshape(-1).tolist()
            cols["faithfulness"] += faith.reshape(-1).tolist()
    return table(_BY_NAME[name], lo.d_model, cols)


def _exact(lo: Loader) -> pa.Table:
    cols, pair = _empty("circuit_exact"), _Pairs(lo)
    graph = _graph(lo).to_pydict()
    for kind, i, f in _shards(lo):
        with lo.reading(i, f"{CIRCUITS_DIR}/{kind}"):
            edges, effect = f[CI.SAMPLE_EDGES.name][()], f[CI.SAMPLE_EFFECT.name][()]  # (Es,), (Mt, Es)
            scores = f[CI.SCORES.name][()][:, :, edges]  # (Me, Mt, Es)
            rho = f[CI.SAMPLE_SPEARMAN.name][()]  # (Me, Mt, K)
        me, mt, es = _grid(*scores.shape)
        e = edges[es]
        k = np.array([INPUT_KINDS.index(graph["input_kind"][x]) for x in e], dtype=np.int64)
        _repeat(cols, pair(kind, i, f), me.size)
        cols["method"] += np.array(METHODS)[me].tolist()
        cols["metric"] += np.array(METRICS)[mt].tolist()
        cols["edge"] += e.tolist()
        for c in ("upstream", "downstream", "input_kind"):
            cols[c] += [graph[c][x] for x in e]
        cols["score"] += scores.reshape(-1).tolist()
        cols["exact_effect"] += effect[mt, es].tolist()
        cols["spearman"] += [None if np.isnan(v) else float(v) for v in rho[me, mt, k]]
    return table(_BY_NAME["circuit_exact"], lo.d_model, cols)


def _validation(lo: Loader) -> pa.Table:
    cols = _empty("circuit_validation")
    for kind, i, f in _shards(lo):
        with lo.reading(i, f"{CIRCUITS_DIR}/{kind}"):
            rows = f[CI.VALIDATION.name][()]
        for row in rows:
            _repeat(cols, {"pair_kind": kind, "clean_prompt": i, "invariant": _str(row["invariant"]),
                           "max_abs_err": float(row["max_abs_err"]), "rel_err": float(row["rel_err"]),
                           "tolerance": float(row["tolerance"]), "passed": bool(row["passed"])}, 1)
    return table(_BY_NAME["circuit_validation"], lo.d_model, cols)


KIND = register(ViewKind("circuits", VIEWS, light={
    "circuit_pairs": _pairs, "circuit_graph": _graph, "circuit_nodes": _nodes, "circuit_scores": _scores,
    "circuit_faithfulness": lambda lo: _curves(lo, summary=False),
    "circuit_summary": lambda lo: _curves(lo, summary=True),
    "circuit_exact": _exact, "circuit_validation": _validation}))
