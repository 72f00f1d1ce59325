"""The circuits engine's forward: the model's own modules, stage by stage, with one copy of the
residual per downstream input (extract.stages.circuits.graph), so that a gradient or a patch can reach
one edge's receiver and no other.

Stages, as the graph's forward positions: 1 + 2l = block l's attention, 2 + 2l = its MLP,
2L + 1 = the logits. Each stage reads the residual ``h`` (B, T, D) through its own inputs:

- attention of layer l: head h's query reads ``h + extra[q_h]``, KV head g's key and value read
  ``h + extra[k_g]`` / ``h + extra[v_g]``; each copy is normed by the model's input_layernorm
  and projected by its own rows of the model's q/k/v (or fused qkv) weight; q/k norms, RoPE and
  the attention core are the ablation engine's (extract.stages.ablation.block.rotate / attend, which
  follow HF's eager attention); the block output is the model's o_proj (and post-norm).
- MLP of layer l: ``h + extra[m_l]`` through the model's norm, MLP module (and post-norm).
- logits: ``h + extra[logits]`` at the last position through the final norm, lm_head, soft-cap.

``extra`` is either a zero tensor requiring grad (``grad=True``: its gradient is dM/d(input_d))
or a patch: extra_d = sum_u outside[d, u] * (repl_u - a_u(this forward)) (circuit evaluation).

Node outputs (what ``record`` returns): the input (the residual entering block 0), each head's
z_h @ W_O^h (sandwich norms: times s * g, s = 1/rms(o_proj(z)) of this forward, g the
post-attention gain), and each MLP block's contribution. A sandwich-norm model with an o_proj
bias is refused (spec): its bias term would depend on s and belong to no node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from extract.models.families import Adapter, ModelError
from extract.stages.ablation.block import attend, rotate
from extract.stages.circuits.graph import Graph


@dataclass
class Patch:
    """Per row: which edges carry the replacement, and the replacement outputs."""

    outside: torch.Tensor  # (B, Dn, U) 1 where the edge u -> d is NOT in the circuit, else 0
    repl: torch.Tensor  # (B|1, U, T, D) replacement output of every upstream node


@dataclass
class Run:
    """What one engine forward returns."""

    logits: torch.Tensor  # (B, V) at the last position, float32 (float64 for float64 models)
    copies: list[torch.Tensor]  # grad mode: the zero copies, stage order (per layer attn, mlp; logits)
    up: torch.Tensor | None = None  # (B, U, T, D) node outputs (record mode, from stage 1)
    resid_in: torch.Tensor | None = None  # (B, L, T, D) residual entering each block (record)
    resid_mid: torch.Tensor | None = None  # (B, L, T, D) residual after each attention block
    resid_out: torch.Tensor | None = None  # (B, T, D) residual after the last block


def check_model(ad: Adapter) -> None:
    """Refuse what the graph cannot represent exactly."""
    if ad.family.sandwich and any(ad.o_bias(lay) is not None for lay in range(ad.arch.n_layers)):
        raise ModelError("circuits: a sandwich-norm model with an o_proj bias is not supported (its bias "
                         "term depends on the post-norm scale and belongs to no node)")


def _proj_weights(ad: Adapter, layer: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """[(W (n*hd, D), b | None)] of q, k, v: the model's q/k/v_proj, or the rows of a fused qkv_proj."""
    att = ad.attn(layer)
    if not ad.family.fused_qkv:
        return [(m.weight, m.bias) for m in (att.q_proj, att.k_proj, att.v_proj)]
    a = ad.arch
    sizes = [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim]
    w = att.qkv_proj.weight.split(sizes, 0)
    b = att.qkv_proj.bias.split(sizes, 0) if att.qkv_proj.bias is not None else (None,) * 3
    return list(zip(w, b, strict=True))


def _per_head(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, n: int) -> torch.Tensor:
    """(B, n, T, D) normed copies, one per head -> (B, T, n, hd): copy i through head i's rows."""
    hd = w.shape[0] // n
    out = torch.einsum("bntd,ned->btne", x, w.view(n, hd, -1))
    return out if b is None else out + b.view(n, hd)


