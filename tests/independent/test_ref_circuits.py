"""Self-tests of the independent reference (ref_circuits.py) on tiny random float64 HF models.

Independent checks use their own small hooks (`_Probe`), not the reference's machinery:
residuals, block outputs and single-input perturbations are taken from the HF modules directly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from tests.independent import ref_circuits as rc

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GEMMA = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
             layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=5.0)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, attention_bias=True),  # o_proj bias: a constant, not a node
    "qwen2": lambda: Qwen2Config(**SMALL),
    "gemma3_text": lambda: Gemma3TextConfig(**SMALL, **GEMMA),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=8),
    "mistral": lambda: MistralConfig(**SMALL),
    "gemma2": lambda: Gemma2Config(**SMALL, **GEMMA, attn_logit_softcapping=3.0),
    "phi3": lambda: Phi3Config(**SMALL, pad_token_id=0),
}
CORE = ["llama", "qwen2", "gemma3_text"]
T = 6


def build(family: str, exact64: bool = True):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="eager")
    model = model.to(torch.float64).eval()
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
            elif "embed" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.3)
    if exact64:
        rc.exact_float64_norms(model)
    return model


def pair(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 64, (T,), generator=g)
    corr = clean.clone()
    corr[1] = (clean[1] + 7) % 63 + 1
    corr[3] = (clean[3] + 11) % 63 + 1
    return clean, corr


_MODELS: dict[tuple[str, bool], torch.nn.Module] = {}


def model_for(family: str, exact64: bool = True):
    if (family, exact64) not in _MODELS:
        _MODELS[(family, exact64)] = build(family, exact64)
    return _MODELS[(family, exact64)]


@pytest.fixture
def f64():
    """HF eager attention takes its softmax in float32; keep float64 inputs in float64 (same math)."""
    with rc.float64_softmax():
        yield


# --------------------------------------------------------------------------- independent probe


class _Probe:
    """Plain HF forward with test-only hooks: record residuals / block outputs, or perturb ONE
    downstream input by alpha * delta, or fix the embedding / one block's output."""

    def __init__(self, model):
        self.model = model
        self.s = rc.shape_of(model.config)
        self.layers = model.model.layers
        self.sandwich = hasattr(self.layers[0], "pre_feedforward_layernorm")

    def _mlp_in(self, layer):
        return layer.pre_feedforward_layernorm if self.sandwich else layer.post_attention_layernorm

    def _mlp_out(self, layer):
        return layer.post_feedforward_layernorm if self.sandwich else layer.mlp

    def _attn_out(self, layer):
        return layer.post_attention_layernorm if self.sandwich else layer.self_attn.o_proj

    def forward(self, ids, d=None, delta=None, alpha=None, emb=None, attn_fix=None, mlp_fix=None):
        """Returns (last-position logits, record) where record holds residuals and block outputs."""
        rec: dict[str, torch.Tensor] = {}
        hs = []
        for li, layer in enumerate(self.layers):
            def pre_ln(mod, args, li=li):
                rec.setdefault(f"x{li}", args[0][0])
            hs.append(layer.input_layernorm.register_forward_pre_hook(pre_ln))

            def mlp_in(mod, args, li=li):
                x = args[0][0]
                rec[f"r{li}"] = x
                if d == f"m{li}":
                    return ((x + alpha * delta).unsqueeze(0),)
            hs.append(self._mlp_in(layer).register_forward_pre_hook(mlp_in))

            def attn_out(mod, args, out, li=li):
                bias = 0.0 if self.sandwich or mod.bias is None else mod.bias
                rec[f"A{li}"] = out[0] - bias  # sum of the heads' outputs
                if attn_fix is not None and attn_fix[0] == li:
                    return (attn_fix[1] + bias).unsqueeze(0)
            hs.append(self._attn_out(layer).register_forward_hook(attn_out))

            def mlp_out(mod, args, out, li=li):
                rec[f"m{li}"] = out[0]
                if mlp_fix is not None and mlp_fix[0] == li:
                    return mlp_fix[1].unsqueeze(0)
            hs.append(self._mlp_out(layer).register_forward_hook(mlp_out))
        if emb is not None:
            def set_emb(mod, args, kwargs):
                if args:
                    return (emb.unsqueeze(0), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": emb.unsqueeze(0)}
            hs.append(self.layers[0].register_forward_pre_hook(set_emb, with_kwargs=True))

        def final(mod, args):
            x = args[0][0]
            rec["rL"] = x
            if d == "logits":
                return ((x + alpha * delta).unsqueeze(0),)
        hs.append(self.model.model.norm.register_forward_pre_hook(final))
        if d is not None and "<" in d:
            hs.append(self._qkv_hook(d, delta, alpha, rec))
        try:
            logits = self.model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0, -1]
        finally:
            for h in hs:
                h.remove()
        return logits, rec

    def _qkv_hook(self, d, delta, alpha, rec):
        li = int(d[1:].split(".")[0])
        i = int(d.split(".h")[1].split("<")[0])
        kind = d[-2]
        layer = self.layers[li]
        s = self.s
        start = {"q": i * s.hd, "k": s.H * s.hd + i * s.hd, "v": (s.H + s.KV) * s.hd + i * s.hd}[kind]
        attn = layer.self_attn
        if hasattr(attn, "qkv_proj"):
            lin, lo = attn.qkv_proj, start
        else:
            lin = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}[kind]
            lo = i * s.hd

        def hook(mod, args, out):
            x = rec[f"x{li}"]
            new = F.linear(layer.input_layernorm(x + alpha * delta), mod.weight, mod.bias)  # (T, out)
            out = out.clone()
            out[0, :, lo:lo + s.hd] = new[:, lo:lo + s.hd]
            return out
        return lin.register_forward_hook(hook)

    def input_of(self, rec, d):
        if d == "logits":
            return rec["rL"]
        if "<" in d:
            return rec[f"x{int(d[1:].split('.')[0])}"]
        return rec[f"r{int(d[1:])}"]


