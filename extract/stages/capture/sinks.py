"""Attention-sink captures of the clean run: value, key and query norms, the residual's largest
values and medians, and the logit lens at position 0.

Per prompt (store.schema.F, axes L layers, H query heads, T positions, B boundaries):

- ``value_norm`` ||v_j|| of the value vector head h reads at position j (its KV group's, GQA);
- ``value_out_norm`` ||v_j W_O^h||: what head h writes per unit of attention on key j
  (Kobayashi et al. 2020). Under sandwich norms (gemma) it is ||g * (v_j W_O^h)||, g the
  post-attention norm's gain; the norm's 1/rms scale belongs to the query position and cancels
  in a share over keys. ``a_ij * value_out_norm[j]`` is then the norm of key j's part of head
  h's output at query i, exactly as ``head_out`` defines that output (frozen scale aside);
- ``key_norm`` ||k_j|| of head h's KV-group key and ``query_norm`` ||q_i||, after any q/k norm
  (qwen3, gemma3) and RoPE (a rotation: the norm is that of the un-rotated vector), before the
  score scale;
- ``resid_top_values`` / ``resid_top_dims`` the RESID_TOP_K largest |values| of the residual at
  every boundary and position (signed values, largest |value| first) and their dimensions,
  ``resid_median_abs`` the median |value| of each (boundary, position) vector and
  ``resid_median_abs_all`` the median |value| over the boundary's whole hidden state (every
  position and dimension: Sun et al. 2024's reference for "massive" activations);
- ``lens_first_topk_*`` the logit lens at position 0 (top-k per boundary). Position 0 attends
  only to itself, so its residual depends on its token alone: the lens is computed once per
  distinct first token of a batch and copied to the prompts that share it.

Cost: the norms come from forward hooks on the projections the model runs anyway (no second
projection); ||v W_O^h||^2 = v^T (W_O^h^T diag(g^2) W_O^h) v with the hd x hd Gram matrix in
float64 (exact to ~1e-8 relative even where W_O nearly annihilates v), hd/D of the direct cost.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from extract.models.families import Adapter
from store.schema import F, Field

# Families whose HF attention applies q_norm/k_norm to (B, heads, T, hd) rather than (B, T, heads, hd).
HEADS_FIRST_QK_NORM = frozenset({"gemma3_text"})
RESID_TOP_K = 8  # largest |values| kept per boundary and position
SINK_CAPTURES = 1  # version of these captures: part of the run fingerprint (no mixed resumes)


def _gram(adapter: Adapter, layer: int) -> torch.Tensor:
    """(H, hd, hd) float64 W_O^h^T diag(g^2) W_O^h, g the post-attention gain (sandwich) or 1."""
    w = adapter.w_o(layer).double()  # (D, H, hd)
    post = adapter.post_attn(layer)
    if post is not None:
        w = w * adapter.norm_gain(post).double()[:, None, None]
    return torch.einsum("dhk,dhl->hkl", w, w)


def sink_hooks(adapter: Adapter, store: dict) -> list[Any]:
    """Forward hooks filling ``store['sink'][field][layer]`` with (B, T, H) float32 norms.

    Fields: F.QUERY_NORM, F.KEY_NORM, F.VALUE_NORM, F.VALUE_OUT_NORM. The hooks only read.
    """
    a = adapter.arch
    H, KV, hd = a.n_heads, a.n_kv_heads, a.head_dim
    L = a.n_layers
    group = torch.tensor(a.kv_group)
    rec: dict[Field, list] = {k: [None] * L for k in (F.QUERY_NORM, F.KEY_NORM, F.VALUE_NORM, F.VALUE_OUT_NORM)}
    store["sink"] = rec
    grams: dict[int, torch.Tensor] = {}

    heads_first = a.model_type in HEADS_FIRST_QK_NORM

    def per_head(x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T, n*hd), (B, T, n, hd) or (q/k-norm output, heads first) (B, n, T, hd) -> (B, T, n, hd)."""
        if x.dim() == 4 and heads_first:
            return x.transpose(1, 2)
        return x.reshape(*x.shape[:2], n, hd)

    def q_norms(i: int, q: torch.Tensor) -> None:
        rec[F.QUERY_NORM][i] = per_head(q, H).float().norm(dim=-1)  # (B, T, H)

    def k_norms(i: int, k: torch.Tensor) -> None:
        kn = per_head(k, KV).float().norm(dim=-1)  # (B, T, KV)
        rec[F.KEY_NORM][i] = kn[..., group.to(kn.device)]

    def v_norms(i: int, v: torch.Tensor) -> None:
        vg = v.reshape(*v.shape[:2], KV, hd)[..., group.to(v.device), :]  # (B, T, H, hd)
        rec[F.VALUE_NORM][i] = vg.float().norm(dim=-1)
        if i not in grams:
            grams[i] = _gram(adapter, i)
        vd = vg.double()
        sq = torch.einsum("bthk,hkl,bthl->bth", vd, grams[i].to(vd.device), vd)
        rec[F.VALUE_OUT_NORM][i] = sq.clamp_min(0).sqrt().float()

    def hook(fn, i: int, lo: int | None = None, hi: int | None = None):
        def f(mod, args, out):
            if store["on"]:
                fn(i, out.detach()[..., lo:hi] if lo is not None or hi is not None else out.detach())
        return f

    handles = []
    nq, nk = H * hd, KV * hd
    for i in range(L):
        att = adapter.attn(i)
        if adapter.family.fused_qkv:
            proj = att.qkv_proj
            handles.append(proj.register_forward_hook(hook(v_norms, i, nq + nk, None)))
            if not adapter.family.qk_norm:
                handles.append(proj.register_forward_hook(hook(q_norms, i, 0, nq)))
                handles.append(proj.register_forward_hook(hook(k_norms, i, nq, nq + nk)))
        else:
            handles.append(att.v_proj.register_forward_hook(hook(v_norms, i)))
            if not adapter.family.qk_norm:
                handles.append(att.q_proj.register_forward_hook(hook(q_norms, i)))
                handles.append(att.k_proj.register_forward_hook(hook(k_norms, i)))
        if adapter.family.qk_norm:  # what the scores use: the per-head normed q and k
            handles.append(att.q_norm.register_forward_hook(hook(q_norms, i)))
            handles.append(att.k_norm.register_forward_hook(hook(k_norms, i)))
    return handles


