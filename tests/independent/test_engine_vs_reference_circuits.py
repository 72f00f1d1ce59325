"""The project's circuits engine (extract.stages.circuits) against the independent reference
(tests/independent/ref_circuits.py, written from docs/specs/circuits.md alone), number by number.

Both sides run the SAME model object: tiny random float64 models of every family the reference
supports (its self-test configs, tests/independent/test_ref_circuits.py) and, slow, the embedded
SmolLM2-135M in float32 on pairs of words no other test uses.

Precision: both sides call the model's own norm modules, so ``rc.exact_float64_norms`` (RMSNorms
in float64) is applied to the shared model and holds for both. ``rc.float64_softmax`` can NOT be
used for the engine: its attention (extract.stages.ablation.block._softmax) calls
``torch.softmax(..., dtype=torch.float32)`` directly, which the helper does not swap; so both
sides keep HF's float32 softmax (the same op on the same inputs).

Tolerances (all relative to the largest reference magnitude of the quantity, ``_rel``):
- float64 tiny models: 1e-6 (observed ~1e-15). EAP with KL is ~0 at the clean run (its gradient
  vanishes; reference scale ~1e-16): compared with an ABSOLUTE tolerance of 1e-12.
- SmolLM2 float32: 1e-4.

Edges are matched by (upstream, downstream) name, never by position: the reference's default
``edges(cfg)`` order is receiver-major, the engine's edge index is row-major over (upstream,
downstream) (= the reference's ``edges(cfg, "upstream")``). Circuit selection breaks ties by edge
index, so the reference's faithfulness curves are computed with ``edge_order="upstream"``, and
fed the ENGINE's scores (mapped by name): the curve comparison then tests selection, sizes and
circuit evaluation, not the 1e-15 score noise (which decides the order of EAP-KL's ~1e-16 scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from extract.models.families import Adapter, ModelError
from extract.stages.circuits.faithfulness import PairCircuits, evaluate_circuits, node_means, select
from extract.stages.circuits.graph import Graph, graph_of
from extract.stages.circuits.pairs import CircuitPair
from extract.stages.circuits.scores import PairScores, score_pairs
from extract.stages.prompts import Prompt
from store.circuits_schema import METHODS, METRICS, SELECTIONS, SIZES
from tests.independent import ref_circuits as rc
from tests.independent.test_ref_circuits import CONFIGS, build

TOL64 = 1e-6
ABS_EAP_KL = 1e-12
TOL32 = 1e-4
STEPS = 5  # the spec's default m
FAMILIES = tuple(CONFIGS)  # llama, qwen2, gemma3_text, qwen3, mistral, phi3, gemma2
T = 7


def _rel(got, ref) -> float:
    """max |got - ref| / max |ref| (ref all-zero: absolute)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = float(np.abs(ref).max())
    return float(np.abs(got - ref).max()) / (scale if scale > 0 else 1.0)


def _prompt(i: int, ids: list[int], word: str, template: int = 0) -> Prompt:
    return Prompt(i, word, template, "t", "", tuple(ids), (), (0,) * len(ids), (), 1, 2)


def _ids(seed: int, n: int = T) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 64, (n,), generator=g).tolist()


def _names(g: Graph) -> list[tuple[str, str]]:
    """The engine's edges, in its edge-index order, as (upstream, downstream) names."""
    return [(g.up_names[u], g.down_names[d]) for u, d in zip(g.edge_up, g.edge_down, strict=True)]


@dataclass
class Case:
    family: str
    model: torch.nn.Module
    ad: Adapter
    g: Graph
    names: list[tuple[str, str]]
    clean: torch.Tensor  # (T,)
    corr: torch.Tensor  # (T,)
    ps: PairScores
    ref: dict[tuple[str, str], dict[tuple[str, str], float]]  # (method, metric) -> edge -> score
    mean_prompts: list[list[int]]  # the "study's clean prompts" of the mean replacement


