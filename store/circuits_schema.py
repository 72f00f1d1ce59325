"""The circuits part of the warehouse schema (issue 17; the numbers are defined in the circuits
spec, extract.stages.circuits' module docstrings summarise it).

Layout::

    W/circuits/graph.h5                  the edge graph of the model (CG): one per warehouse
    W/circuits/<kind>/pNNNNN.h5          one shard per pair (CI); kind 'template' or 'word',
                                         NNNNN = the clean prompt's index

Axis symbols: Me methods (``METHODS``), Mt metrics (``METRICS``), E edges (graph order: row-major
over (upstream, downstream) existing edges), U upstream nodes, Dn downstream inputs, Sel circuit
selections (``SELECTIONS``), R replacements (attribute ``replacements``), X circuit sizes
(``SIZES``), Es sampled edges, K input kinds (``INPUT_KINDS``), I validation rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from store.schema import Field

CIRCUITS_DIR = "circuits"
GRAPH_FILE = "graph.h5"
METHODS = ("eap", "eap_ig_inputs", "eap_ig_activations")
METRICS = ("ld", "kl")
SELECTIONS = ("abs", "signed")
SIZES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
INPUT_KINDS = ("q", "k", "v", "mlp", "logits")


class CG:
    """Fields of ``circuits/graph.h5``."""

    UP_NAME = Field("up_name", ("U",), "str", "upstream node: input, a{l}.h{h}, m{l}")
    UP_LAYER = Field("up_layer", ("U",), "int16", "layer of the upstream node (-1: input)")
    UP_HEAD = Field("up_head", ("U",), "int16", "head of the upstream node (-1: input, MLP)")
    DOWN_NAME = Field("down_name", ("Dn",), "str", "downstream input: a{l}.h{h}<q>, a{l}.h{g}<k|v>, m{l}, logits")
    DOWN_KIND = Field("down_kind", ("Dn",), "int8", "index into INPUT_KINDS (q, k, v, mlp, logits)")
    DOWN_LAYER = Field("down_layer", ("Dn",), "int16", "layer read (logits: L)")
    DOWN_HEAD = Field("down_head", ("Dn",), "int16", "query head (q), KV head (k, v), else -1")
    EDGE_UP = Field("edge_up", ("E",), "int32", "upstream index of each edge")
    EDGE_DOWN = Field("edge_down", ("E",), "int32", "downstream index of each edge")


class CI:
    """Fields of a circuits shard ``circuits/<kind>/pNNNNN.h5`` (one pair)."""

    PROMPTS = Field("prompts", ("2",), "int32", "(clean prompt, corrupted prompt) indices")
    ANSWER_TOKENS = Field("answer_tokens", ("2",), "int32",
                          "(t_clean, t_corr): ld = logit[t_clean] - logit[t_corr] (rule: attribute answer_rule)")
    METRIC_CLEAN = Field("metric_clean", ("Mt",), "float64", "M of the clean run (kl: 0)")
    METRIC_CORRUPTED = Field("metric_corrupted", ("Mt",), "float64", "M of the corrupted run")
    SCORES = Field("scores", ("Me", "Mt", "E"), "float32",
                   "edge score: sum over positions of (a_u(corr) - a_u(clean)) . g_d, the estimated change "
                   "of M when the edge carries the corrupted value")
    CIRCUIT_EDGES = Field("circuit_edges", ("X",), "int32", "edges in the circuit of each size")
    CIRCUIT_METRIC = Field("circuit_metric", ("Me", "Mt", "Sel", "R", "X"), "float64",
                           "M of the clean input with every edge outside the circuit replaced")
    FAITHFULNESS = Field("faithfulness", ("Me", "Mt", "Sel", "R", "X"), "float64",
                         "(M(C) - M_ref) / (M(clean) - M_ref); M_ref = M(corrupted) (patch) or M(empty circuit)")
    METRIC_REF = Field("metric_ref", ("Mt", "R"), "float64", "the normaliser's M_ref per replacement")
    CPR = Field("cpr", ("Me", "Mt", "Sel", "R"), "float64", "trapezoid integral of f over SIZES (higher is better)")
    CMD = Field("cmd", ("Me", "Mt", "Sel", "R"), "float64", "trapezoid integral of |1 - f| over SIZES (lower is better)")
    SAMPLE_EDGES = Field("sample_edges", ("Es",), "int32", "edges whose exact effect was computed")
    SAMPLE_EFFECT = Field("sample_effect", ("Mt", "Es"), "float64",
                          "exact effect M(all edges but e) - M(clean), corrupted replacement")
    SAMPLE_SPEARMAN = Field("sample_spearman", ("Me", "Mt", "K"), "float64",
                            "rank correlation of scores with the exact effects per input kind (NaN: < 3 or constant)")
    VALIDATION = Field("validation", ("I",), "compound", "invariant checks of this pair (CIRCUIT_INVARIANTS)")


CIRCUIT_INVARIANTS: dict[str, str] = {
    "circuit_clean_is_model": "the engine's clean and corrupted forwards == the model's own logits",
    "eap_node_sum": "sum over u of eap(u -> d) == (input_d(corr) - input_d(clean)) . dM/d input_d, every d, both metrics",
    "ig_one_step_is_eap": "eap_ig_inputs and eap_ig_activations with m = 1 == eap (every edge, both metrics)",
    "circuit_all_is_clean": "M(all edges) == M(clean), every replacement and metric (f = 1)",
    "circuit_none_is_corrupted": "M(no edges) == M(corrupted) with the corrupted replacement (f = 0)",
}

CIRCUIT_ATTRS: dict[str, str] = {
    "kind": "'template' or 'word'",
    "direction": "template pairs: 0 = template a clean, 1 = template b clean; word pairs: 0",
    "clean_word": "the clean prompt's word",
    "corrupted_word": "the corrupted prompt's word",
    "answer_rule": "'top1' (the two runs' top-1s) or 'other' (clean top-1 and its strongest other token)",
    "ig_steps": "m of EAP-IG",
    "methods": "the Me axis", "metrics": "the Mt axis", "selections": "the Sel axis",
    "replacements": "the R axis ('patch', 'mean', 'zero')", "sizes": "the X axis (fractions of edges)",
    "input_kinds": "the K axis",
    "fingerprint": "the run fingerprint",
}


@dataclass(frozen=True)
class CircuitShard:
    """One pair's circuits shard, each array under its Field (``items``)."""

    prompts: np.ndarray
    answer_tokens: np.ndarray
    metric_clean: np.ndarray
    metric_corrupted: np.ndarray
    scores: np.ndarray
    circuit_edges: np.ndarray
    circuit_metric: np.ndarray
    faithfulness: np.ndarray
    metric_ref: np.ndarray
    cpr: np.ndarray
    cmd: np.ndarray
    sample_edges: np.ndarray
    sample_effect: np.ndarray
    sample_spearman: np.ndarray
    validation: np.ndarray
    attrs: dict  # CIRCUIT_ATTRS keys -> values

    def items(self) -> tuple[tuple[Field, np.ndarray], ...]:
        return ((CI.PROMPTS, self.prompts), (CI.ANSWER_TOKENS, self.answer_tokens),
                (CI.METRIC_CLEAN, self.metric_clean), (CI.METRIC_CORRUPTED, self.metric_corrupted),
                (CI.SCORES, self.scores), (CI.CIRCUIT_EDGES, self.circuit_edges),
                (CI.CIRCUIT_METRIC, self.circuit_metric), (CI.FAITHFULNESS, self.faithfulness),
                (CI.METRIC_REF, self.metric_ref), (CI.CPR, self.cpr), (CI.CMD, self.cmd),
                (CI.SAMPLE_EDGES, self.sample_edges), (CI.SAMPLE_EFFECT, self.sample_effect),
                (CI.SAMPLE_SPEARMAN, self.sample_spearman), (CI.VALIDATION, self.validation))

    def check(self, n_edges: int) -> None:
        """Shapes agree with the axes (raises ValueError saying which field is off)."""
        sizes = {"2": 2, "Me": len(METHODS), "Mt": len(METRICS), "E": n_edges, "Sel": len(SELECTIONS),
                 "R": len(self.attrs["replacements"]), "X": len(SIZES), "K": len(INPUT_KINDS),
                 "Es": len(self.sample_edges), "I": len(self.validation)}
        for f, arr in self.items():
            want = tuple(sizes[a] for a in f.axes)
            if arr.shape != want:
                raise ValueError(f"circuits shard field {f.name}: shape {arr.shape}, axes {f.axes} need {want}")
        missing = set(CIRCUIT_ATTRS) - set(self.attrs) - {"fingerprint"}
        if missing:
            raise ValueError(f"circuits shard misses attributes {sorted(missing)}")


@dataclass(frozen=True)
class CircuitGraph:
    """The graph file's arrays, each under its Field (``items``)."""

    up_name: tuple[str, ...]
    up_layer: np.ndarray
    up_head: np.ndarray
    down_name: tuple[str, ...]
    down_kind: np.ndarray
    down_layer: np.ndarray
    down_head: np.ndarray
    edge_up: np.ndarray
    edge_down: np.ndarray

    def items(self) -> tuple[tuple[Field, object], ...]:
        return ((CG.UP_NAME, list(self.up_name)), (CG.UP_LAYER, self.up_layer), (CG.UP_HEAD, self.up_head),
                (CG.DOWN_NAME, list(self.down_name)), (CG.DOWN_KIND, self.down_kind),
                (CG.DOWN_LAYER, self.down_layer), (CG.DOWN_HEAD, self.down_head),
                (CG.EDGE_UP, self.edge_up), (CG.EDGE_DOWN, self.edge_down))
