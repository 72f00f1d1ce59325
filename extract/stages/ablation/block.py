"""One decoder block of the ablation engine, from the model's own modules, with interventions.

A block is stepped with the Hugging Face modules the adapter hands out (extract.models.families): the
norms, the q/k/v (or fused qkv) and o projections, q/k norms, the MLP module and the rotary
module's cos/sin. Only the attention core is ours (``attend``): scores against keys shared
between batch rows (a template prefix, or a clean cache) plus the rows' own keys, the family's
score scale and soft-cap, the causal and sliding-window masks by absolute position, softmax in
float32 and the weighted values -- grouped by KV head, with no repeat_kv copies.

Interventions act at three named points of a block, each ``out = value * keep + repl``:
``z`` the o_proj input (per-head slices), ``attn`` the attention block's contribution to the
residual (after the post-attention norm under sandwich norms) and ``mlp`` the MLP block's.

Sink removal (``Ablate.key0``) is one more source of ``repl_z``: the attention core also runs
with absolute key 0 removed for every head -- ``drop`` masks its score (the softmax renormalises
over the other keys; a query with no other key writes 0) and ``zero`` sets its weight to 0
after the softmax (no renormalisation: position 0's value contribution removed) -- and a
config takes the removed heads' slices from that variant instead of the clean one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from extract.models.families import Adapter


@dataclass
class Ablate:
    """What block ``l`` removes in each batch row: out = value * keep + repl, at each point.

    ``keep_*`` are 0/1 masks and ``repl_*`` the values put in (0 for zero ablation, the mean
    for mean ablation), both broadcastable to the selected rows ``sel`` of (C, N, S, X).
    Points: ``z`` o_proj input, ``a`` attention contribution, ``m`` MLP contribution.
    """

    keep_z: torch.Tensor
    keep_a: torch.Tensor
    keep_m: torch.Tensor
    repl_z: torch.Tensor | None = None
    repl_a: torch.Tensor | None = None
    repl_m: torch.Tensor | None = None
    sel: tuple[slice, ...] = ()  # () = every row
    # Sink removal: variant ('drop' | 'zero') -> 0/1 weight per config (shaped like keep_z's
    # config axis, width 1): where keep_z is 0 such a config takes that variant's z.
    key0: dict[str, torch.Tensor] | None = None

    def sink_repl(self, variants: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """repl_z plus (1 - keep_z) * sum_v w_v * z_v, z_v the o_proj input with key 0 removed."""
        out = self.repl_z
        for name, w in (self.key0 or {}).items():
            zv = variants[name][self.sel] if self.sel else variants[name]
            add = (1 - self.keep_z) * w * zv
            out = add if out is None else out + add
        return out

    def apply(self, x: torch.Tensor, keep: torch.Tensor, repl: torch.Tensor | None) -> torch.Tensor:
        if not self.sel:
            y = x * keep
            return y if repl is None else y + repl
        x = x.clone()
        y = x[self.sel] * keep
        x[self.sel] = y if repl is None else y + repl
        return x


@dataclass
class BlockOut:
    h: torch.Tensor | None  # (C, N, S, D) block output (None when kv_only)
    k: torch.Tensor  # (c, KV, N, S, hd) this block's keys (c = 1 when the input was shared)
    v: torch.Tensor  # (c, KV, N, S, hd)
    z: torch.Tensor | None = None  # (C, N, S, H*hd) o_proj input, when asked
    a: torch.Tensor | None = None  # (C, N, S, D) attention contribution
    m: torch.Tensor | None = None  # (C, N, S, D) MLP contribution


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as HF applies it (rotate_half); only the first cos.shape[-1] dims rotate (partial)."""
    rd = cos.shape[-1]
    xr = x[..., :rd]
    half = rd // 2
    out = xr * cos + torch.cat((-xr[..., half:], xr[..., :half]), dim=-1) * sin
    return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)