@pytest.fixture(scope="module", params=FAMILIES)
def case(request) -> Case:
    fam = request.param
    model = build(fam, exact64=True)  # float64, RMSNorms in float64 (both sides call them)
    clean = _ids(1)
    corr = list(clean)
    corr[2], corr[4] = (clean[2] + 7) % 63 + 1, (clean[4] + 11) % 63 + 1
    ad = Adapter(model)
    g = graph_of(ad.arch)
    pair = CircuitPair("word", _prompt(0, clean, "clean"), _prompt(1, corr, "corr"))
    ps = score_pairs(ad, [pair], steps=STEPS)[0]
    c, x = torch.tensor(clean), torch.tensor(corr)
    ref = {(me, mt): rc.edge_scores(model, c, x, mt, me, steps=STEPS) for me in METHODS for mt in METRICS}
    # mean replacement over prompts of UNEQUAL lengths: token-pooled and prompt-averaged means differ
    mean_prompts = [clean, _ids(5, T + 3), _ids(6, T - 2)]
    return Case(fam, model, ad, g, _names(g), c, x, ps, ref, mean_prompts)


# -- graph and edge order ---------------------------------------------------------------------


def test_same_edges_and_row_major_is_the_references_upstream_order(case):
    cfg = case.model.config
    assert case.names == rc.edges(cfg, "upstream")
    assert set(case.names) == set(rc.edges(cfg)) and len(case.names) == rc.edge_count_formula(cfg)
    assert case.names != rc.edges(cfg), "the two default orders differ (compare by name, as this file does)"


# -- answers, metrics, scores -----------------------------------------------------------------


def test_answer_tokens_and_clean_corrupted_metrics(case):
    toks = rc.answer_tokens(case.model, case.clean, case.corr)
    assert (case.ps.t_clean, case.ps.t_corr) == toks
    with torch.no_grad():
        lc = case.model(input_ids=case.clean[None]).logits[0, -1]
        lx = case.model(input_ids=case.corr[None]).logits[0, -1]
    for ki, mt in enumerate(METRICS):
        mc = float(rc.metric_value(case.model, lc, lc, toks, mt))
        mx = float(rc.metric_value(case.model, lx, lc, toks, mt))
        assert abs(case.ps.metric_clean[ki] - mc) <= 1e-12 * max(1, abs(mc)), mt
        assert _rel(case.ps.metric_corr[ki], mx) <= 1e-12, mt


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("metric", METRICS)
def test_every_edge_score(case, method, metric):
    got = case.ps.scores[METHODS.index(method), METRICS.index(metric)]
    ref = np.array([case.ref[(method, metric)][e] for e in case.names])
    if method == "eap" and metric == "kl":  # dKL/d(input) = 0 at the clean run: both ~1e-16
        assert np.abs(ref).max() < 1e-12 and np.abs(got - ref).max() <= ABS_EAP_KL
        return
    assert np.abs(ref).max() > 1e-3, "scores must be non-trivial, or this proves nothing"
    err = _rel(got, ref)
    print(f"{case.family} {method} {metric}: rel err {err:.1e} (max |ref| {np.abs(ref).max():.3g})")
    assert err <= TOL64


# -- circuits ---------------------------------------------------------------------------------


def _replacements(case: Case) -> tuple[str, ...]:
    # zero replacement: pre-norm families only (both sides agree; under sandwich norms an input
    # of 0 + rounding is scaled by 1/sqrt(eps): ill-conditioned, see extract/circuits/__init__.py)
    return ("patch", "mean") if case.ad.family.sandwich else ("patch", "mean", "zero")


@pytest.fixture(scope="module")
def circuits(case) -> PairCircuits:
    eng_means = node_means(case.ad, [_prompt(i, p, f"w{i}") for i, p in enumerate(case.mean_prompts)])
    return evaluate_circuits(case.ad, [case.ps], replacements=_replacements(case), means=eng_means,
                             n_top=2, n_random=1, seed=0)[0]


def test_node_means_pool_tokens_like_the_reference(case):
    eng = node_means(case.ad, [_prompt(i, p, f"w{i}") for i, p in enumerate(case.mean_prompts)])
    ref = rc.node_means(case.model, [torch.tensor(p) for p in case.mean_prompts])
    ref_arr = torch.stack([ref[u] for u in case.g.up_names]).numpy()
    assert _rel(eng.numpy(), ref_arr) <= 1e-12


def _curve_combos(case: Case) -> list[tuple[str, str, str, str]]:
    """(method, metric, selection, replacement): every one for patch; for mean / zero the IG-inputs
    scores (time: each reference curve is ~14 hooked forwards)."""
    out = [(me, mt, s, "patch") for me in METHODS for mt in METRICS for s in SELECTIONS]
    return out + [("eap_ig_inputs", mt, s, r) for r in _replacements(case)[1:] for mt in METRICS for s in SELECTIONS]