def _metric(model, logits, clean_logits, toks, metric):
    return rc.metric_value(model, logits, clean_logits, toks, metric)


# --------------------------------------------------------------------------- graph


def test_edge_count_and_order():
    cfg = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert len(rc.edges(cfg)) == rc.edge_count_formula(cfg) == 70651
    small = CONFIGS["llama"]()
    es = rc.edges(small)
    assert len(es) == rc.edge_count_formula(small) == len(set(es))
    assert es[0] == ("input", "a0.h0<q>") and es[-1] == ("m1", "logits")
    assert ("a0.h1", "a0.h2<q>") not in es and ("a0.h1", "m0") in es and ("m0", "m0") not in es
    assert ("a1.h3", "a1.h0<k>") not in es and ("a0.h3", "a1.h1<v>") in es
    assert ("input", "a1.h1<k>") in es and ("m0", "a1.h2<q>") in es
    assert not any(d == "a0.h2<k>" for _, d in es), "only KV=2 key inputs per layer"
    up = rc.edges(small, "upstream")
    assert sorted(up) == sorted(es) and up[0] == ("input", "a0.h0<q>") and up[-1] == ("m1", "logits")
    assert up[len(rc.downstream_nodes(small)) - 1] == ("input", "logits")  # input feeds every receiver


# --------------------------------------------------------------------------- plain forward


@pytest.mark.parametrize("family", list(CONFIGS))
def test_hooked_forward_is_the_hf_forward(family, f64):
    model = model_for(family)
    clean, _ = pair()
    with torch.no_grad():
        hf = model(input_ids=clean.unsqueeze(0), use_cache=False).logits[0, -1]
        tr = rc.run(model, clean)
        _, rec = _Probe(model).forward(clean)
    assert torch.equal(tr.logits_last, hf)
    s = rc.shape_of(model.config)
    assert torch.equal(tr.outs["input"], rec["x0"])
    for li in range(s.L):
        heads = sum(tr.outs[f"a{li}.h{h}"] for h in range(s.H))
        torch.testing.assert_close(heads, rec[f"A{li}"], rtol=1e-12, atol=1e-12)
        assert torch.equal(tr.outs[f"m{li}"], rec[f"m{li}"])
        assert torch.equal(tr.inputs[f"m{li}"], rec[f"r{li}"])
    assert torch.equal(tr.inputs["logits"], rec["rL"])


