"""One clean forward of a batch of equal-length prompts, with every tensor the study needs.

Hooks only read: the model runs exactly as Hugging Face wrote it, and its own logits are
compared with what the captured tensors imply (the invariants), so a wrong hook shows up.

The hook points come from the family adapter (extract.models.families): ``attn_out`` / ``mlp_out`` are
each block's contribution to the residual (after gemma's post-attention / post-feedforward
norms), per-head outputs carry the frozen post-norm gain under sandwich norms, and DLA
attributes the pre-soft-cap logit (invariant 4 compares cap * tanh(sum / cap) with the model).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from extract.models.families import Adapter
from extract.stages.capture.sinks import sink_hooks, stack_norms
from store.schema import F, Field


@dataclass
class Captured:
    """Raw captures of one batch, float32 on the model's device."""

    input_ids: torch.Tensor  # (B, T)
    resid: torch.Tensor  # (B, L+1, T, D)
    attn_out: torch.Tensor  # (B, L, T, D) the attention block's residual contribution
    mlp_out: torch.Tensor  # (B, L, T, D) the MLP block's (post-norm output under sandwich norms)
    z: torch.Tensor  # (B, L, T, H*hd)  o_proj inputs
    pattern: torch.Tensor  # (B, L, H, T, T)
    logits: torch.Tensor  # (B, V) the model's own logits at the last position (soft-capped if it caps)
    cache: object  # the model's KV cache, to continue generation without recomputing
    sinks: dict[Field, torch.Tensor]  # (B, L, H, T) query/key/value/value-out norms (extract.stages.capture.sinks)


@contextmanager
def _hooks(adapter: Adapter, store: dict[str, list]):
    handles = []
    layers = adapter.layers

    def pre_layer(i):
        def fn(mod, args, kwargs):
            if store["on"]:
                store["resid"][i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return fn

    def post_last(mod, args, out):
        if store["on"]:
            store["resid"][len(layers)] = (out[0] if isinstance(out, tuple) else out).detach()

    def post_pattern(i):
        def fn(mod, args, out):
            if store["on"]:
                store["pattern"][i] = out[1].detach()
        return fn

    def post_point(key, i, is_tuple):
        def fn(mod, args, out):
            if store["on"]:
                store[key][i] = (out[0] if is_tuple else out).detach()
        return fn

    def pre_o(i):
        def fn(mod, args):
            if store["on"]:
                store["z"][i] = args[0].detach()
        return fn

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre_layer(i), with_kwargs=True))
            point, is_tuple = adapter.attn_point(i)  # the block's residual contribution
            handles.append(layer.self_attn.register_forward_hook(post_pattern(i)))
            handles.append(point.register_forward_hook(post_point("attn", i, is_tuple)))
            handles.append(adapter.o_proj(i).register_forward_pre_hook(pre_o(i)))
            handles.append(adapter.mlp_point(i).register_forward_hook(post_point("mlp", i, False)))
        handles.append(layers[-1].register_forward_hook(post_last))
        handles += sink_hooks(adapter, store)
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture(adapter: Adapter, input_ids: torch.Tensor) -> Captured:
    """Run the unmodified model once over (B, T) ids, recording every stream we need."""
    a = adapter.arch
    L = a.n_layers
    store: dict = {"on": True, "resid": [None] * (L + 1), "attn": [None] * L,
                   "pattern": [None] * L, "z": [None] * L, "mlp": [None] * L}
    with _hooks(adapter, store):
        # Only the last position's logits are used: skip the (B, T, V) unembedding.
        out = adapter.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    B, T = input_ids.shape
    f32 = torch.float32
    cap = Captured(
        input_ids=input_ids,
        resid=torch.stack(store["resid"], 1).to(f32),
        attn_out=torch.stack(store["attn"], 1).to(f32),
        mlp_out=torch.stack(store["mlp"], 1).to(f32),
        z=torch.stack(store["z"], 1).to(f32),
        pattern=torch.stack(store["pattern"], 1).to(f32),
        logits=out.logits[:, -1].to(f32),
        cache=getattr(out, "cache", None) or getattr(out, "past_key_values", None),
        sinks=stack_norms(store),
    )
    D, H = a.d_model, a.n_heads
    assert cap.resid.shape == (B, L + 1, T, D), cap.resid.shape
    assert cap.z.shape == (B, L, T, H * a.head_dim), cap.z.shape
    assert cap.pattern.shape == (B, L, H, T, T), cap.pattern.shape
    return cap