def test_faithfulness_curves_cpr_cmd(case, circuits):
    """Every f(x), CPR, CMD, M_ref and circuit size, each side choosing its own ``signed``
    direction (under mean / zero both take sign(M(clean) - M(empty circuit)): the spec's
    normalising M(corrupted); the engine took the corrupted run's M until this comparison showed it)."""
    pc = circuits
    reps = _replacements(case)
    ref_means = rc.node_means(case.model, [torch.tensor(p) for p in case.mean_prompts])
    worst: dict[str, float] = {}
    for me, mt, sel, rep in _curve_combos(case):
        mi, ki, si, ri = METHODS.index(me), METRICS.index(mt), SELECTIONS.index(sel), reps.index(rep)
        scores = dict(zip(case.names, case.ps.scores[mi, ki].tolist(), strict=True))
        cur = rc.faithfulness_curve(case.model, case.clean, case.corr, scores, mt, sel, rep,
                                    means=ref_means, edge_order="upstream")
        assert list(pc.n_edges) == cur["n_edges"] and list(SIZES) == cur["fractions"]
        assert abs(pc.metric_clean[ki] - cur["m_clean"]) <= 1e-12 * max(1, abs(cur["m_clean"]))
        # M_ref on the metric's scale (zero replacement on a bias-free read can be ~1e-13: rounding)
        scale = max(1.0, abs(cur["m_clean"]), abs(cur["m_corr"]))
        assert abs(pc.metric_ref[ki, ri] - cur["m_corr"]) <= TOL64 * scale, (me, mt, rep)
        f_eng, f_ref = pc.faithfulness[mi, ki, si, ri], np.array(cur["faithfulness"])
        for key, got, want in (("f", f_eng, f_ref), ("cpr", pc.cpr[mi, ki, si, ri], cur["cpr"]),
                               ("cmd", pc.cmd[mi, ki, si, ri], cur["cmd"])):
            err = float(np.abs(np.asarray(got) - np.asarray(want)).max())
            worst[key] = max(worst.get(key, 0.0), err)
            assert err <= TOL64, (me, mt, sel, rep, key, got, want)
    print(case.family, {k: f"{v:.1e}" for k, v in worst.items()})


def test_selection_with_own_scores_agrees(case, circuits):
    """The reference selecting from ITS scores picks the engine's circuits (except EAP-KL, whose
    ~1e-16 scores are rounding noise on both sides: order undefined)."""
    cfg = case.model.config
    ups = rc.edges(cfg, "upstream")
    for mi, me in enumerate(METHODS):
        for ki, mt in enumerate(METRICS):
            if me == "eap" and mt == "kl":
                continue
            sign = math.copysign(1.0, case.ps.metric_clean[ki] - case.ps.metric_corr[ki])
            for sel in SELECTIONS:
                for n in sorted(set(int(k) for k in circuits.n_edges if k)):
                    eng = {case.names[i] for i in select(case.ps.scores[mi, ki], n, sel, sign)}
                    ref = set(rc.select_edges(ups, case.ref[(me, mt)], n, sel, sign))
                    assert eng == ref, (me, mt, sel, n)
                    # the reference's DEFAULT (receiver-major) order breaks exact ties otherwise; the
                    # exact ties here (score 0: input -> last layer's q / m / logits, whose gradient
                    # lives at the last position only) share the sender, so both orders agree
                    dflt = set(rc.select_edges(rc.edges(cfg), case.ref[(me, mt)], n, sel, sign))
                    assert dflt == ref, (me, mt, sel, n)


def test_exact_single_edge_effects(case, circuits):
    pc = circuits
    assert len(pc.sample_edges) >= 5
    scale = {mt: max(1.0, abs(float(pc.metric_clean[ki]))) for ki, mt in enumerate(METRICS)}
    for j, e in enumerate(pc.sample_edges):
        for ki, mt in enumerate(METRICS):
            ref = rc.exact_edge_effect(case.model, case.clean, case.corr, case.names[e], mt)
            assert abs(pc.sample_effect[ki, j] - ref) <= TOL64 * scale[mt], (case.names[e], mt)