def _far(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """(c|1, S, K) True where key position k_pos (c|1, K) is outside the query's sliding window.

    HF's sliding mask keeps key j for query i when i - j < window; None when nothing is far.
    """
    if window is None:
        return None
    far = (q_pos[:, :, None] - k_pos[:, None, :]) >= window
    return far if bool(far.any()) else None


def _softmax(scores: torch.Tensor, key0: str | None) -> torch.Tensor:
    """float32 softmax over the last axis (keys by absolute position, key 0 first); see attend.

    scores (..., K) -> weights (..., K). The sink variants differ only in where key 0 goes:
    ``drop`` before the softmax (its score masked), ``zero`` after it (its weight zeroed).
    """
    if key0 not in (None, "drop", "zero"):
        raise ValueError(f"key0 must be 'drop' or 'zero', not {key0!r}")
    if key0 == "drop":
        scores = scores.clone()
        scores[..., 0] = float("-inf")
    p = torch.softmax(scores, dim=-1, dtype=torch.float32)  # (..., K)
    if key0 == "drop":
        return torch.nan_to_num(p, nan=0.0)  # a query whose only key was 0 attends to nothing
    if key0 == "zero":
        p = p.clone()
        p[..., 0] = 0.0
    return p


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    scale: float,
    softcap: float | None,
    window: int | None,
    sh_k: torch.Tensor | None = None,
    sh_v: torch.Tensor | None = None,
    sh_mask: torch.Tensor | None = None,
    key0: str | None = None,
) -> torch.Tensor:
    """The attention core: (c, KV, N, G, S, hd) queries -> (c, KV, N, G*S, hd) weighted values.

    k, v (c, KV, N, S, hd) are the rows' own keys at the query positions q_pos (c|1, S); sh_k,
    sh_v (c|1, KV, P, hd) keys at absolute positions 0..P-1 every row of a config sees, sh_mask
    (c|1, P) True where such a key is padding. Scores: q.k * scale, then cap*tanh(s/cap) when
    soft-capped, then the causal mask, the sliding window and the padding (HF's order).
    ``key0`` removes absolute key 0 for every head: ``'drop'`` masks its score (renormalised
    over the other keys; a query that sees no other key gets all-zero weights), ``'zero'``
    zeroes its weight after the softmax (not renormalised).
    """
    c, KV, N, G, S, hd = q.shape
    neg = float("-inf")
    s_self = (q.reshape(c, KV, N, G * S, hd) @ k.transpose(-1, -2)).view(c, KV, N, G, S, S) * scale
    if softcap is not None:
        s_self = torch.tanh(s_self / softcap) * softcap
    dev = q.device
    mask = torch.ones(S, S, dtype=torch.bool, device=dev).triu(1)  # (S, S) causal
    far = _far(q_pos, q_pos, window)  # (c|1, S, S)
    if far is not None:
        mask = (mask | far)[:, None, None, None]  # (c|1, 1, 1, 1, S, S)
    s_self = s_self.masked_fill(mask, neg)
    if sh_k is None:
        if key0 is not None:
            assert int(q_pos.reshape(-1)[0]) == 0, "without shared keys, own key 0 must be position 0"
        p = _softmax(s_self, key0).to(q.dtype)
        return p.reshape(c, KV, N, G * S, S) @ v
    P = sh_k.shape[-2]
    cq = max(c, sh_k.shape[0])
    s_sh = (q.reshape(c, KV, N * G * S, hd) @ sh_k.transpose(-1, -2)).view(cq, KV, N, G, S, P) * scale
    if softcap is not None:
        s_sh = torch.tanh(s_sh / softcap) * softcap
    if sh_mask is not None:
        s_sh = s_sh.masked_fill(sh_mask[:, None, None, None, None, :], neg)
    far_sh = _far(q_pos, torch.arange(P, device=dev)[None], window)  # (c|1, S, P)
    if far_sh is not None:
        s_sh = s_sh.masked_fill(far_sh[:, None, None, None], neg)
    p = _softmax(torch.cat([s_sh, s_self], -1), key0).to(q.dtype)
    out = (p[..., :P].reshape(cq, KV, N * G * S, P) @ sh_v).view(cq, KV, N, G * S, hd)
    return out + p[..., P:].reshape(cq, KV, N, G * S, S) @ v