# --------------------------------------------------------------------------- circuits


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("metric", ["ld", "kl"])
def test_circuit_all_is_clean_and_none_is_corrupted(family, metric, f64):
    model = model_for(family)
    clean, corr = pair()
    toks = rc.answer_tokens(model, clean, corr)
    with torch.no_grad():
        lc = model(input_ids=clean.unsqueeze(0)).logits[0, -1]
        lk = model(input_ids=corr.unsqueeze(0)).logits[0, -1]
    m_clean = float(_metric(model, lc, lc, toks, metric))
    m_corr = float(_metric(model, lk, lc, toks, metric))
    assert abs(m_clean - m_corr) > 1e-3, "pair must move the metric"
    all_edges = set(rc.edges(model.config))
    assert rc.circuit_metric(model, clean, corr, all_edges, metric) == m_clean
    assert rc.circuit_metric(model, clean, corr, set(), metric) == pytest.approx(m_corr, rel=1e-10, abs=1e-10)
    no_logits = {e for e in all_edges if e[1] != "logits"}  # logits read the corrupted residual
    assert rc.circuit_metric(model, clean, corr, no_logits, metric) == pytest.approx(m_corr, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("family", CORE)
def test_exact_edge_effect_matches_single_input_patch(family, f64):
    model = model_for(family)
    clean, corr = pair()
    probe = _Probe(model)
    trc, trk = rc._plain(model, clean), rc._plain(model, corr)
    toks = rc.answer_tokens(model, clean, corr)
    with torch.no_grad():
        lc, _ = probe.forward(clean)
    for u, d in [("input", "a0.h1<q>"), ("a0.h2", "a1.h0<k>"), ("m0", "a1.h1<v>"), ("a1.h3", "m1"),
                 ("m1", "logits"), ("input", "logits")]:
        delta = trk.outs[u] - trc.outs[u]
        with torch.no_grad():
            lp, _ = probe.forward(clean, d=d, delta=delta, alpha=1.0)
        for metric in ["ld", "kl"]:
            want = float(_metric(model, lp, lc, toks, metric) - _metric(model, lc, lc, toks, metric))
            got = rc.exact_edge_effect(model, clean, corr, (u, d), metric)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-11), (u, d, metric)


@pytest.mark.parametrize("replacement", ["mean", "zero"])
def test_mean_and_zero_replacement_endpoints(replacement, f64):
    model = model_for("llama")
    clean, corr = pair()
    means = rc.node_means(model, [clean, corr, pair(5)[0]])
    assert means["a0.h1"].shape == (32,)
    scores = {e: float(i % 7) - 3.0 for i, e in enumerate(rc.edges(model.config))}
    res = rc.faithfulness_curve(model, clean, corr, scores, "ld", "abs", replacement=replacement, means=means)
    assert res["faithfulness"][0] == 0.0 and res["faithfulness"][-1] == pytest.approx(1.0, abs=1e-12)
    empty = rc.circuit_metric(model, clean, corr, set(), "ld", replacement=replacement, means=means)
    assert res["m_corr"] == empty
    if replacement == "zero":  # zero everything: logits read only the o_proj biases' sum
        with torch.no_grad():
            bias = sum(layer.self_attn.o_proj.bias for layer in model.model.layers)
            logits = model.lm_head(model.model.norm(bias.expand(T, -1).unsqueeze(0)))[0, -1]
        toks = rc.answer_tokens(model, clean, corr)
        assert empty == pytest.approx(float(logits[toks[0]] - logits[toks[1]]), rel=1e-10, abs=1e-12)


