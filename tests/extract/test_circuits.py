"""extract.stages.circuits == the spec computed independently (tests/extract/hooked_circuits.py: an
unmodified HF forward with hooks on the real modules, autograd, one forward per step, group and
circuit), on a tiny random model of EVERY family in float64 (tolerance 1e-6 relative to
max(1, max |reference|)) and on the embedded SmolLM2 in float32 (1e-4, slow).

Tiny models: 3 layers, 4 query / 2 KV heads (qwen2: 6 / 1), biases where the family has them
(gemma: no o_proj bias -- refused under sandwich norms, tested), windows (5) shorter than the
8-token prompts, every family switch of tests/conftest.py.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from extract.models.families import Adapter, ModelError
from extract.stages.circuits.faithfulness import (
    evaluate_circuits,
    node_means,
    select,
    spearman,
    trapezoid,
)
from extract.stages.circuits.graph import Graph, InputKind, graph_of
from extract.stages.circuits.pairs import CircuitPair, template_pairs, word_pairs
from extract.stages.circuits.scores import score_pairs
from extract.stages.circuits.shard import to_shard, write_graph, write_shard
from extract.stages.prompts import Prompt
from store.circuits_schema import CG, CI, INPUT_KINDS, METHODS, METRICS, SIZES
from store.warehouse import WarehouseWriter
from tests.conftest import _family_config, _spread_weights
from tests.extract import hooked_circuits as hc

TOL64 = 1e-6
TOL32 = 1e-4
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text")
CLEAN = [1, 5, 7, 9, 3, 11, 13, 4]
CORR = [1, 6, 7, 9, 3, 12, 13, 4]


def _err(got, ref) -> float:
    got = torch.tensor(np.array(got, np.float64))
    ref = torch.tensor(np.array(ref, np.float64)) if isinstance(ref, np.ndarray) else torch.as_tensor(ref).double()
    return float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def tiny(family: str, o_bias: bool = False):
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=6, num_key_value_heads=1)
    else:
        cfg = _family_config(family, 64, 1, 2)
        if family.startswith("gemma"):
            cfg.attention_bias = o_bias
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg)
    _spread_weights(model, 0)
    return model.double().eval()


def prompt(i: int, ids, word: str = "w", template: int = 0, word_start: int = 1) -> Prompt:
    return Prompt(i, word, template, "t", "", tuple(ids), (), (0,) * len(ids), (), word_start, word_start + 1)


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    model = tiny(request.param)
    ad = Adapter(model)
    pair = CircuitPair("word", prompt(0, CLEAN), prompt(1, CORR))
    return ad, hc.Hooked(model), pair, score_pairs(ad, [pair], steps=3)[0]


# -- the graph and the pairs ---------------------------------------------------------------------


@pytest.mark.parametrize("shape,edges", [((30, 9, 3), 70651), ((18, 4, 1), 5644), ((28, 12, 2), 84715)])
def test_edge_counts(shape, edges):
    g = Graph(*shape)
    assert g.n_edges == g.expected_edges() == edges
    up, down, exists = hc.names(*shape)
    assert list(g.up_names) == up and list(g.down_names) == down
    assert np.array_equal(g.exists, exists.numpy())
    assert [k.name.lower() for k in InputKind] == list(INPUT_KINDS)


def test_edge_index_is_row_major_and_matrix_inverts():
    g = Graph(2, 3, 1)
    flat = np.nonzero(g.exists.ravel())[0]
    assert np.array_equal(flat, g.edge_up * g.n_down + g.edge_down)
    vals = np.arange(1, g.n_edges + 1, dtype=np.float64)
    assert np.array_equal(g.matrix(vals)[g.edge_up, g.edge_down], vals)


def test_template_pairs_both_directions_and_unequal_lengths_reported():
    ps = [prompt(0, [1, 2, 3], "cat", 0), prompt(1, [1, 2, 3, 4], "dog", 0),
          prompt(2, [1, 5, 3], "cat", 1), prompt(3, [1, 5, 3], "dog", 1)]
    got = template_pairs(ps)
    assert [(p.clean.index, p.corrupted.index, p.direction) for p in got.pairs] == [(0, 2, 0), (2, 0, 1)]
    assert [(s.clean, s.corrupted) for s in got.skipped] == [(1, 3), (3, 1)]
    assert all("lengths differ" in s.reason for s in got.skipped)
    with pytest.raises(ValueError, match="equal length"):
        CircuitPair("template", ps[0], ps[1])


def test_word_pairs_next_word_cyclically_same_length_other_first_token():
    # words a..e of template 0: b is longer, c starts with a's token
    ps = [prompt(0, [1, 10, 3], "a"), prompt(1, [1, 11, 12, 3], "b"), prompt(2, [1, 10, 3], "c"),
          prompt(3, [1, 13, 3], "d"), prompt(4, [1, 14, 15, 3], "e")]
    got = word_pairs(ps)
    assert [(p.clean.word, p.corrupted.word) for p in got.pairs] == [
        ("a", "d"), ("b", "e"), ("c", "d"), ("d", "a"), ("e", "b")]
    alone = word_pairs([prompt(0, [1, 10, 3], "a"), prompt(1, [1, 10, 3], "c")])
    assert not alone.pairs and len(alone.skipped) == 2 and "no other word" in alone.skipped[0].reason


# -- scores ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_scores_equal_hooked_reference(fam, method):
    ad, hk, pair, ps = fam
    g = graph_of(ad.arch)
    mi = METHODS.index(method)
    for ki, metric in enumerate(METRICS):
        ref = hc.scores(hk, CLEAN, CORR, method, metric, m=3)[g.edge_up, g.edge_down]
        assert _err(ps.scores[mi, ki], ref) <= TOL64, (method, metric)
        if not (method == "eap" and metric == "kl"):  # KL's gradient vanishes at the clean run
            assert np.abs(ps.scores[mi, ki]).max() > 1e-3, "scores must be non-trivial, or this proves nothing"


def test_score_invariants(fam):
    ad, _, pair, ps = fam
    assert ps.node_sum_err <= TOL64 and ps.ig1_err <= TOL64 and ps.model_err <= TOL64
    one = score_pairs(ad, [pair], steps=1, check=False)[0]
    assert _err(one.scores[1:], np.broadcast_to(one.scores[0], one.scores[1:].shape)) <= 1e-12


def test_batched_pairs_equal_one_at_a_time():
    ad = Adapter(tiny("qwen3"))
    pairs = [CircuitPair("word", prompt(0, CLEAN), prompt(1, CORR)),
             CircuitPair("word", prompt(2, [1, 8, 2, 9, 3, 7, 13, 4]), prompt(3, CLEAN))]
    together = score_pairs(ad, pairs, steps=2, batch=2, check=False)
    for p, t in zip(pairs, together, strict=True):
        alone = score_pairs(ad, [p], steps=2, check=False)[0]
        assert _err(t.scores, alone.scores) <= 1e-9


def test_sandwich_with_o_bias_is_refused():
    ad = Adapter(tiny("gemma2", o_bias=True))
    with pytest.raises(ModelError, match="o_proj bias"):
        score_pairs(ad, [CircuitPair("word", prompt(0, CLEAN), prompt(1, CORR))])


# -- circuits ----------------------------------------------------------------------------------


def test_faithfulness_equals_one_hooked_circuit_forward(fam):
    ad, hk, pair, ps = fam
    g = graph_of(ad.arch)
    sandwich = ad.family.sandwich
    # zero replacement under sandwich norms reads 0 + rounding into RMSNorms (no bias): ill-conditioned
    reps = ("patch", "mean") if sandwich else ("patch", "mean", "zero")
    means = node_means(ad, [pair.clean, pair.corrupted])
    pc = evaluate_circuits(ad, [ps], replacements=reps, means=means, n_top=3, n_random=3)[0]
    lc, lx, oc, ox = hc.clean_runs(hk, CLEAN, CORR)
    t = hc.answer_tokens(lc, lx)
    lp = torch.log_softmax(lc.double(), -1)
    mc, mx = (float(hc.metric(x, "ld", t, lp)) for x in (lc, lx))
    moved = 0.0
    for ri, rep in enumerate(reps):
        repl = {"patch": ox, "mean": means[:, None].expand_as(ox), "zero": torch.zeros_like(ox)}[rep]
        empty = float(hc.metric(hc.circuit_logits(hk, CLEAN, repl, torch.zeros_like(hk.exists)), "ld", t, lp))
        ref_corr = mx if rep == "patch" else empty
        for mi, si, xi in ((0, 0, 7), (1, 1, 8), (2, 0, 9), (2, 1, 5)):
            sign = float(np.sign(mc - ref_corr))  # the normalisation's M(corrupted): empty circuit under mean/zero
            inside = np.zeros(g.n_edges, bool)
            inside[select(ps.scores[mi, 0], int(pc.n_edges[xi]), ("abs", "signed")[si], sign)] = True
            lg = hc.circuit_logits(hk, CLEAN, repl, torch.as_tensor(g.matrix(inside)))
            m_c = float(hc.metric(lg, "ld", t, lp))
            assert _err(pc.metric[mi, 0, si, ri, xi], m_c) <= TOL64
            assert abs(pc.faithfulness[mi, 0, si, ri, xi] - (m_c - ref_corr) / (mc - ref_corr)) <= 1e-5
            moved = max(moved, abs(m_c - mc))
        f = pc.faithfulness[:, :, :, ri]
        assert np.abs(f[..., -1] - 1).max() <= 1e-9 and np.abs(f[..., 0]).max() <= 1e-9  # f(all)=1, f(none)=0
    assert moved > 1e-2, "circuits must change the metric, or this test proves nothing"
    assert pc.full_err.max() <= 1e-12 and pc.empty_err.max() <= 1e-9
    assert np.allclose(pc.cpr, trapezoid(SIZES, pc.faithfulness)) and pc.cpr.shape == (3, 2, 2, len(reps))
    # exact single-edge effects: M(all edges but e) - M(clean), from the hooked forward
    for j in range(0, len(pc.sample_edges), 5):
        keep = np.ones(g.n_edges, bool)
        keep[pc.sample_edges[j]] = False
        lg = hc.circuit_logits(hk, CLEAN, ox, torch.as_tensor(g.matrix(keep)))
        assert abs(pc.sample_effect[0, j] - (float(hc.metric(lg, "ld", t, lp)) - mc)) <= TOL64
    assert set(g.edge_kind[pc.sample_edges]) == set(InputKind)


def test_spearman_and_selection_ties():
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.array([1.0, 2]), np.array([1.0, 2])))
    s = np.array([0.5, -2.0, 0.5, 2.0, 0.1])
    assert list(select(s, 3, "abs", 1.0)) == [1, 3, 0]  # |-2| = |2|: lower edge index first
    assert list(select(s, 2, "signed", 1.0)) == [1, 4]  # -score * sign: -(-2) first
    assert list(select(s, 2, "signed", -1.0)) == [3, 0]


# -- the shard ---------------------------------------------------------------------------------


def test_shard_round_trip(tmp_path):
    ad = Adapter(tiny("llama"))
    g = graph_of(ad.arch)
    pair = CircuitPair("word", prompt(3, CLEAN, "cat"), prompt(4, CORR, "dog"))
    ps = score_pairs(ad, [pair], steps=2)[0]
    pc = evaluate_circuits(ad, [ps], n_top=2, n_random=2)[0]
    shard = to_shard(ps, pc, TOL64)
    val = shard.validation
    assert list(val["invariant"].astype(str)) == ["circuit_clean_is_model", "eap_node_sum", "ig_one_step_is_eap",
                                                  "circuit_all_is_clean", "circuit_none_is_corrupted"]
    assert val["passed"].all(), val
    w = WarehouseWriter.create(tmp_path / "w", {"fingerprint": "x", "fingerprint_parts": {}}, resume=False)
    write_graph(w, g)
    write_shard(w, shard, g.n_edges)
    w.close()
    with h5py.File(tmp_path / "w" / "circuits" / "word" / "p00003.h5", "r") as f:
        for field, arr in shard.items():
            assert np.array_equal(f[field.name][()], arr, equal_nan=field.dtype != "compound"), field.name
        assert f.attrs["kind"] == b"word" and f.attrs["corrupted_word"] == b"dog"  # fixed-length strings
    with h5py.File(tmp_path / "w" / "circuits" / "graph.h5", "r") as f:
        assert np.array_equal(f[CG.EDGE_UP.name][()], g.edge_up) and f.attrs["n_edges"] == g.n_edges
    assert CI.SCORES.axes == ("Me", "Mt", "E")


# -- the embedded model ------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_scores_and_circuits_against_hooked_reference(smollm2_dir):
    from extract.models.loading import load_model
    from extract.stages.prompts import build_prompts

    model, tok, _ = load_model(str(smollm2_dir), device="cpu", progress=False)
    ad = Adapter(model)
    g = graph_of(ad.arch)
    prompts = build_prompts(tok, ["cat", "dog"], ("repeat the following word: {word}",), chat=False)
    pair = word_pairs(prompts).pairs[0]
    ps = score_pairs(ad, [pair], steps=2, methods=("eap", "eap_ig_inputs"))[0]
    assert ps.node_sum_err <= TOL32 and ps.ig1_err <= TOL32 and ps.model_err <= TOL32
    hk = hc.Hooked(model)
    clean, corr = list(pair.clean.input_ids), list(pair.corrupted.input_ids)
    rng = np.random.default_rng(0)
    sample = np.concatenate([np.argsort(-np.abs(ps.scores[0, 0]))[:50], rng.choice(g.n_edges, 200, replace=False)])
    for mi, method in enumerate(("eap", "eap_ig_inputs")):
        for ki, metric in enumerate(METRICS):
            ref = hc.scores(hk, clean, corr, method, metric, m=2)[g.edge_up, g.edge_down]
            assert _err(ps.scores[mi, ki, sample], ref[sample]) <= TOL32, (method, metric)
    pc = evaluate_circuits(ad, [ps], n_top=2, n_random=1, row_batch=8)[0]
    assert pc.full_err.max() <= TOL32 * max(1, abs(ps.metric_clean[0]))
    lc, lx, oc, ox = hc.clean_runs(hk, clean, corr)
    t = (ps.t_clean, ps.t_corr)
    inside = np.zeros(g.n_edges, bool)
    inside[select(ps.scores[0, 0], int(pc.n_edges[6]), "abs", 1.0)] = True
    lg = hc.circuit_logits(hk, clean, ox, torch.as_tensor(g.matrix(inside)))
    assert _err(pc.metric[0, 0, 0, 0, 6], lg[t[0]] - lg[t[1]]) <= TOL32