def stack_norms(store: dict) -> dict[Field, torch.Tensor]:
    """Per field (B, L, H, T) float32 from the hooks' per-layer (B, T, H)."""
    return {k: torch.stack(v, 1).transpose(2, 3) for k, v in store["sink"].items()}


def resid_stats(resid: np.ndarray) -> dict[Field, np.ndarray]:
    """One prompt's residual (B, T, D) -> its largest |values|, their dims and medians."""
    r = np.asarray(resid, dtype=np.float32)
    ab = np.abs(r)
    k = min(RESID_TOP_K, r.shape[-1])
    part = np.argpartition(-ab, k - 1, axis=-1)[..., :k]  # (B, T, k) unordered
    order = np.argsort(-np.take_along_axis(ab, part, -1), axis=-1, kind="stable")
    dims = np.take_along_axis(part, order, -1)  # largest |value| first
    return {
        F.RESID_TOP_VALUES: np.take_along_axis(r, dims, -1),
        F.RESID_TOP_DIMS: dims.astype(np.int32),
        F.RESID_MEDIAN_ABS: np.median(ab, axis=-1),  # (B, T)
        F.RESID_MEDIAN_ABS_ALL: np.median(ab.reshape(ab.shape[0], -1), axis=-1),  # (B,)
    }


@torch.no_grad()
def first_position_lens(adapter: Adapter, input_ids: torch.Tensor, resid: torch.Tensor,
                        top_k: int) -> list[dict[Field, np.ndarray]]:
    """Logit lens at position 0 per prompt: top-k ids, logits, probs (B+1 boundaries, K).

    input_ids (N, T), resid (N, L+1, T, D). Computed once per distinct first token.
    """
    out: list[dict[str, np.ndarray]] = []
    done: dict[int, dict[Field, np.ndarray]] = {}
    for b, t0 in enumerate(input_ids[:, 0].tolist()):
        if t0 not in done:
            x = resid[b, :, 0]  # (L+1, D)
            logits = adapter.logits(x.to(adapter.lm_head.weight.dtype))  # (L+1, V)
            lse = torch.logsumexp(logits, -1, keepdim=True)
            v, i = logits.topk(top_k, dim=-1)
            done[t0] = {F.LENS_FIRST_TOPK_IDS: i.cpu().numpy().astype(np.int32),
                        F.LENS_FIRST_TOPK_LOGITS: v.cpu().numpy(),
                        F.LENS_FIRST_TOPK_PROBS: (v - lse).exp().cpu().numpy()}
        out.append(done[t0])
    return out


def add_sink_arrays(adapter: Adapter, cap: Any, derived: list[Any], top_k: int) -> None:
    """Add every sink array to each prompt's ``Derived.arrays`` (numpy, float32/int32)."""
    norms = {k: v.cpu().numpy() for k, v in cap.sinks.items()}  # (B, L, H, T)
    lens = first_position_lens(adapter, cap.input_ids, cap.resid, top_k)
    for b, d in enumerate(derived):
        d.arrays.update({k: v[b] for k, v in norms.items()})
        d.arrays.update(resid_stats(d.arrays[F.RESID]))
        d.arrays.update(lens[b])