def head_outputs(adapter: Adapter, z: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-head outputs of one layer: (B, T, H*hd) o_proj inputs -> (B, T, H, D), and the bias term.

    Under sandwich norms each head is scaled by the post-attention norm's frozen gain at its
    position (extract.models.families), and so is the o_proj bias: the bias term is (B, T, D) then.
    Without a post-norm the bias term is the o_proj bias itself (D,), or None.
    """
    a = adapter.arch
    zh = z.float().view(*z.shape[:-1], a.n_heads, a.head_dim)  # (B, T, H, hd)
    w = adapter.w_o(layer).float()  # (D, H, hd)
    ho = torch.einsum("bthk,dhk->bthd", zh, w)
    bias = adapter.o_bias(layer)
    bias = None if bias is None else bias.float()
    gain = adapter.head_gain(layer, z)  # (B, T, D) or None
    if gain is None:
        return ho, bias
    return ho * gain[:, :, None], (None if bias is None else gain * bias)


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms(x) over the last axis, as RMSNorm computes it (float32)."""
    x = x.float()
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _batch_err(a: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt (axis 0): max |a - ref| and max |ref|, in float32.

    The two sides of an invariant agree to a few ulps, so their float32 difference is exact
    (Sterbenz); a float64 copy of every tensor would only cost time.
    """
    dims = tuple(range(1, a.dim()))
    if not dims:
        return (a - ref).abs(), ref.abs()
    return (a - ref).abs().amax(dims), ref.abs().amax(dims)


def _errors(diff: torch.Tensor, ref_max: torch.Tensor) -> list[tuple[float, float]]:
    """(max_abs_err, rel_err) per prompt; rel_err = max_abs_err / max(1, max |ref|)."""
    d = diff.double().cpu()
    scale = ref_max.double().cpu().clamp_min(1.0)
    return [(float(x), float(x / s)) for x, s in zip(d, scale, strict=True)]


def invariant_errors(a: torch.Tensor, ref: torch.Tensor) -> list[tuple[float, float]]:
    """(max_abs_err, rel_err) per prompt (axis 0) of an invariant ``a == ref``: the stored error."""
    return _errors(*_batch_err(a, ref))


@dataclass
class Derived:
    """Per-prompt numpy arrays ready for the shard (see store.schema.F)."""

    arrays: dict[Field, np.ndarray]
    errors: dict[str, tuple[float, float]]  # invariant -> (max_abs_err, rel_err)


@torch.no_grad()
def derive(
    adapter: Adapter,
    cap: Captured,
    targets: list[int],
    top_k: int,
    head_out_all: bool,
) -> list[Derived]:
    """Logit lens, DLA, per-head outputs and the invariant checks for every prompt of a batch."""
    a = adapter.arch
    B, L1, T, D = cap.resid.shape
    L, H = a.n_layers, a.n_heads
    dev = cap.resid.device
    tgt = torch.tensor(targets, device=dev)  # (B,)

    # Per-head outputs at the last position (all positions when asked). Invariant 2 checks
    # their sum against the attention output at every position that is stored.
    head_all = torch.empty(B, L, T, H, D, device=dev) if head_out_all else None
    head_last = torch.empty(B, L, H, D, device=dev)
    bias_last = torch.zeros(B, L, D, device=dev)  # o_proj bias term at the last position
    inv2_abs = torch.zeros(B, dtype=torch.float64, device=dev)
    inv2_scale = torch.ones(B, dtype=torch.float64, device=dev)
    for layer in range(L):
        zl = cap.z[:, layer] if head_all is not None else cap.z[:, layer, -1:]  # (B, T', H*hd)
        ho, bias = head_outputs(adapter, zl, layer)  # (B, T', H, D), bias term (D,)|(B, T', D)|None
        head_last[:, layer] = ho[:, -1]
        if head_all is not None:
            head_all[:, layer] = ho
        total = ho.sum(2)  # (B, T', D)
        if bias is not None:
            total = total + bias
            bias_last[:, layer] = bias if bias.dim() == 1 else bias[:, -1]
        ref = cap.attn_out[:, layer, -zl.shape[1]:]
        inv2_abs = torch.maximum(inv2_abs, (total - ref).abs().amax((1, 2)).double())
        inv2_scale = torch.maximum(inv2_scale, ref.abs().amax((1, 2)).double())

    # Logit lens at the last position, with the model's own final norm (and soft-cap) per boundary.
    x_last = cap.resid[:, :, -1]  # (B, L+1, D)
    lens_logits = adapter.logits(x_last.to(adapter.lm_head.weight.dtype))  # (B, L+1, V)
    lse = torch.logsumexp(lens_logits, -1, keepdim=True)  # (B, L+1, 1)
    topv, topi = lens_logits.topk(top_k, dim=-1)  # (B, L+1, K)
    top_p = (topv - lse).exp()
    t_idx = tgt[:, None, None].expand(B, L1, 1)
    t_logit = lens_logits.gather(-1, t_idx)[..., 0]  # (B, L+1)
    t_prob = (t_logit - lse[..., 0]).exp()
    t_rank = (lens_logits > t_logit[..., None]).sum(-1)  # (B, L+1)

    # Invariant 1: our own final norm + unembedding (+ soft-cap) from the last residual, full vocabulary.
    g = adapter.norm_gain(adapter.final_norm)  # (D,) w, or 1 + w
    w_u = adapter.lm_head.weight.float()  # (V, D)
    scale = rms_scale(cap.resid[:, L, -1], a.norm_eps)  # (B, 1)
    manual = adapter.softcap((cap.resid[:, L, -1] * scale * g) @ w_u.T)  # (B, V)

    # DLA to the target's PRE-cap logit with the frozen final scale (the soft-cap is not linear).
    u = adapter.folded_unembed(tgt)  # (B, D)
    s = scale[:, 0]  # (B,)
    dla_head = torch.einsum("blhd,bd->blh", head_last, u) * s[:, None, None]
    dla_mlp = torch.einsum("bld,bd->bl", cap.mlp_out[:, :, -1], u) * s[:, None]
    dla_embed = (cap.resid[:, 0, -1] * u).sum(-1) * s
    dla_bias = torch.einsum("bld,bd->bl", bias_last, u) * s[:, None]
    dla_total = dla_embed + dla_head.sum((1, 2)) + dla_bias.sum(1) + dla_mlp.sum(1)  # pre-cap
    # Invariant 4 under a final soft-cap: cap * tanh(DLA total / cap) == the model's target logit.
    model_target = cap.logits.gather(1, tgt[:, None])[:, 0]

    # Invariant 3, a layer at a time: (B, T, D) temporaries, not (B, L, T, D).
    chain_abs = torch.zeros(B, device=dev)
    chain_ref = torch.zeros(B, device=dev)
    for layer in range(L):
        d, r = _batch_err(cap.resid[:, layer] + cap.attn_out[:, layer] + cap.mlp_out[:, layer],
                          cap.resid[:, layer + 1])
        chain_abs, chain_ref = torch.maximum(chain_abs, d), torch.maximum(chain_ref, r)
    errors_by_name = {
        "logits_from_resid": invariant_errors(manual, cap.logits),
        "heads_sum_to_attn": _errors(inv2_abs, inv2_scale),
        "resid_chain": _errors(chain_abs, chain_ref),
        "dla_sums_to_logit": invariant_errors(adapter.softcap(dla_total), model_target),
        "lens_last_is_logits": invariant_errors(lens_logits[:, L], cap.logits),
    }

    out: list[Derived] = []
    for b in range(B):
        errors = {name: errs[b] for name, errs in errors_by_name.items()}
        arrays = {
            F.RESID: cap.resid[b],
            F.ATTN_OUT: cap.attn_out[b],
            F.MLP_OUT: cap.mlp_out[b],
            F.HEAD_OUT: head_last[b],
            F.ATTN_PATTERN: cap.pattern[b],
            F.LENS_TOPK_IDS: topi[b],
            F.LENS_TOPK_LOGITS: topv[b],
            F.LENS_TOPK_PROBS: top_p[b],
            F.LENS_TARGET_LOGIT: t_logit[b],
            F.LENS_TARGET_PROB: t_prob[b],
            F.LENS_TARGET_RANK: t_rank[b],
            F.FINAL_LOGITS: cap.logits[b],
            F.FINAL_SCALE: s[b],
            F.DLA_EMBED: dla_embed[b],
            F.DLA_HEAD: dla_head[b],
            F.DLA_ATTN_BIAS: dla_bias[b],
            F.DLA_MLP: dla_mlp[b],
        }
        if head_all is not None:
            arrays[F.HEAD_OUT_ALL] = head_all[b]
        out.append(Derived({k: v.detach().cpu().numpy() for k, v in arrays.items()}, errors))
    return out


@torch.no_grad()
def greedy_continue(
    adapter: Adapter, cap: Captured, max_new_tokens: int, eos_ids: set[int]
) -> list[list[int]]:
    """Greedy tokens after each prompt, reusing the clean run's KV cache (no second prefill).

    A model that returns no cache is continued with full forwards over the growing sequence:
    slower, same tokens.
    """
    model = adapter.model
    B = cap.logits.shape[0]
    seqs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    nxt = cap.logits.argmax(-1)  # (B,)
    cache = cap.cache
    ids = cap.input_ids  # (B, T + step): only needed without a cache
    T = cap.input_ids.shape[1]
    for step in range(max_new_tokens):
        for b in range(B):
            if not done[b]:
                tid = int(nxt[b])
                if tid in eos_ids:
                    done[b] = True
                else:
                    seqs[b].append(tid)
        if all(done) or step == max_new_tokens - 1:
            break
        if cache is None:
            ids = torch.cat([ids, nxt[:, None]], 1)
            o = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        else:
            pos = torch.full((B, 1), T + step, device=nxt.device, dtype=torch.long)
            o = model(input_ids=nxt[:, None], position_ids=pos, use_cache=True, **{adapter.cache_kwarg: cache})
            cache = getattr(o, "cache", None) or getattr(o, "past_key_values", None)
        nxt = o.logits[:, -1].argmax(-1)
    return seqs