def test_faithfulness_curve_sizes_selection_and_trapezoid(f64):
    model = model_for("qwen2")
    clean, corr = pair()
    all_edges = rc.edges(model.config)
    n = len(all_edges)
    scores = rc.edge_scores(model, clean, corr, "ld", "eap")
    for selection in ["abs", "signed"]:
        res = rc.faithfulness_curve(model, clean, corr, scores, "ld", selection)
        x = res["fractions"]
        assert x == [0.0] + rc.FRACTIONS and res["n_edges"] == [0] + [max(1, round(f * n)) for f in rc.FRACTIONS]
        f = res["faithfulness"]
        assert f[0] == 0.0 and f[-1] == 1.0
        assert res["cpr"] == pytest.approx(sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(10)))
        assert res["cmd"] == pytest.approx(sum((x[i + 1] - x[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2
                                               for i in range(10)))
        # one size re-evaluated from a top-k set built here
        k = res["n_edges"][7]
        sign = math.copysign(1.0, res["m_clean"] - res["m_corr"])
        keys = [abs(scores[e]) if selection == "abs" else -scores[e] * sign for e in all_edges]
        order = sorted(range(n), key=lambda i: (-keys[i], i))
        top = {all_edges[i] for i in order[:k]}
        m = rc.circuit_metric(model, clean, corr, top, "ld")
        assert f[7] == pytest.approx((m - res["m_corr"]) / (res["m_clean"] - res["m_corr"]), rel=1e-12)


def test_selection_ties_by_edge_index():
    es = [("input", "a"), ("input", "b"), ("input", "c"), ("input", "d")]
    sc = dict(zip(es, [1.0, -2.0, 2.0, -1.0], strict=True))
    assert rc.select_edges(es, sc, 2, "abs", 1.0) == [es[1], es[2]]
    assert rc.select_edges(es, sc, 3, "abs", 1.0) == [es[1], es[2], es[0]]
    assert rc.select_edges(es, sc, 1, "signed", 1.0) == [es[1]]  # -score largest
    assert rc.select_edges(es, sc, 1, "signed", -1.0) == [es[2]]


# --------------------------------------------------------------------------- scores


def _node_ap(model, probe, clean, corr, d, metric, toks, lc):
    """(input_d(corr) - input_d(clean)) . dM/d input_d, by autograd on a scalar alpha."""
    with torch.no_grad():
        _, rc_ = probe.forward(clean)
        _, rk_ = probe.forward(corr)
    delta = probe.input_of(rk_, d) - probe.input_of(rc_, d)
    alpha = torch.zeros((), dtype=torch.float64, requires_grad=True)
    lp, _ = probe.forward(clean, d=d, delta=delta, alpha=alpha)
    (g,) = torch.autograd.grad(_metric(model, lp, lc, toks, metric), alpha)
    return float(g)


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("metric", ["ld", "kl"])
def test_node_sums_equal_node_attribution_patching(family, metric, f64):
    model = model_for(family)
    clean, corr = pair()
    probe = _Probe(model)
    toks = rc.answer_tokens(model, clean, corr)
    with torch.no_grad():
        lc, _ = probe.forward(clean)
    scores = rc.edge_scores(model, clean, corr, metric, "eap")
    for d in rc.downstream_nodes(model.config):
        total = sum(v for (u, dd), v in scores.items() if dd == d)
        want = _node_ap(model, probe, clean, corr, d, metric, toks, lc)
        assert total == pytest.approx(want, rel=1e-9, abs=1e-11), d


@pytest.mark.parametrize("family", CORE)
@pytest.mark.parametrize("metric", ["ld", "kl"])
def test_ig_with_one_step_is_eap(family, metric, f64):
    model = model_for(family)
    clean, corr = pair()
    eap = rc.edge_scores(model, clean, corr, metric, "eap")
    for method in ["eap_ig_inputs", "eap_ig_activations"]:
        ig = rc.edge_scores(model, clean, corr, metric, method, steps=1)
        assert ig.keys() == eap.keys()
        for e, v in eap.items():
            assert ig[e] == pytest.approx(v, rel=1e-10, abs=1e-12), (method, e)


@pytest.mark.parametrize("family", CORE)
def test_ig_activations_input_group_is_ig_inputs(family, f64):
    model = model_for(family)
    clean, corr = pair()
    a = rc.edge_scores(model, clean, corr, "ld", "eap_ig_activations", steps=3)
    b = rc.edge_scores(model, clean, corr, "ld", "eap_ig_inputs", steps=3)
    eap = rc.edge_scores(model, clean, corr, "ld", "eap")
    for e in a:
        if e[0] == "input":
            assert a[e] == pytest.approx(b[e], rel=1e-10, abs=1e-12)
    assert any(abs(b[e] - eap[e]) > 1e-4 for e in b), "IG must differ from EAP with 3 steps"
    assert any(abs(a[e] - b[e]) > 1e-4 for e in a if e[0] != "input")


FD_EDGES = [("input", "a0.h1<q>"), ("input", "a1.h0<k>"), ("a0.h2", "a1.h1<v>"), ("m0", "a1.h3<q>"),
            ("a1.h0", "m1"), ("m0", "logits")]


def _fd(model, probe, ids, d, delta, toks, lc, metric, h=1e-3, **fix):
    """Fourth-order central difference of e -> M(input_d + e * delta) at e = 0."""
    def M(e):
        with torch.no_grad():
            lp, _ = probe.forward(ids, d=d, delta=delta, alpha=e, **fix)
        return float(_metric(model, lp, lc, toks, metric))
    return (8 * (M(h) - M(-h)) - (M(2 * h) - M(-2 * h))) / (12 * h)


@pytest.mark.parametrize("family", CORE)
@pytest.mark.parametrize("metric", ["ld", "kl"])
def test_scores_match_finite_differences(family, metric, f64):
    """EAP: score(u->d) = d/de M(input_d + e * (a_u(corr) - a_u(clean))) at 0, by central differences;
    eap_ig_inputs: the mean of that over the interpolated embeddings; eap_ig_activations: the mean
    over forwards with u's block output interpolated (block outputs fixed by the probe's own hooks)."""
    model = model_for(family)
    clean, corr = pair()
    probe = _Probe(model)
    steps = 2
    toks = rc.answer_tokens(model, clean, corr)
    trc, trk = rc._plain(model, clean), rc._plain(model, corr)
    with torch.no_grad():
        lc, recc = probe.forward(clean)
        _, reck = probe.forward(corr)
    eap = rc.edge_scores(model, clean, corr, metric, "eap")
    ig_in = rc.edge_scores(model, clean, corr, metric, "eap_ig_inputs", steps=steps)
    ig_act = rc.edge_scores(model, clean, corr, metric, "eap_ig_activations", steps=steps)
    tol = dict(rel=1e-8, abs=1e-10)
    for u, d in FD_EDGES:
        delta = trk.outs[u] - trc.outs[u]
        assert eap[(u, d)] == pytest.approx(_fd(model, probe, clean, d, delta, toks, lc, metric), **tol)
        ks = range(1, steps + 1)
        lerp = lambda a, b, k: b + (k / steps) * (a - b)  # noqa: E731  (clean a, corrupted b)
        fd_in = [_fd(model, probe, clean, d, delta, toks, lc, metric, emb=lerp(recc["x0"], reck["x0"], k))
                 for k in ks]
        assert ig_in[(u, d)] == pytest.approx(sum(fd_in) / steps, **tol)
        if u == "input":
            fix = [dict(emb=lerp(recc["x0"], reck["x0"], k)) for k in ks]
        elif u.startswith("m"):
            li = int(u[1:])
            fix = [dict(mlp_fix=(li, lerp(recc[u], reck[u], k))) for k in ks]
        else:
            li = int(u[1:].split(".")[0])
            fix = [dict(attn_fix=(li, lerp(recc[f"A{li}"], reck[f"A{li}"], k))) for k in ks]
        fd_act = [_fd(model, probe, clean, d, delta, toks, lc, metric, **f) for f in fix]
        assert ig_act[(u, d)] == pytest.approx(sum(fd_act) / steps, **tol)


def test_gemma_with_hf_float32_norms_and_softmax():
    """Without the float64 patches (HF computes RMSNorm and softmax in float32): endpoints hold to
    float32 precision, f(all) exactly."""
    model = model_for("gemma3_text", exact64=False)
    clean, corr = pair()
    with torch.no_grad():
        lc = model(input_ids=clean.unsqueeze(0)).logits[0, -1]
        lk = model(input_ids=corr.unsqueeze(0)).logits[0, -1]
    toks = rc.answer_tokens(model, clean, corr)
    all_edges = set(rc.edges(model.config))
    assert rc.circuit_metric(model, clean, corr, all_edges, "ld") == float(lc[toks[0]] - lc[toks[1]])
    m_none = rc.circuit_metric(model, clean, corr, set(), "ld")
    assert m_none == pytest.approx(float(lk[toks[0]] - lk[toks[1]]), rel=1e-5, abs=1e-5)


def test_answer_tokens_and_metrics(f64):
    model = model_for("qwen2")
    clean, corr = pair()
    with torch.no_grad():
        lc = model(input_ids=clean.unsqueeze(0)).logits[0, -1]
        lk = model(input_ids=corr.unsqueeze(0)).logits[0, -1]
    top2 = torch.topk(lc, 2).indices.tolist()
    want = (top2[0], int(lk.argmax())) if int(lk.argmax()) != top2[0] else tuple(top2)
    assert rc.answer_tokens(model, clean, corr) == want
    assert rc.answer_tokens(model, clean, clean.clone()) == tuple(top2)  # tops agree: clean's runner-up
    toks = (3, 5)
    assert float(rc.metric_value(model, lk, lc, toks, "ld")) == float(lk[3] - lk[5])
    kl = F.kl_div(F.log_softmax(lk, -1), F.log_softmax(lc, -1), log_target=True, reduction="sum")
    assert float(rc.metric_value(model, lk, lc, toks, "kl")) == pytest.approx(float(kl), rel=1e-12)
    assert float(rc.metric_value(model, lc, lc, toks, "kl")) == 0.0


def test_kl_eap_scores_vanish_at_the_clean_run(f64):
    """dKL(p_clean || p)/dlogits = p - p_clean = 0 in the clean forward: every eap score with 'kl' is
    rounding noise (IG's interpolated forwards are not at the minimum, so theirs are not)."""
    model = model_for("llama")
    clean, corr = pair()
    eap = rc.edge_scores(model, clean, corr, "kl", "eap")
    assert max(abs(v) for v in eap.values()) < 1e-12
    ig = rc.edge_scores(model, clean, corr, "kl", "eap_ig_inputs", steps=2)
    assert max(abs(v) for v in ig.values()) > 1e-3


def test_pairs_must_align():
    model = model_for("llama")
    with pytest.raises(AssertionError):
        rc.answer_tokens(model, torch.arange(1, 6), torch.arange(1, 7))


# --------------------------------------------------------------------------- the real models (slow)


def _cached(name: str):
    import os
    from pathlib import Path

    root = Path(os.environ.get("ECHOWH_CACHE", Path.home() / ".cache" / "echo-warehouse")) / name
    if not (root / "config.json").exists():
        pytest.skip(f"{root} not converted yet (run an extraction once)")
    return root


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_model_endpoints_and_node_sums(name, f64):
    """The embedded models in float64: circuit endpoints and the node-sum invariant on a few inputs."""
    from transformers import AutoTokenizer

    path = _cached(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float64).eval()
    rc.exact_float64_norms(model)
    clean = tok("repeat the following word: cat", return_tensors="pt").input_ids[0]
    corr = tok("repeat the following word: dog", return_tensors="pt").input_ids[0]
    assert clean.shape == corr.shape
    assert len(rc.edges(model.config)) == rc.edge_count_formula(model.config)
    probe = _Probe(model)
    toks = rc.answer_tokens(model, clean, corr)
    with torch.no_grad():
        lc, _ = probe.forward(clean)
        lk, _ = probe.forward(corr)
    m_clean, m_corr = float(lc[toks[0]] - lc[toks[1]]), float(lk[toks[0]] - lk[toks[1]])
    assert rc.circuit_metric(model, clean, corr, set(rc.edges(model.config)), "ld") == m_clean
    assert rc.circuit_metric(model, clean, corr, set(), "ld") == pytest.approx(m_corr, rel=1e-9, abs=1e-9)
    scores = rc.edge_scores(model, clean, corr, "ld", "eap")
    L = rc.shape_of(model.config).L
    for d in ["logits", f"m{L - 1}", f"a{L // 2}.h0<k>", f"a{L // 2}.h3<q>", "a1.h0<v>"]:
        total = sum(v for (u, dd), v in scores.items() if dd == d)
        want = _node_ap(model, probe, clean, corr, d, "ld", toks, lc)
        assert total == pytest.approx(want, rel=1e-8, abs=1e-10), d