def _contribution(out: torch.Tensor, post, ab: Ablate | None, point: str) -> torch.Tensor:
    """A sub-block's residual contribution (c, N, S, D): the family's post-norm when it has one
    (sandwich norms), then the intervention at ``point`` ('a' attention, 'm' MLP)."""
    if post is not None:
        out = post(out)
    if ab is not None:
        keep, repl = (ab.keep_a, ab.repl_a) if point == "a" else (ab.keep_m, ab.repl_m)
        out = ab.apply(out, keep, repl)  # (C, N, S, D): broadcasts c == 1 to every config
    return out


def block(
    ad: Adapter,
    m: int,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    sh_k: torch.Tensor | None = None,
    sh_v: torch.Tensor | None = None,
    sh_mask: torch.Tensor | None = None,
    ab: Ablate | None = None,
    kv_only: bool = False,
    record: bool = False,
) -> BlockOut:
    """Decoder block ``m`` on h (c, N, S, D): c configs x N sequences x S new positions.

    cos/sin (c|1, S, rd) are layer m's RoPE at the new positions, q_pos (c|1, S) those absolute
    positions (for the sliding window). sh_k/sh_v (c|1, KV, P, hd) are positions 0..P-1 every
    sequence of a config attends to (a shared prefix or a clean cache), sh_mask (c|1, P) True
    where a key is padding. With c == 1 and ``ab`` carrying C configs, the attention runs once
    and the outputs broadcast to C (block l's clean input).
    """
    a = ad.arch
    c, N, S, D = h.shape
    H, KV, hd = a.n_heads, a.n_kv_heads, a.head_dim
    G = H // KV
    x = ad.norm_attn(m)(h)
    q, k, v = ad.qkv(m, x)  # (c, N, S, H*hd), (c, N, S, KV*hd) x 2
    q, k = ad.qk_norm(m, q.view(c, N, S, H, hd), k.view(c, N, S, KV, hd))
    cs = cos[:, None, :, None, :]  # (c|1, 1, S, 1, rd)
    sn = sin[:, None, :, None, :]
    k = rotate(k, cs, sn).permute(0, 3, 1, 2, 4)  # (c, KV, N, S, hd)
    v = v.view(c, N, S, KV, hd).permute(0, 3, 1, 2, 4)
    if kv_only:
        return BlockOut(None, k, v)
    q = rotate(q, cs, sn).view(c, N, S, KV, G, hd).permute(0, 3, 1, 4, 2, 5)  # (c, KV, N, G, S, hd)
    def core(key0: str | None = None) -> torch.Tensor:
        out = attend(q, k, v, q_pos, scale=ad.scaling(m), softcap=a.attn_softcap, window=a.windows[m],
                     sh_k=sh_k, sh_v=sh_v, sh_mask=sh_mask, key0=key0)  # (c', KV, N, G*S, hd)
        cq = out.shape[0]
        return out.view(cq, KV, N, G, S, hd).permute(0, 2, 4, 1, 3, 5).reshape(cq, N, S, H * hd)

    z = core()
    if ab is not None:
        # One attention core per sink variant the configs use ('drop', 'zero'): (c', N, S, H*hd)
        repl = ab.sink_repl({name: core(name) for name in ab.key0}) if ab.key0 else ab.repl_z
        z = ab.apply(z, ab.keep_z, repl)  # (C, N, S, H*hd): broadcasts c == 1 to every config
    attn_out = _contribution(ad.o_proj(m)(z), ad.post_attn(m), ab, "a")  # (C, N, S, D)
    h = h + attn_out
    mlp_out = _contribution(ad.layers[m].mlp(ad.norm_mlp(m)(h)), ad.post_mlp(m), ab, "m")  # (C, N, S, D)
    h = h + mlp_out
    if record:
        return BlockOut(h, k, v, z, attn_out, mlp_out)
    return BlockOut(h, k, v)
