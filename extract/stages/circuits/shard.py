"""One pair's results -> the typed circuits shard (store.circuits_schema), and writing it.

The invariants of the spec are recorded as a validation array (like extract.patching):
circuit_clean_is_model, eap_node_sum, ig_one_step_is_eap, circuit_all_is_clean,
circuit_none_is_corrupted; each row (max error, relative error, tolerance, passed).
"""

from __future__ import annotations

import math

import numpy as np

from extract.stages.circuits.faithfulness import PairCircuits
from extract.stages.circuits.graph import Graph
from extract.stages.circuits.scores import PairScores
from store.circuits_schema import (
    CIRCUITS_DIR,
    GRAPH_FILE,
    INPUT_KINDS,
    METHODS,
    METRICS,
    SELECTIONS,
    SIZES,
    CircuitGraph,
    CircuitShard,
)
from store.shard import ShardWriter
from store.warehouse import WarehouseWriter, validation_array


def _row(name: str, err: float, scale: float, tol: float) -> tuple[str, float, float, float, bool]:
    rel = err / max(1.0, scale)
    return (name, err, rel, tol, bool(rel <= tol))


def validation(ps: PairScores, pc: PairCircuits, tolerance: float) -> np.ndarray:
    """The pair's invariant rows (relative errors are stored by the engine already, or here)."""
    rows = [(ps_name, e, e, tolerance, bool(e <= tolerance)) for ps_name, e in
            (("circuit_clean_is_model", ps.model_err), ("eap_node_sum", ps.node_sum_err))]
    if not math.isnan(ps.ig1_err):
        rows.append(("ig_one_step_is_eap", ps.ig1_err, ps.ig1_err, tolerance, ps.ig1_err <= tolerance))
    scale = float(np.abs(pc.metric_clean).max())
    rows.append(_row("circuit_all_is_clean", float(pc.full_err.max()), scale, tolerance))
    if "patch" in pc.replacements:
        rows.append(_row("circuit_none_is_corrupted", float(pc.empty_err.max()),
                         float(np.abs(ps.metric_corr).max()), tolerance))
    return validation_array(rows)


def to_shard(ps: PairScores, pc: PairCircuits, tolerance: float, fingerprint: str | None = None) -> CircuitShard:
    """One pair's scores and circuits as the typed shard."""
    if pc.pair is not ps.pair and pc.pair != ps.pair:
        raise ValueError("scores and circuits are of different pairs")
    p = ps.pair
    attrs = {"kind": p.kind, "direction": p.direction, "clean_word": p.clean.word, "corrupted_word": p.corrupted.word,
             "answer_rule": ps.rule, "ig_steps": ps.steps, "methods": list(METHODS), "metrics": list(METRICS),
             "selections": list(SELECTIONS), "replacements": list(pc.replacements), "sizes": list(SIZES),
             "input_kinds": list(INPUT_KINDS)}
    if fingerprint is not None:
        attrs["fingerprint"] = fingerprint
    return CircuitShard(
        prompts=np.array([p.clean.index, p.corrupted.index], np.int32),
        answer_tokens=np.array([ps.t_clean, ps.t_corr], np.int32),
        metric_clean=np.asarray(ps.metric_clean, np.float64),
        metric_corrupted=np.asarray(ps.metric_corr, np.float64),
        scores=ps.scores.astype(np.float32),
        circuit_edges=pc.n_edges.astype(np.int32),
        circuit_metric=pc.metric.astype(np.float64),
        faithfulness=pc.faithfulness.astype(np.float64),
        metric_ref=pc.metric_ref.astype(np.float64),
        cpr=pc.cpr.astype(np.float64),
        cmd=pc.cmd.astype(np.float64),
        sample_edges=pc.sample_edges.astype(np.int32),
        sample_effect=pc.sample_effect.astype(np.float64),
        sample_spearman=pc.spearman.astype(np.float64),
        validation=validation(ps, pc, tolerance),
        attrs=attrs,
    )


def write_shard(writer: WarehouseWriter, shard: CircuitShard, n_edges: int) -> None:
    """``circuits/<kind>/pNNNNN.h5`` (NNNNN = the clean prompt), atomically."""
    shard.check(n_edges)
    sub = f"{CIRCUITS_DIR}/{shard.attrs['kind']}"
    (writer.root / sub).mkdir(parents=True, exist_ok=True)
    with writer.shard_writer(int(shard.prompts[0]), sub) as sw:
        for field, arr in shard.items():
            sw.put(field, arr)
        sw.attrs(shard.attrs)


def graph_data(g: Graph) -> CircuitGraph:
    return CircuitGraph(g.up_names, g.up_layer, g.up_head_index, g.down_names, g.down_kind, g.down_layer,
                        g.down_head, g.edge_up, g.edge_down)


def write_graph(writer: WarehouseWriter, g: Graph) -> None:
    """``circuits/graph.h5``, atomically (recorded in the warehouse's ledger)."""
    (writer.root / CIRCUITS_DIR).mkdir(parents=True, exist_ok=True)
    with ShardWriter(writer.root / CIRCUITS_DIR / GRAPH_FILE, ledger=writer.ledger) as sw:
        for field, arr in graph_data(g).items():
            sw.put(field, arr)
        sw.attrs({"n_layers": g.n_layers, "n_heads": g.n_heads, "n_kv_heads": g.n_kv_heads, "n_edges": g.n_edges})
