"""Every further family (qwen3, mistral, phi3, gemma2, gemma3_text) on a tiny random model with
every feature on (tests/conftest.py build_tiny_family), penzai's consistency-test style:

- the invariants of a capture hold at 1e-4;
- the logit lens and DLA equal an independent float64 recomputation from the HF model's own
  forward (its hidden states and module outputs, with the norms, gains and soft-cap written out
  here, not taken from extract/);
- the ablation engine equals one hooked HF forward per unit at 1e-4, zero and mean, all and last
  positions (every layer; heads 0 and H-1, the attention block and the MLP block);
- configs the adapters would get wrong are refused with the reason.

Tolerance: 1e-4 relative to max(1, max |reference|).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from extract.models.loading import Adapter, ModelError, check_supported, load_model
from extract.stages.ablation import metrics as abl
from extract.stages.capture.engine import capture, derive
from extract.stages.prompts import build_prompts
from tests.conftest import WINDOW
from tests.extract.test_ablation import TEMPLATES, WORDS, _close, _grid, _hf_logits, _one_unit

TOL = 1e-4
SANDWICH = ("gemma2", "gemma3_text")


@pytest.fixture(scope="module")
def fam(tiny_family_dir):
    model, tok, _ = load_model(str(tiny_family_dir), device="cpu", progress=False)
    adapter = Adapter(model)
    prompts = build_prompts(tok, WORDS, TEMPLATES)
    return adapter, prompts


def test_every_feature_is_on(fam):
    adapter, prompts = fam
    a, cfg = adapter.arch, adapter.model.config
    assert a.n_heads > a.n_kv_heads  # GQA
    windows = [w for w in a.windows if w is not None]
    assert windows and max(windows) == WINDOW < min(p.n_tokens for p in prompts)
    if a.model_type in SANDWICH:
        assert a.final_softcap and adapter.post_attn(0) is not None and adapter.o_bias(0) is not None
        assert None in a.windows  # alternating local / global layers
    if a.model_type == "gemma2":
        assert a.attn_softcap
    if a.model_type == "gemma3_text":
        cos = [c for c, _ in adapter.rope(8)]
        assert not torch.allclose(cos[0], cos[1])  # local and global RoPE bases differ
    if a.model_type == "phi3":
        assert adapter.rope(4)[0][0].shape[-1] < a.head_dim  # partial rotary
    if a.model_type == "qwen3":
        assert cfg.attention_bias and adapter.family.qk_norm


def _capture_all(adapter, prompts):
    out = {}
    for n in sorted({p.n_tokens for p in prompts}):
        batch = [p for p in prompts if p.n_tokens == n]
        cap = capture(adapter, torch.tensor([p.input_ids for p in batch]))
        targets = [int(p.candidates[0][1]) for p in batch]
        for p, d in zip(batch, derive(adapter, cap, targets, 5, head_out_all=True), strict=True):
            out[p.index] = d
    return out


def test_invariants(fam):
    adapter, prompts = fam
    for d in _capture_all(adapter, prompts).values():
        for name, (_, rel) in d.errors.items():
            assert rel <= TOL, (name, rel)


def _rms64(x: torch.Tensor, norm, one_plus: bool) -> torch.Tensor:
    """RMSNorm in float64, written out: x / rms(x) * (w or 1 + w)."""
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    w = norm.weight.double()
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * ((1 + w) if one_plus else w)


@torch.no_grad()
def test_lens_and_dla_against_hf_forward(fam):
    adapter, prompts = fam
    model = adapter.model
    mt = model.config.model_type
    sandwich = mt in SANDWICH
    cap = model.config.get_text_config().final_logit_softcapping if sandwich else None
    layers = model.model.layers
    L, H, hd = len(layers), model.config.num_attention_heads, adapter.arch.head_dim
    got = _capture_all(adapter, prompts)
    w_u = model.lm_head.weight.double()
    rec: dict = {}

    def logits(x):
        z = _rms64(x, model.model.norm, sandwich) @ w_u.T
        return z if cap is None else cap * torch.tanh(z / cap)

    for p in prompts[:: max(1, len(prompts) // 3)]:
        rec.clear()
        hooks = [model.model.norm.register_forward_pre_hook(lambda m, a: rec.__setitem__("final", a[0][0]))]
        for i, lay in enumerate(layers):
            att = lay.self_attn
            hooks.append(att.o_proj.register_forward_hook(
                lambda m, a, o, i=i: rec.update({("z", i): a[0][0, -1], ("o", i): o[0, -1]})))
            mlp_mod = lay.post_feedforward_layernorm if sandwich else lay.mlp
            hooks.append(mlp_mod.register_forward_hook(lambda m, a, o, i=i: rec.__setitem__(("m", i), o[0, -1])))
        try:
            out = model(torch.tensor([p.input_ids]), output_hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        resid = [hs[0, -1] for hs in out.hidden_states[:L]] + [rec["final"][-1]]  # L+1 boundaries
        d = {f.name: v for f, v in got[p.index].arrays.items()}  # keyed by store.schema.F fields
        t = int(p.candidates[0][1])
        for layer in range(L + 1):
            ref = logits(resid[layer])
            _close(torch.as_tensor(d["lens_target_logit"][layer]), ref[t])
            _close(torch.as_tensor(d["lens_topk_logits"][layer]), ref.topk(5).values)
        _close(torch.as_tensor(d["final_logits"]), out.logits[0, -1])
        # DLA to the pre-cap target logit, final scale frozen
        g = model.model.norm.weight.double()
        u = w_u[t] * ((1 + g) if sandwich else g)
        x = resid[L].double()
        s = torch.rsqrt(x.pow(2).mean() + (getattr(model.model.norm, "variance_epsilon", None)
                                           or model.model.norm.eps))
        total = s * (resid[0].double() @ u)
        _close(torch.tensor(float(d["dla_embed"])), total)
        for i, lay in enumerate(layers):
            w_o = lay.self_attn.o_proj.weight.double()  # (D, H*hd)
            z = rec[("z", i)].double()
            heads = torch.stack([w_o[:, h * hd:(h + 1) * hd] @ z[h * hd:(h + 1) * hd] for h in range(H)])
            bias = lay.self_attn.o_proj.bias
            bias = torch.zeros(w_o.shape[0], dtype=torch.float64) if bias is None else bias.double()
            if sandwich:  # frozen post-attention norm: s_o * (1 + w) on every head and the bias
                post = lay.post_attention_layernorm
                o = rec[("o", i)].double()
                gain = torch.rsqrt(o.pow(2).mean() + post.eps) * (1 + post.weight.double())
                heads, bias = heads * gain, bias * gain
            _close(torch.as_tensor(d["dla_head"][i]), s * (heads @ u))
            _close(torch.tensor(float(d["dla_attn_bias"][i])), s * (bias @ u))
            _close(torch.tensor(float(d["dla_mlp"][i])), s * (rec[("m", i)].double() @ u))
            total = total + s * (heads.sum(0) + bias + rec[("m", i)].double()) @ u
        capped = total if cap is None else cap * torch.tanh(total / cap)
        _close(capped, out.logits[0, -1, t])  # the model's own (capped) target logit


def test_ablating_nothing_is_the_clean_run(fam):
    adapter, prompts = fam
    L = adapter.arch.n_layers
    for positions in ("all", "last"):
        got = _grid(adapter, prompts, abl.GridSpec(("zero",), positions, tuple(range(L)), identity=True), None)
        for p in prompts:
            ref = _hf_logits(adapter, p)
            _close(got[p.index], ref.expand_as(got[p.index]))


@pytest.mark.parametrize("positions", ["all", "last"])
def test_engine_equals_one_hooked_forward_per_unit(fam, positions):
    adapter, prompts = fam
    a = adapter.arch
    L, H = a.n_layers, a.n_heads
    means = abl.compute_means(adapter, prompts)
    got = _grid(adapter, prompts, abl.GridSpec(("zero", "mean"), positions, tuple(range(L))), means)
    U = H + 2
    # the multi-token word (longest prompt, so padding in its group) and one of the other template
    check = [next(p for p in prompts if p.word == "xylophone" and p.template_index == 0), prompts[-1]]
    moved = 0.0
    for p in check:
        clean = _hf_logits(adapter, p)
        for layer in range(L):
            for u in (0, H - 1, H, H + 1):
                for mi, mode in enumerate(("zero", "mean")):
                    with _one_unit(adapter, layer, u, mode, means, p, positions == "last"):
                        ref = _hf_logits(adapter, p)
                    _close(got[p.index][layer, mi * U + u], ref)
                    moved = max(moved, float((ref - clean).abs().max()))
    assert moved > 1e-2, "ablations must change the logits, or this test proves nothing"


def _cfg(model_type: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **kw)


@pytest.mark.parametrize("model_type,kw,needle", [
    ("gemma3", {}, "multimodal"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional"),
    ("gpt2", {}, "not supported"),
    ("llama", {"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple of KV heads"),
    ("llama", {"rope_parameters": {"rope_type": "made-up", "rope_theta": 1e4}}, "RoPE type"),
])
def test_unsupported_configs_are_refused_with_the_reason(model_type, kw, needle):
    try:
        cfg = _cfg(model_type, **kw)
    except Exception as e:  # transformers itself rejects it: nothing for us to refuse
        pytest.skip(f"transformers rejects this config: {e}")
    with pytest.raises(ModelError, match=needle):
        check_supported(cfg)


def test_length_dependent_rope_refuses_prompts_past_the_original_context(tiny_family_dir):
    model, _, _ = load_model(str(tiny_family_dir), device="cpu", progress=False)
    ad = Adapter(model)
    rp = getattr(model.config, "rope_parameters", None)
    if not rp or any(isinstance(v, dict) for v in rp.values()):
        pytest.skip("per-layer-type RoPE parameters")
    rp = dict(rp)
    model.config.rope_parameters = {**rp, "rope_type": "dynamic", "factor": 2.0,
                                    "original_max_position_embeddings": 16}
    try:
        assert len(ad.rope(16)) == ad.arch.n_layers
        with pytest.raises(ModelError, match="original context"):
            ad.rope(17)
    finally:
        model.config.rope_parameters = rp


def _real_gemma3() -> Path:
    """The real Gemma 3 270M as the embedded alias converts it (another module ships the alias)."""
    from extract.models.loading import cache_root

    folder = cache_root() / "gemma3-270m"
    if not (folder / "config.json").exists():
        pytest.skip("the converted Gemma 3 270M is not in the cache (echowh extract --model gemma3-270m)")
    return folder


def test_real_gemma3_270m_invariants_and_engine():
    """The real weights (18 layers, 4 query / 1 KV heads, head_dim 256, window 512): invariants,
    and the engine against hooked forwards on the last two layers (a full and a local layer)."""
    model, tok, _ = load_model(str(_real_gemma3()), device="cpu", progress=False)
    ad = Adapter(model)
    assert ad.arch.model_type == "gemma3_text" and ad.arch.windows[5] is None and ad.arch.windows[4] == 512
    prompts = build_prompts(tok, ["cat", "dog"], TEMPLATES[:1], chat=False)
    for d in _capture_all(ad, prompts).values():
        for name, (_, rel) in d.errors.items():
            assert rel <= TOL, (name, rel)
    L, H = ad.arch.n_layers, ad.arch.n_heads
    layers = (L - 2, L - 1)
    p = prompts[1]
    for positions in ("all", "last"):
        got = _grid(ad, prompts, abl.GridSpec(("zero",), positions, layers), None)
        for li, layer in enumerate(layers):
            for u in (0, H, H + 1):
                with _one_unit(ad, layer, u, "zero", None, p, positions == "last"):
                    ref = _hf_logits(ad, p)
                _close(got[p.index][li, u], ref)
