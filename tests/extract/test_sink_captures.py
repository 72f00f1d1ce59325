"""The attention-sink captures (extract.stages.capture.sinks) against an independent numpy computation.

From the stored residual (the capture's ``resid``) and the model's weights read as numpy
arrays, written out here: the attention RMSNorm (w or 1 + w), the q/k/v projections (split
from a fused qkv), per-head q/k norms, then
- value norms ||v_j|| and value contributions ||g * (W_O^h v_j)|| by the direct product (the
  extraction uses a float64 Gram matrix: a different route to the same number),
- key and query norms (RoPE is a rotation: the norm of the un-rotated vector),
- the residual's top |values| (full sort), per-position and whole-boundary medians,
- the logit lens at position 0 (final norm and unembedding in numpy, soft-cap included).
Every family's tiny model and the embedded SmolLM2 (a few prompts). Tolerance 1e-4 relative to
max(1, max |reference|); top-k ids must match where logits are not tied within it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extract.models.loading import Adapter, load_model
from extract.stages.capture.engine import capture, derive
from extract.stages.capture.sinks import RESID_TOP_K, add_sink_arrays
from extract.stages.prompts import build_prompts
from store.schema import F
from tests.extract.test_ablation import TEMPLATES, WORDS

TOL = 1e-4


def _close(a, b, tol: float = TOL) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max()))
    assert err <= tol, err
    return err


def _rms(x: np.ndarray, w: np.ndarray, eps: float, one_plus: bool) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * ((1.0 + w) if one_plus else w)


def _np(t) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def reference(model, fam_one_plus: bool, resid: np.ndarray, layer: int) -> dict:
    """(H, T) norms of one layer from the stored residual resid (L+1, T, D) and numpy weights."""
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    lay = model.model.layers[layer]
    att = lay.self_attn
    ln = lay.input_layernorm
    x = _rms(resid[layer], _np(ln.weight), getattr(ln, "variance_epsilon", None) or ln.eps, fam_one_plus)

    def lin(mod, x):
        y = x @ _np(mod.weight).T
        return y + _np(mod.bias) if getattr(mod, "bias", None) is not None else y

    if hasattr(att, "qkv_proj"):
        qkv = lin(att.qkv_proj, x)
        q, k, v = qkv[:, : H * hd], qkv[:, H * hd : (H + KV) * hd], qkv[:, (H + KV) * hd :]
    else:
        q, k, v = lin(att.q_proj, x), lin(att.k_proj, x), lin(att.v_proj, x)
    T = x.shape[0]
    q, k, v = q.reshape(T, H, hd), k.reshape(T, KV, hd), v.reshape(T, KV, hd)
    if hasattr(att, "q_norm"):
        eps = getattr(att.q_norm, "variance_epsilon", None) or att.q_norm.eps
        q = _rms(q, _np(att.q_norm.weight), eps, fam_one_plus)
        k = _rms(k, _np(att.k_norm.weight), eps, fam_one_plus)
    grp = [h // (H // KV) for h in range(H)]
    w_o = _np(att.o_proj.weight)  # (D, H*hd)
    g = _np(lay.post_attention_layernorm.weight) + 1.0 if fam_one_plus else 1.0  # sandwich gain
    out = np.stack([np.linalg.norm(g * (v[:, grp[h]] @ w_o[:, h * hd : (h + 1) * hd].T), axis=-1)
                    for h in range(H)])
    return {F.QUERY_NORM: np.linalg.norm(q, axis=-1).T, F.KEY_NORM: np.linalg.norm(k[:, grp], axis=-1).T,
            F.VALUE_NORM: np.linalg.norm(v[:, grp], axis=-1).T, F.VALUE_OUT_NORM: out}


def _derived(adapter: Adapter, prompts, top_k: int = 5):
    ids = torch.tensor([p.input_ids for p in prompts])
    cap = capture(adapter, ids)
    d = derive(adapter, cap, [p.input_ids[-1] for p in prompts], top_k, False)
    add_sink_arrays(adapter, cap, d, top_k)
    return d


def _check_prompt(model, one_plus: bool, arrays: dict, layers) -> None:
    resid = arrays[F.RESID].astype(np.float64)  # (L+1, T, D)
    for layer in layers:
        ref = reference(model, one_plus, resid, layer)
        for name, r in ref.items():
            _close(arrays[name][layer], r)
    # residual statistics: full sort, numpy medians
    ab = np.abs(resid)
    order = np.argsort(-ab, axis=-1, kind="stable")[..., :RESID_TOP_K]
    _close(np.abs(arrays[F.RESID_TOP_VALUES]), np.take_along_axis(ab, order, -1))
    _close(arrays[F.RESID_TOP_VALUES], np.take_along_axis(resid, arrays[F.RESID_TOP_DIMS], -1))
    _close(arrays[F.RESID_MEDIAN_ABS], np.median(ab, axis=-1))
    _close(arrays[F.RESID_MEDIAN_ABS_ALL], np.median(ab.reshape(ab.shape[0], -1), axis=-1))
    # logit lens at position 0: final norm, unembedding (and soft-cap) in numpy
    norm = model.model.norm
    x0 = _rms(resid[:, 0], _np(norm.weight), getattr(norm, "variance_epsilon", None) or norm.eps, one_plus)
    logits = x0 @ _np(model.lm_head.weight).T  # (L+1, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * np.tanh(logits / cap)
    ids = arrays[F.LENS_FIRST_TOPK_IDS]
    _close(arrays[F.LENS_FIRST_TOPK_LOGITS], np.take_along_axis(logits, ids.astype(np.int64), -1))
    kth = np.sort(logits, axis=-1)[:, ::-1][:, : ids.shape[1]]
    _close(arrays[F.LENS_FIRST_TOPK_LOGITS], kth)  # they are the top-k logits
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) + logits.max(-1, keepdims=True)
    _close(arrays[F.LENS_FIRST_TOPK_PROBS], np.exp(np.take_along_axis(logits, ids.astype(np.int64), -1) - lse))


@pytest.fixture(scope="module")
def fam(tiny_family_dir):
    model, tok, _ = load_model(str(tiny_family_dir), device="cpu", progress=False)
    return Adapter(model), build_prompts(tok, WORDS, TEMPLATES)


def _equal_length(prompts):
    n = prompts[0].n_tokens
    return [p for p in prompts if p.n_tokens == n]


def test_sink_captures_tiny(tiny_model_dir):
    model, tok, _ = load_model(str(tiny_model_dir), device="cpu", progress=False)
    adapter = Adapter(model)
    batch = _equal_length(build_prompts(tok, WORDS, TEMPLATES))
    for p, d in zip(batch, _derived(adapter, batch), strict=True):
        assert d.arrays[F.VALUE_NORM].shape == (adapter.arch.n_layers, adapter.arch.n_heads, p.n_tokens)
        _check_prompt(model, False, d.arrays, range(adapter.arch.n_layers))


def test_sink_captures_every_family(fam):
    adapter, prompts = fam
    batch = _equal_length(prompts)
    for d in _derived(adapter, batch):
        _check_prompt(adapter.model, adapter.family.one_plus_norm, d.arrays, range(adapter.arch.n_layers))


def test_first_position_lens_is_shared_by_first_token(fam):
    """Position 0 sees only itself: prompts with the same first token share its lens rows."""
    adapter, prompts = fam
    batch = _equal_length(prompts)
    d = _derived(adapter, batch)
    assert len({p.input_ids[0] for p in batch}) == 1 and len(batch) > 1
    for x in d[1:]:
        np.testing.assert_array_equal(x.arrays[F.LENS_FIRST_TOPK_IDS], d[0].arrays[F.LENS_FIRST_TOPK_IDS])
    # and the shared rows equal each prompt's own residual's lens (checked in _check_prompt)
    _check_prompt(adapter.model, adapter.family.one_plus_norm, d[-1].arrays, [])


def test_sink_captures_smollm2(smollm2_dir):
    model, tok, _ = load_model(str(smollm2_dir), device="cpu", progress=False)
    adapter = Adapter(model)
    batch = _equal_length(build_prompts(tok, ["cat", "dog"], TEMPLATES[:1]))
    d = _derived(adapter, batch)
    L = adapter.arch.n_layers
    for x in d:
        _check_prompt(model, False, x.arrays, (0, 1, L // 2, L - 1))
    # the real model's sink: position 0's value contributions are small next to the others'
    von = d[0].arrays[F.VALUE_OUT_NORM]  # (L, H, T)
    assert np.median(von[L // 2 :, :, 0]) < np.median(von[L // 2 :, :, 1:])