@pytest.mark.parametrize("family", ["gemma2"])
def test_scores_with_hf_float32_norms(family):
    """Without exact_float64_norms (HF's RMSNorm computes in float32 inside a float64 model): both
    sides call the same modules. Observed: eap 5e-16; eap_ig_activations 3e-7 on gemma2 (the engine
    restarts a head group's forward from the clean residual, which holds HF's float32-normed block
    output, plus set-minus-clean heads scaled in float64; the reference re-sums the set heads):
    float32 norm rounding, inside the 1e-6 tolerance."""
    model = build(family, exact64=False)
    clean = _ids(2)
    corr = [*clean[:3], (clean[3] + 5) % 63 + 1, *clean[4:]]
    ad = Adapter(model)
    g = graph_of(ad.arch)
    ps = score_pairs(ad, [CircuitPair("word", _prompt(0, clean, "a"), _prompt(1, corr, "b"))], steps=2,
                     methods=("eap", "eap_ig_activations"), check=False)[0]
    for mi, me in ((0, "eap"), (2, "eap_ig_activations")):
        r = rc.edge_scores(model, torch.tensor(clean), torch.tensor(corr), "ld", me, steps=2)
        err = _rel(ps.scores[mi, 0], [r[e] for e in _names(g)])
        print(f"{family} HF norms {me} ld: rel err {err:.1e}")
        assert err <= TOL64


def test_sandwich_with_o_bias_refused_by_both():
    cfg = CONFIGS["gemma2"]()
    cfg.attention_bias = True
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double().eval()
    clean = _ids(1)
    corr = [clean[0], (clean[1] + 3) % 63 + 1, *clean[2:]]
    with pytest.raises(ValueError, match="o_proj bias"):
        rc.edge_scores(model, torch.tensor(clean), torch.tensor(corr), "ld", "eap", steps=1)
    with pytest.raises(ModelError, match="o_proj bias"):
        score_pairs(Adapter(model), [CircuitPair("word", _prompt(0, clean, "a"), _prompt(1, corr, "b"))])


# -- pairs ------------------------------------------------------------------------------------


def test_pairs_follow_the_spec_rule():
    """pairs.build on synthetic prompts (lengths and first word tokens chosen to exercise every
    clause) against the spec's rule written here (_spec_word_partner, both template directions)."""
    from extract.stages.circuits import pairs as pairs_mod

    g = torch.Generator().manual_seed(3)
    prompts, i = [], 0
    for t in range(2):
        for w in range(7):
            n = 5 + int(torch.randint(0, 2, (1,), generator=g))  # two lengths
            first = 10 + int(torch.randint(0, 3, (1,), generator=g))  # repeated first word tokens
            ids = [1, first, *torch.randint(20, 60, (n - 2,), generator=g).tolist()]
            prompts.append(Prompt(i, f"w{w}", t, "t", "", tuple(ids), (), (0,) * n, (), 1, 2))
            i += 1
    word = pairs_mod.build("word", prompts)
    want = [(p.index, q.index) for p in prompts if (q := _spec_word_partner(prompts, p)) is not None]
    assert [(p.clean.index, p.corrupted.index) for p in word.pairs] == want
    assert len(word.skipped) == len(prompts) - len(want)
    tpl = pairs_mod.build("template", prompts)
    by = {(p.template_index, p.word): p for p in prompts}
    want_t = [(by[(d, w)].index, by[(1 - d, w)].index, d) for w in dict.fromkeys(p.word for p in prompts)
              for d in (0, 1) if by[(0, w)].n_tokens == by[(1, w)].n_tokens]
    assert [(p.clean.index, p.corrupted.index, p.direction) for p in tpl.pairs] == want_t
    assert want and want_t and tpl.skipped, "the synthetic prompts must exercise every clause"


# -- the embedded SmolLM2 (float32, slow) -------------------------------------------------------

SMOL_WORDS = ["violin", "carpet", "meadow", "lantern"]  # used by no other test (grep tests/)
SMOL_TEMPLATES = ("repeat the following word: {word}", "echo the following word: {word}")
SMOL_STEPS = 3  # IG steps (time: the reference takes one hooked forward + backward per step)


def _spec_word_partner(prompts: list[Prompt], p: Prompt) -> Prompt | None:
    """The spec's rule, written here: the next word of the list (cyclically) under the same
    template whose prompt has the same length and whose first word token differs."""
    same = [q for q in prompts if q.template_index == p.template_index]
    i = [q.word for q in same].index(p.word)
    for step in range(1, len(same)):
        q = same[(i + step) % len(same)]
        if q.n_tokens == p.n_tokens and q.input_ids[q.word_start] != p.input_ids[p.word_start]:
            return q
    return None