def attention(ad: Adapter, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, H+2KV, T, D) pre-norm copies (q per head, k per KV head, v per KV head) -> z (B, T, H, hd)."""
    a = ad.arch
    H, KV, hd = a.n_heads, a.n_kv_heads, a.head_dim
    B, _, T, _ = x.shape
    G = H // KV
    xn = ad.norm_attn(layer)(x)
    (wq, bq), (wk, bk), (wv, bv) = _proj_weights(ad, layer)
    q = _per_head(xn[:, :H], wq, bq, H)  # (B, T, H, hd)
    k = _per_head(xn[:, H : H + KV], wk, bk, KV)  # (B, T, KV, hd)
    v = _per_head(xn[:, H + KV :], wv, bv, KV)
    q, k = ad.qk_norm(layer, q, k)
    cs, sn = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, rd)
    q, k = rotate(q, cs, sn), rotate(k, cs, sn)
    qq = q.view(B, T, KV, G, hd).permute(2, 0, 3, 1, 4)[None]  # (1, KV, B, G, T, hd)
    kk, vv = k.permute(2, 0, 1, 3)[None], v.permute(2, 0, 1, 3)[None]  # (1, KV, B, T, hd)
    pos = torch.arange(T, device=x.device)[None]
    out = attend(qq, kk, vv, pos, scale=ad.scaling(layer), softcap=a.attn_softcap, window=a.windows[layer])
    return out.view(KV, B, G, T, hd).permute(1, 3, 0, 2, 4).reshape(B, T, H, hd)  # head = kv * G + g


def head_outputs(ad: Adapter, layer: int, z: torch.Tensor) -> torch.Tensor:
    """z (B, T, H, hd) -> per-head residual writes (B, H, T, D) (module docstring)."""
    w_o = ad.w_o(layer)  # (D, H, hd)
    heads = torch.einsum("bthe,dhe->bhtd", z, w_o)
    post = ad.post_attn(layer)
    if post is None:
        return heads
    o = heads.sum(1)  # (B, T, D) = o_proj(z) without bias (refused under sandwich norms)
    s = torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + ad.norm_eps(post))
    gain = (1 + post.weight) if ad.family.one_plus_norm else post.weight
    return heads * (s * gain)[:, None]


def logits_of(ad: Adapter, x: torch.Tensor) -> torch.Tensor:
    """(B, D) residual -> (B, V) logits (float32, or float64 for a float64 model), soft-capped."""
    lg = ad.lm_head(ad.final_norm(x))
    return ad.softcap(lg if lg.dtype == torch.float64 else lg.float())


def forward(ad: Adapter, g: Graph, h: torch.Tensor, rope, *, start: int = 1, grad: bool = False,
            patch: Patch | None = None, record: bool = False) -> Run:
    """Run stages ``start``..2L+1 from residual h (B, T, D) (module docstring).

    ``patch`` needs start == 1 (h = the input node's output). ``record`` keeps node outputs and
    residuals from ``start`` on (entries before it are zero)."""
    L, H, KV = g.n_layers, g.n_heads, g.n_kv_heads
    B, T, D = h.shape
    assert patch is None or start == 1, "a patched forward starts at the input"
    copies: list[torch.Tensor] = []
    keep = patch is not None or record
    up = h.new_zeros(B, g.n_up, T, D) if keep else None  # node outputs, filled in forward order
    ptr = int((g.up_stage < start).sum())  # nodes before the start stage (not this forward's)
    if keep and start == 1:
        up[:, 0] = h
    rec = {k: h.new_zeros(B, L, T, D) for k in ("in", "mid")} if record else {}

    def read(n_in: int, down: slice) -> torch.Tensor:
        x = h[:, None].expand(B, n_in, T, D)
        if grad:
            c = torch.zeros(B, n_in, T, D, dtype=h.dtype, device=h.device, requires_grad=True)
            copies.append(c)
            return x + c
        if patch is None:
            return x
        delta = (patch.repl[:, :ptr] - up[:, :ptr]).flatten(2)  # (B, n, T*D); exact 0 where equal
        return x + (patch.outside[:, down, :ptr] @ delta).view(B, n_in, T, D)

    for s in range(start, 2 * L + 1):
        lay = (s - 1) // 2
        if s % 2:  # attention of block lay
            if record:
                rec["in"][:, lay] = h
            cos, sin = rope[lay]
            z = attention(ad, lay, read(H + 2 * KV, g.down_attn(lay)), cos[:T], sin[:T])
            o = ad.o_proj(lay)(z.flatten(2))
            post = ad.post_attn(lay)
            h = h + (o if post is None else post(o))
            if keep:
                up[:, ptr : ptr + H] = head_outputs(ad, lay, z)
                ptr += H
        else:  # MLP of block lay
            if record:
                rec["mid"][:, lay] = h
            m = ad.layers[lay].mlp(ad.norm_mlp(lay)(read(1, slice(g.down_mlp(lay), g.down_mlp(lay) + 1))[:, 0]))
            post = ad.post_mlp(lay)
            m = m if post is None else post(m)
            h = h + m
            if keep:
                up[:, ptr] = m
                ptr += 1
    x = read(1, slice(g.down_logits, g.down_logits + 1))[:, 0]  # (B, T, D)
    run = Run(logits_of(ad, x[:, -1]), copies)
    if record:
        assert ptr == g.n_up, (ptr, g.n_up)
        run.up, run.resid_in, run.resid_mid, run.resid_out = up, rec["in"], rec["mid"], h
    return run


def embed(ad: Adapter, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, D) the input node's output (gemma's sqrt(d) scale inside the module)."""
    return ad.embed(ids)