@pytest.mark.heavy
@pytest.mark.slow
def test_smollm2_engine_vs_reference(smollm2_dir):
    from extract.models.loading import load_model
    from extract.stages.circuits import pairs as pairs_mod
    from extract.stages.prompts import build_prompts

    model, tok, _ = load_model(str(smollm2_dir), device="cpu", progress=False)
    ad = Adapter(model)
    g = graph_of(ad.arch)
    names = _names(g)
    assert len(names) == 70651 and names == rc.edges(model.config, "upstream")
    prompts = build_prompts(tok, SMOL_WORDS, SMOL_TEMPLATES, chat=False)
    word = pairs_mod.build("word", prompts)
    assert [(p.clean.index, p.corrupted.index) for p in word.pairs] == [
        (p.index, _spec_word_partner(prompts, p).index) for p in prompts]
    tpl = pairs_mod.build("template", prompts)
    assert [(p.clean.template_index, p.corrupted.template_index, p.clean.word) for p in tpl.pairs] == [
        (d, 1 - d, w) for w in SMOL_WORDS for d in (0, 1)]
    chosen = [word.pairs[0], tpl.pairs[4]]  # violin -> its partner; meadow, repeat clean / echo corrupted
    methods = ("eap", "eap_ig_inputs")
    scores = score_pairs(ad, chosen, steps=SMOL_STEPS, methods=methods, check=False)
    means = node_means(ad, [p for p in prompts if p.template_index == 0])
    ref_means = rc.node_means(model, [torch.tensor(p.input_ids) for p in prompts if p.template_index == 0])
    assert _rel(means.numpy(), torch.stack([ref_means[u] for u in g.up_names]).numpy()) <= TOL32
    for pair, ps in zip(chosen, scores, strict=True):
        c, x = torch.tensor(pair.clean.input_ids), torch.tensor(pair.corrupted.input_ids)
        assert (ps.t_clean, ps.t_corr) == rc.answer_tokens(model, c, x)
        for mi, me in enumerate(methods):
            for ki, mt in enumerate(METRICS):
                r = rc.edge_scores(model, c, x, mt, me, steps=SMOL_STEPS)
                ref, got = np.array([r[e] for e in names]), ps.scores[mi, ki]
                err = _rel(got, ref)
                print(f"smollm2 {pair.kind} {me} {mt}: max|ref| {np.abs(ref).max():.3g} rel err {err:.1e} "
                      f"abs err {np.abs(got - ref).max():.1e}")
                if me == "eap" and mt == "kl":  # ~0 at the clean run: float32 rounding only
                    assert np.abs(got - ref).max() <= 1e-5
                else:
                    assert err <= TOL32, (pair.kind, me, mt)
        _smollm2_circuits(model, ad, g, names, ps, c, x, means, ref_means)


def _smollm2_circuits(model, ad, g, names, ps, c, x, means, ref_means) -> None:
    pc = evaluate_circuits(ad, [ps], replacements=("patch", "mean"), means=means, n_top=1, n_random=0,
                           row_batch=8)[0]
    scale = max(1.0, abs(float(pc.metric_clean[0])))
    for sel, rep in (("abs", "patch"), ("signed", "patch"), ("abs", "mean")):
        si, ri = SELECTIONS.index(sel), ("patch", "mean").index(rep)
        sc = dict(zip(names, ps.scores[0, 0].tolist(), strict=True))
        cur = rc.faithfulness_curve(model, c, x, sc, "ld", sel, rep, means=ref_means, edge_order="upstream")
        assert list(pc.n_edges) == cur["n_edges"]
        err = float(np.abs(pc.metric[0, 0, si, ri] - np.array([
            cur["m_corr"] if i == 0 else cur["m_corr"] + f * (cur["m_clean"] - cur["m_corr"])
            for i, f in enumerate(cur["faithfulness"])])).max())
        print(f"smollm2 eap ld {sel} {rep}: M(C) max abs err {err:.1e} (scale {scale:.3g}); "
              f"cpr {pc.cpr[0, 0, si, ri]:.6f} vs {cur['cpr']:.6f}")
        assert err <= TOL32 * scale
        assert abs(pc.cpr[0, 0, si, ri] - cur["cpr"]) <= 1e-3 and abs(pc.cmd[0, 0, si, ri] - cur["cmd"]) <= 1e-3
    for j in range(0, len(pc.sample_edges), 2):
        ref = rc.exact_edge_effect(model, c, x, names[pc.sample_edges[j]], "ld")
        assert abs(pc.sample_effect[0, j] - ref) <= TOL32 * scale, names[pc.sample_edges[j]]
