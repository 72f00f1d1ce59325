"""Batched per-head and per-block ablation: the whole layers x units grid, zero and mean.

Naive tooling runs one hooked full forward per (prompt, layer, unit). This engine computes the
same numbers with far less work, and exactly (tests compare it with hooked HF forwards):

- **Own block stepping, no hooks.** A decoder block is run from the adapter's module handles
  (norms, q/k/v/o projections, MLP) so an ablation is an elementwise blend of the o_proj input,
  the attention output or the MLP output, and keys/values can be shared between batch rows
  without copying. GQA is computed grouped (no repeat_kv copies).
- **Reuse the clean residual.** Ablating a unit of block ``l`` leaves everything before it
  clean, so every ablated run starts from the clean ``resid[l]``; block ``l``'s attention is
  computed once for all units (its input is the same clean state) and only o_proj and the MLP
  run per unit.
- **Batch the units.** The M modes x U units of a layer are the rows of one batch
  (U = H heads, then the attention block, then the MLP block).
- **Share the template prefix** (all-position ablation). Prompts of a template share their
  leading tokens up to the word; by causality the ablated states there are identical across
  those prompts (mean ablation too: the means at those positions are the template's), so the
  ablated prefix runs once per (group, layer) and each prompt runs only its remaining
  positions against the prefix's keys and values. Prompts of different lengths are batched
  right-padded: with a causal mask, padding after a prompt's last token is never attended.
- **Reuse the clean key/value cache** (last-position ablation). Removing a unit at the last
  position changes nothing before it: only the last position runs, attending to the clean keys
  and values. All (layer, unit) runs of a prompt advance together as one *wavefront*: at block
  ``m`` the batch holds every run whose ablated layer is <= m, so each block's weights are
  read once per prompt chunk instead of once per ablated layer.

Mean ablation replaces a unit's output by its mean over all prompts of the same template at
the same position role: positions before the word (FIRST/TEMPLATE) by absolute index, the
word's tokens (WORD) pooled into one mean, positions after the word (SUFFIX/LAST) by their
offset from the end. For a head the mean is taken of its slice of the o_proj input (its output
is that slice times W_O, a linear map, so this equals the mean output). The attention-block
mean includes the o_proj bias; the MLP mean is the MLP output. With ``positions='last'`` only
the LAST key's mean is used. Means are recomputed from every prompt (one clean forward each,
batch size 1, float64 sums, in prompt order) on every run, so a resumed run uses identical
means.

Units per layer: 0..H-1 heads (the head's o_proj-input slice removed; the o_proj bias stays),
H the attention block (its whole output, o_proj bias included), H+1 the MLP block.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from extract.capture import invariant_errors
from extract.models import Adapter
from extract.prompts import Prompt
from store.schema import ABLATION_DIR, A, Mode, Role
from store.warehouse import WarehouseWriter, validation_array

MODE_NAMES: tuple[str, ...] = tuple(m.name.lower() for m in Mode)
GROUP_PROMPTS = 64  # prompts sharing one prefix run: bounds memory, amortises the prefix
ROWS_PER_PASS = 1536  # target batch rows (configs x prompts x positions) per block call
WAVE_PROMPTS = 4  # prompts whose last-position wavefronts advance together


# -- position keys (mean ablation) ---------------------------------------------------------------


@dataclass(frozen=True)
class KeyMap:
    """Role-aligned position keys of one template: pre-word index, the word, offset from end."""

    n_pre: int
    n_post: int

    @property
    def n_keys(self) -> int:
        return self.n_pre + 1 + self.n_post

    def keys(self, p: Prompt) -> list[int]:
        """Key index of each position of ``p`` (pre i -> i, word -> n_pre, post k -> n_pre+1+k)."""
        pre, post = _split_roles(p)
        out = []
        for i, r in enumerate(p.roles):
            if r == Role.WORD:
                out.append(self.n_pre)
            elif i < pre:
                out.append(i)
            else:
                out.append(self.n_pre + 1 + (p.n_tokens - 1 - i))
        assert len(out) == p.n_tokens and max(out) < self.n_keys
        return out


def _split_roles(p: Prompt) -> tuple[int, int]:
    """(positions before the word, positions after it) with the rule of the module docstring."""
    roles = p.roles
    if Role.WORD in roles:
        first = roles.index(Role.WORD)
        last = len(roles) - 1 - roles[::-1].index(Role.WORD)
        return first, len(roles) - 1 - last
    pre = sum(1 for r in roles if r in (Role.FIRST, Role.TEMPLATE))
    return pre, len(roles) - pre


def key_maps(prompts: Sequence[Prompt]) -> dict[int, KeyMap]:
    """One KeyMap per template, wide enough for every prompt of that template."""
    out: dict[int, KeyMap] = {}
    for p in prompts:
        pre, post = _split_roles(p)
        old = out.get(p.template_index, KeyMap(0, 0))
        out[p.template_index] = KeyMap(max(old.n_pre, pre), max(old.n_post, post))
    return out


@dataclass
class Means:
    """Mean o_proj input / attention output / MLP output per (template, layer, position key)."""

    maps: dict[int, KeyMap]
    z: dict[int, torch.Tensor]  # template -> (L, K, H*hd)
    attn: dict[int, torch.Tensor]  # template -> (L, K, D)
    mlp: dict[int, torch.Tensor]  # template -> (L, K, D)


# -- one decoder block, our way -----------------------------------------------------------------


@dataclass
class Ablate:
    """What block ``l`` removes in each batch row: out = value * keep + repl, per output.

    ``keep_*`` are 0/1 masks and ``repl_*`` the values put in (0 for zero ablation, the mean
    for mean ablation), both broadcastable to the selected rows ``sel`` of (C, N, S, X).
    """

    keep_z: torch.Tensor
    keep_a: torch.Tensor
    keep_m: torch.Tensor
    repl_z: torch.Tensor | None = None
    repl_a: torch.Tensor | None = None
    repl_m: torch.Tensor | None = None
    sel: tuple[slice, ...] = ()  # () = every row

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
    a: torch.Tensor | None = None  # (C, N, S, D) attention output
    m: torch.Tensor | None = None  # (C, N, S, D) MLP output


def _rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as HF's llama/qwen2 apply it (rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def block(
    ad: Adapter,
    m: int,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    sh_k: torch.Tensor | None = None,
    sh_v: torch.Tensor | None = None,
    sh_mask: torch.Tensor | None = None,
    ab: Ablate | None = None,
    kv_only: bool = False,
    record: bool = False,
) -> BlockOut:
    """Decoder block ``m`` on h (c, N, S, D): c configs x N sequences x S new positions.

    cos/sin (c|1, S, hd) are RoPE at the new positions. sh_k/sh_v (c|1, KV, P, hd) are earlier
    positions every sequence of a config attends to (a shared prefix or a clean cache), with
    sh_mask (c|1, P) True where a key is padding. With c == 1 and ``ab`` carrying C configs,
    the attention runs once and the outputs broadcast to C (block l's clean input).
    """
    a = ad.arch
    layer = ad.layers[m]
    att = layer.self_attn
    c, N, S, D = h.shape
    H, KV, hd = a.n_heads, a.n_kv_heads, a.head_dim
    G = H // KV
    x = layer.input_layernorm(h)
    cs = cos[:, None, :, None, :]  # (c|1, 1, S, 1, hd)
    sn = sin[:, None, :, None, :]
    k = _rot(att.k_proj(x).view(c, N, S, KV, hd), cs, sn).permute(0, 3, 1, 2, 4)  # (c, KV, N, S, hd)
    v = att.v_proj(x).view(c, N, S, KV, hd).permute(0, 3, 1, 2, 4)
    if kv_only:
        return BlockOut(None, k, v)
    q = _rot(att.q_proj(x).view(c, N, S, H, hd), cs, sn)
    q = q.view(c, N, S, KV, G, hd).permute(0, 3, 1, 4, 2, 5)  # (c, KV, N, G, S, hd)
    scale = float(att.scaling)
    s_self = q.reshape(c, KV, N, G * S, hd) @ k.transpose(-1, -2)  # (c, KV, N, G*S, S)
    s_self = s_self.view(c, KV, N, G, S, S) * scale
    causal = torch.ones(S, S, dtype=torch.bool, device=h.device).triu(1)
    s_self = s_self.masked_fill(causal, float("-inf"))
    if sh_k is not None:
        P = sh_k.shape[-2]
        cq = q.shape[0]
        s_sh = q.reshape(cq, KV, N * G * S, hd) @ sh_k.transpose(-1, -2)  # (c, KV, N*G*S, P)
        s_sh = s_sh.view(cq, KV, N, G, S, P) * scale
        if sh_mask is not None:
            s_sh = s_sh.masked_fill(sh_mask[:, None, None, None, None, :], float("-inf"))
        p = torch.softmax(torch.cat([s_sh, s_self], -1), dim=-1, dtype=torch.float32).to(q.dtype)
        out = (p[..., :P].reshape(cq, KV, N * G * S, P) @ sh_v).view(cq, KV, N, G * S, hd)
        out = out + p[..., P:].reshape(cq, KV, N, G * S, S) @ v
    else:
        p = torch.softmax(s_self, dim=-1, dtype=torch.float32).to(q.dtype)
        out = p.reshape(c, KV, N, G * S, S) @ v  # (c, KV, N, G*S, hd)
    z = out.view(c, KV, N, G, S, hd).permute(0, 2, 4, 1, 3, 5).reshape(c, N, S, H * hd)
    if ab is not None:
        z = ab.apply(z, ab.keep_z, ab.repl_z)  # broadcasts c == 1 to every config
    attn_out = att.o_proj(z)
    if ab is not None:
        attn_out = ab.apply(attn_out, ab.keep_a, ab.repl_a)
    h = h + attn_out
    mlp_out = layer.mlp(layer.post_attention_layernorm(h))
    if ab is not None:
        mlp_out = ab.apply(mlp_out, ab.keep_m, ab.repl_m)
    h = h + mlp_out
    if record:
        return BlockOut(h, k, v, z, attn_out, mlp_out)
    return BlockOut(h, k, v)


def _rope(ad: Adapter, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, hd) for positions 0..n-1, from the model's own rotary module."""
    w = ad.lm_head.weight
    dummy = torch.zeros(1, 1, ad.arch.d_model, dtype=w.dtype, device=w.device)
    cos, sin = ad.rotary(dummy, torch.arange(n, device=w.device)[None])
    return cos[0], sin[0]


def _logits(ad: Adapter, h_last: torch.Tensor) -> torch.Tensor:
    """(..., D) last residual -> (..., V) float32 logits through the model's norm and head."""
    return ad.lm_head(ad.final_norm(h_last)).float()


# -- clean runs and means -----------------------------------------------------------------------


@torch.no_grad()
def compute_means(ad: Adapter, prompts: Sequence[Prompt], progress: bool = False) -> Means:
    """Stream one clean forward per prompt (batch 1, prompt order): deterministic means."""
    a = ad.arch
    maps = key_maps(prompts)
    dev = ad.lm_head.weight.device
    L = a.n_layers
    sums = {t: [torch.zeros(L, km.n_keys, w, dtype=torch.float64, device=dev)
                for w in (a.n_heads * a.head_dim, a.d_model, a.d_model)] for t, km in maps.items()}
    counts = {t: torch.zeros(km.n_keys, dtype=torch.float64, device=dev) for t, km in maps.items()}
    cos, sin = _rope(ad, max(p.n_tokens for p in prompts))
    for p in tqdm(prompts, desc="ablation means", unit="prompt", disable=not progress, file=sys.stderr):
        T = p.n_tokens
        idx = torch.tensor(maps[p.template_index].keys(p), device=dev)
        h = ad.embed(torch.tensor([p.input_ids], device=dev))[None]  # (1, 1, T, D)
        zs, at, ml = sums[p.template_index]
        for m in range(L):
            o = block(ad, m, h, cos[None, :T], sin[None, :T], record=True)
            h = o.h
            zs[m].index_add_(0, idx, o.z[0, 0].double())
            at[m].index_add_(0, idx, o.a[0, 0].double())
            ml[m].index_add_(0, idx, o.m[0, 0].double())
        counts[p.template_index].index_add_(0, idx, torch.ones(T, dtype=torch.float64, device=dev))
    dt = ad.lm_head.weight.dtype
    out: dict[str, dict[int, torch.Tensor]] = {"z": {}, "attn": {}, "mlp": {}}
    for t, (zs, at, ml) in sums.items():
        n = counts[t].clamp_min(1)[None, :, None]  # keys no prompt has stay 0 (never used)
        out["z"][t], out["attn"][t], out["mlp"][t] = ((s / n).to(dt) for s in (zs, at, ml))
    return Means(maps, out["z"], out["attn"], out["mlp"])


def shared_prefix(group: Sequence[Prompt], keys: Sequence[Sequence[int]] | None = None) -> int:
    """Leading positions whose tokens (and mean keys) agree across the group; >= 1 left to run."""
    n = min(p.n_tokens for p in group) - 1
    for i in range(n):
        if len({p.input_ids[i] for p in group}) > 1 or (keys is not None and len({k[i] for k in keys}) > 1):
            return i
    return n


@dataclass
class _Group:
    """Clean state of a group of prompts of one template sharing a P-token prefix."""

    prompts: list[Prompt]
    P: int
    pre_resid: torch.Tensor  # (L+1, P, D) clean prefix residuals
    pre_k: list[torch.Tensor]  # per layer (1, KV, P, hd)
    pre_v: list[torch.Tensor]
    suf_resid: list[torch.Tensor]  # per prompt (L+1, S_p, D)
    suf_k: list[torch.Tensor]  # per prompt (L, KV, S_p, hd)
    suf_v: list[torch.Tensor]
    clean_logits: torch.Tensor  # (N, V) float32
    keys: list[list[int]]  # per prompt: mean key per position


def _chunks(items: list, size: int) -> list[list]:
    size = max(1, size)
    return [items[i : i + size] for i in range(0, len(items), size)]


def _pad_ids(prompts: Sequence[Prompt], P: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Suffix token ids right-padded (N, S) and each prompt's last suffix index (N,)."""
    S = max(p.n_tokens for p in prompts) - P
    ids = torch.zeros(len(prompts), S, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, : p.n_tokens - P] = torch.tensor(p.input_ids[P:], device=dev)
    last = torch.tensor([p.n_tokens - P - 1 for p in prompts], device=dev)
    return ids, last


@torch.no_grad()
def _clean_group(ad: Adapter, prompts: list[Prompt], keys: list[list[int]], rope) -> _Group:
    """Clean prefix once, then every prompt's own positions against its keys and values."""
    a = ad.arch
    L = a.n_layers
    dev = ad.lm_head.weight.device
    cos, sin = rope
    P = shared_prefix(prompts, keys)
    pre_resid, pre_k, pre_v = [], [], []
    if P:
        h = ad.embed(torch.tensor([prompts[0].input_ids[:P]], device=dev))[None]  # (1, 1, P, D)
        pre_resid.append(h[0, 0])
        for m in range(L):
            o = block(ad, m, h, cos[None, :P], sin[None, :P])
            h = o.h
            pre_resid.append(h[0, 0])
            pre_k.append(o.k[:, :, 0])
            pre_v.append(o.v[:, :, 0])
    suf_resid: list[torch.Tensor] = []
    suf_k: list[torch.Tensor] = []
    suf_v: list[torch.Tensor] = []
    logits = []
    S_max = max(p.n_tokens for p in prompts) - P
    for chunk in _chunks(prompts, ROWS_PER_PASS // max(1, S_max)):
        ids, last = _pad_ids(chunk, P, dev)
        N, S = ids.shape
        h = ad.embed(ids)[None]  # (1, N, S, D)
        rs, ks, vs = [h[0]], [], []
        for m in range(L):
            o = block(ad, m, h, cos[None, P : P + S], sin[None, P : P + S],
                      sh_k=pre_k[m] if P else None, sh_v=pre_v[m] if P else None)
            h = o.h
            rs.append(h[0])
            ks.append(o.k[0])
            vs.append(o.v[0])
        r = torch.stack(rs, 1)  # (N, L+1, S, D)
        kk = torch.stack(ks, 1)  # (KV, L, N, S, hd)
        vv = torch.stack(vs, 1)
        for i, p in enumerate(chunk):
            s = p.n_tokens - P
            suf_resid.append(r[i, :, :s].clone())
            suf_k.append(kk[:, :, i, :s].transpose(0, 1).clone())  # (L, KV, s, hd)
            suf_v.append(vv[:, :, i, :s].transpose(0, 1).clone())
        logits.append(_logits(ad, h[0, torch.arange(N, device=dev), last]))
    pre_r = torch.stack(pre_resid) if P else torch.zeros(L + 1, 0, a.d_model, device=dev)
    return _Group(list(prompts), P, pre_r, pre_k, pre_v, suf_resid, suf_k, suf_v,
                  torch.cat(logits), keys)


# -- ablation batches ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GridSpec:
    """The grid: modes on axis M, layers on axis L', U units per layer."""

    modes: tuple[str, ...]
    positions: Literal["all", "last"]
    layers: tuple[int, ...]
    identity: bool = False  # test hook: every config removes nothing (must reproduce clean)


def _keeps(ad: Adapter, spec: GridSpec, dev, dtype) -> tuple[torch.Tensor, ...]:
    """0/1 masks (C,) x width of what each config (mode-major, then unit) keeps."""
    a = ad.arch
    H, hd, D = a.n_heads, a.head_dim, a.d_model
    U = H + 2
    kz = torch.ones(U, H * hd, dtype=dtype, device=dev)
    for u in range(H):
        kz[u, u * hd : (u + 1) * hd] = 0
    ka = torch.ones(U, D, dtype=dtype, device=dev)
    ka[H] = 0
    km = torch.ones(U, D, dtype=dtype, device=dev)
    km[H + 1] = 0
    M = len(spec.modes)
    if spec.identity:
        kz, ka, km = torch.ones_like(kz), torch.ones_like(ka), torch.ones_like(km)
    is_mean = torch.tensor([mo == "mean" for mo in spec.modes], dtype=dtype, device=dev)
    is_mean = is_mean.repeat_interleave(U)  # (C,)
    return kz.repeat(M, 1), ka.repeat(M, 1), km.repeat(M, 1), is_mean


def _ablate(keeps, means: Means | None, tpl: int, m: int, key_idx: torch.Tensor,
            shape: tuple[int, ...], sel: tuple[slice, ...] = ()) -> Ablate:
    """Ablate for block m; configs on the axis given by ``shape`` ('C' position), keys (..., S).

    ``shape`` is how (C, width) masks broadcast onto the selected rows, e.g. (C, 1, 1, -1) when
    configs are axis 0, (1, C, 1, -1) when they are axis 1.
    """
    kz, ka, km, is_mean = keeps
    keep_z, keep_a, keep_m = (k.view(shape) for k in (kz, ka, km))
    if means is None or not bool(is_mean.any()):
        return Ablate(keep_z, keep_a, keep_m, sel=sel)
    w = is_mean.view(shape[:-1] + (1,))  # (C as shape) x 1

    def repl(keep: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        mean = table[tpl][m][key_idx]  # (..., S, X)
        return (1 - keep) * w * mean

    return Ablate(keep_z, keep_a, keep_m, repl(keep_z, means.z), repl(keep_a, means.attn),
                  repl(keep_m, means.mlp), sel=sel)


def _all_positions(ad: Adapter, g: _Group, spec: GridSpec, means: Means | None, rope,
                   sink: Callable[[int, int, torch.Tensor], None], tick: Callable[[int], None]) -> None:
    """Every (layer, config) with the unit removed at every position; calls sink(i, li, logits)."""
    a = ad.arch
    L, D = a.n_layers, a.d_model
    dev = ad.lm_head.weight.device
    dt = ad.lm_head.weight.dtype
    cos, sin = rope
    keeps = _keeps(ad, spec, dev, dt)
    C = keeps[0].shape[0]
    P = g.P
    tpl = g.prompts[0].template_index
    order = sorted(range(len(g.prompts)), key=lambda i: g.prompts[i].n_tokens)  # little padding
    S_max = max(p.n_tokens for p in g.prompts) - P
    chunks = _chunks(order, ROWS_PER_PASS // (C * S_max))
    pre_keys = torch.tensor(g.keys[0][:P], dtype=torch.long, device=dev)[None]  # (1, P)
    for li, lay in enumerate(spec.layers):
        pk: list[torch.Tensor | None] = [None] * L
        pv: list[torch.Tensor | None] = [None] * L
        if P:
            # The ablated prefix: block l's attention once (clean input), then C configs.
            h = g.pre_resid[lay][None, None]  # (1, 1, P, D)
            for m in range(lay, L):
                ab = _ablate(keeps, means, tpl, m, pre_keys, (C, 1, 1, -1)) if m == lay else None
                o = block(ad, m, h, cos[None, :P], sin[None, :P], ab=ab, kv_only=m == L - 1)
                pk[m], pv[m] = o.k[:, :, 0], o.v[:, :, 0]  # (c, KV, P, hd)
                h = o.h
        for chunk in chunks:
            ps = [g.prompts[i] for i in chunk]
            N = len(ps)
            S = max(p.n_tokens for p in ps) - P
            h = torch.zeros(1, N, S, D, dtype=dt, device=dev)
            kidx = torch.zeros(N, S, dtype=torch.long, device=dev)
            for j, i in enumerate(chunk):
                s = ps[j].n_tokens - P
                h[0, j, :s] = g.suf_resid[i][lay]
                kidx[j, :s] = torch.tensor(g.keys[i][P:], device=dev)
            last = torch.tensor([p.n_tokens - P - 1 for p in ps], device=dev)
            for m in range(lay, L):
                ab = _ablate(keeps, means, tpl, m, kidx, (C, 1, 1, -1)) if m == lay else None
                o = block(ad, m, h, cos[None, P : P + S], sin[None, P : P + S],
                          sh_k=pk[m], sh_v=pv[m], ab=ab)
                h = o.h
            assert h.shape == (C, N, S, D), h.shape
            logits = _logits(ad, h[:, torch.arange(N, device=dev), last])  # (C, N, V)
            for j, i in enumerate(chunk):
                sink(i, li, logits[:, j])
            tick(N)


def _last_position(ad: Adapter, g: _Group, spec: GridSpec, means: Means | None, rope,
                   sink: Callable[[int, int, torch.Tensor], None], tick: Callable[[int], None]) -> None:
    """Every (layer, config) with the unit removed at the last position only: one wavefront."""
    a = ad.arch
    L, D, KV, hd = a.n_layers, a.d_model, a.n_kv_heads, a.head_dim
    dev = ad.lm_head.weight.device
    dt = ad.lm_head.weight.dtype
    cos, sin = rope
    keeps = _keeps(ad, spec, dev, dt)
    C = keeps[0].shape[0]
    P = g.P
    tpl = g.prompts[0].template_index
    starts = set(spec.layers)
    for chunk in _chunks(list(range(len(g.prompts))), WAVE_PROMPTS):
        ps = [g.prompts[i] for i in chunk]
        B = len(ps)
        ctx = max(p.n_tokens for p in ps) - 1  # clean keys before the last position
        pos = torch.tensor([p.n_tokens - 1 for p in ps], device=dev)
        cs, sn = cos[pos][:, None], sin[pos][:, None]  # (B, 1, hd)
        mask = torch.ones(B, ctx, dtype=torch.bool, device=dev)
        for j, p in enumerate(ps):
            mask[j, : p.n_tokens - 1] = False
        kidx = torch.tensor([g.keys[i][-1] for i in chunk], device=dev)[:, None, None]  # (B, 1, 1)
        h = torch.zeros(B, 0, 1, D, dtype=dt, device=dev)
        for m in range(L):
            ab = None
            if m in starts:
                new = torch.stack([g.suf_resid[i][m, -1] for i in chunk])  # (B, D) clean
                h = torch.cat([h, new[:, None, None].expand(B, C, 1, D)], 1)
                ab = _ablate(keeps, means, tpl, m, kidx, (1, C, 1, -1),
                             sel=(slice(None), slice(h.shape[1] - C, None)))
            if h.shape[1] == 0:
                continue
            sk = torch.zeros(B, KV, ctx, hd, dtype=dt, device=dev)
            sv = torch.zeros(B, KV, ctx, hd, dtype=dt, device=dev)
            for j, i in enumerate(chunk):
                s = ps[j].n_tokens - P - 1  # own clean positions before the last
                if P:
                    sk[j, :, :P] = g.pre_k[m][0]
                    sv[j, :, :P] = g.pre_v[m][0]
                sk[j, :, P : P + s] = g.suf_k[i][m, :, :s]
                sv[j, :, P : P + s] = g.suf_v[i][m, :, :s]
            h = block(ad, m, h, cs, sn, sh_k=sk, sh_v=sv, sh_mask=mask, ab=ab).h
        R = h.shape[1]
        assert len(spec.layers) * C == R, (R, C)
        for j, i in enumerate(chunk):
            logits = _logits(ad, h[j, :, 0])  # (L'*C, V), rows layer-major
            for li in range(len(spec.layers)):
                sink(i, li, logits[li * C : (li + 1) * C])
        tick(B * len(spec.layers))


def grid_groups(prompts: Sequence[Prompt]) -> list[list[Prompt]]:
    """The prompt groups the grid runs together: per template, chunks of GROUP_PROMPTS.

    Cut from the whole prompt set, so a resumed run composes every group (and therefore every
    batch) exactly as the first run did and reproduces its numbers bit for bit.
    """
    by_tpl: dict[int, list[Prompt]] = {}
    for p in prompts:
        by_tpl.setdefault(p.template_index, []).append(p)
    return [g for tpl in sorted(by_tpl) for g in _chunks(by_tpl[tpl], GROUP_PROMPTS)]


def iter_grid(ad: Adapter, prompts: Sequence[Prompt], spec: GridSpec, means: Means | None, *,
              sink: Callable[[Prompt, int, torch.Tensor, torch.Tensor], None],
              done: Callable[[Prompt], None] = lambda p: None,
              tick: Callable[[int], None] = lambda n: None,
              all_prompts: Sequence[Prompt] | None = None,
              skip: Callable[[list[Prompt]], bool] = lambda g: False) -> None:
    """Run the grid; sink(prompt, layer_index, logits (C, V), clean_logits (V,)) per layer.

    C = M modes x U units, mode-major. ``done(prompt)`` follows a prompt's last sink call.
    ``all_prompts`` (default ``prompts``) fixes the mean-key layout of each template; a group
    for which ``skip(group)`` is true is not run.
    """
    if spec.modes and "mean" in spec.modes and means is None:
        raise ValueError("mean ablation needs means (compute_means)")
    maps = means.maps if means is not None else key_maps(all_prompts or prompts)
    rope = _rope(ad, max(p.n_tokens for p in prompts))
    run = _all_positions if spec.positions == "all" else _last_position
    for grp in grid_groups(prompts):
        if skip(grp):
            continue
        tpl = grp[0].template_index
        keys = [maps[tpl].keys(p) for p in grp]
        g = _clean_group(ad, grp, keys, rope)

        def _sink(i: int, li: int, logits: torch.Tensor, g: _Group = g) -> None:
            sink(g.prompts[i], li, logits, g.clean_logits[i])

        with torch.no_grad():
            run(ad, g, spec, means, rope, _sink, tick)
        for p in grp:
            done(p)


# -- numbers stored per (mode, layer, unit) ------------------------------------------------------


def summarise(ablated: torch.Tensor, clean_logits: torch.Tensor, target: int, top_k: int) -> dict:
    """Per-row numbers from ablated logits (R, V) and the clean logits (V,), float32/64."""
    ablated = ablated.float()
    lp = torch.log_softmax(ablated, -1)  # (R, V)
    clean_lp = torch.log_softmax(clean_logits.double(), -1)  # (V,)
    kl = (clean_lp.exp() * (clean_lp - lp.double())).sum(-1)  # (R,)
    t_logit = ablated[:, target]
    top_v, top_i = ablated.topk(top_k, dim=-1)
    return {
        A.TARGET_LOGIT: t_logit,
        A.TARGET_PROB: lp[:, target].exp(),
        A.TARGET_RANK: (ablated > t_logit[:, None]).sum(-1),
        A.LOGIT_DIFF: clean_logits[target].float() - t_logit,
        A.TOP1_ID: top_i[:, 0],
        A.TOP1_PROB: lp.gather(-1, top_i[:, :1])[:, 0].exp(),
        A.KL: kl.clamp_min(0.0).float(),
        A.TOPK_IDS: top_i,
        A.TOPK_LOGITS: top_v,
    }


def run_ablation(
    adapter: Adapter,
    prompts: list[Prompt],
    targets: dict[int, int],
    writer: WarehouseWriter,
    *,
    modes: tuple[str, ...],
    positions: Literal["all", "last"],
    layers: tuple[int, ...] | None,
    top_k: int,
    fingerprint: str,
    progress: bool = True,
    reference: Callable[[int], np.ndarray] | None = None,
    tolerance: float = 1e-4,
    means: Means | None = None,
    only: Callable[[list[Prompt]], bool] = lambda g: True,
) -> dict[str, float]:
    """Ablate every unit of every requested layer for each prompt without an ablation shard.

    Writes ``ablation/pNNNNN.h5`` per prompt (fields store.schema.A, axes (M, L', U[, K])),
    atomically; returns timings. With ``reference`` (prompt index -> the model's own logits at
    the last position, as the extraction stored them) each shard also records invariant 6's
    first half, checked on every run: the engine's own forward with nothing removed reproduces
    the model (rel. error within ``tolerance``). ``means`` (from ``compute_means`` over every
    prompt) skips recomputing them; only the groups of ``grid_groups(prompts)`` for which
    ``only(group)`` is true are run (a Ray worker runs one group per call).
    """
    a = adapter.arch
    L = a.n_layers
    U = a.n_heads + 2
    bad_modes = [m for m in modes if m not in MODE_NAMES]
    if bad_modes:
        raise ValueError(f"unknown ablation mode(s) {bad_modes}; choose from {', '.join(MODE_NAMES)}")
    if positions not in ("all", "last"):
        raise ValueError(f"--ablate-positions must be 'all' or 'last', not {positions!r}")
    layers = tuple(range(L)) if layers is None else tuple(sorted(set(layers)))
    bad = [x for x in layers if not 0 <= x < L]
    if bad:
        raise ValueError(f"--ablate-layers {bad} outside 0..{L - 1}")
    t0 = time.perf_counter()
    done = writer.done(ABLATION_DIR)
    mine = {p.index for g in grid_groups(prompts) if only(g) for p in g}
    pending = [p for p in prompts if p.index not in done and p.index in mine]
    if not pending or not modes or not layers:
        return {"prompts": 0, "means_s": 0.0, "grid_s": 0.0}
    missing = [p.index for p in pending if p.index not in targets]
    if missing:
        raise ValueError(f"no target token for prompts {missing[:5]}")
    if means is None and "mean" in modes:
        means = compute_means(adapter, prompts, progress)
    t1 = time.perf_counter()
    spec = GridSpec(tuple(modes), positions, layers)
    M, Lp = len(modes), len(layers)
    acc: dict[int, dict] = {}

    todo = {p.index for p in pending}

    def sink(p: Prompt, li: int, logits: torch.Tensor, clean: torch.Tensor) -> None:
        assert logits.dim() == 2 and logits.shape[0] == M * U, logits.shape  # (C, V)
        if p.index not in todo:
            return  # rerun only as a member of its group; its shard exists
        stats = summarise(logits, clean, targets[p.index], top_k)
        st = acc.setdefault(p.index, {})
        if reference is not None and A.VALIDATION not in st:
            model = torch.from_numpy(np.asarray(reference(p.index), np.float32)).to(clean.device)  # (V,)
            ((err, rel),) = invariant_errors(clean.float()[None], model[None])
            st[A.VALIDATION] = validation_array(
                [("ablation_clean_is_model", err, rel, tolerance, rel <= tolerance)])
        for f, v in stats.items():
            arr = st.setdefault(f, np.zeros((M, Lp, U, *v.shape[1:]), dtype=np.dtype(f.dtype)))
            arr[:, li] = v.cpu().numpy().reshape(M, U, *v.shape[1:])

    def finish(p: Prompt) -> None:
        if p.index not in todo:
            return  # its shard exists: never rewritten
        st = acc.pop(p.index)
        with writer.shard_writer(p.index, ABLATION_DIR) as s:
            for f, v in st.items():
                s.put(f, v)
            s.attrs({"prompt_index": p.index, "fingerprint": fingerprint, "modes": list(modes),
                     "positions": positions, "layers": np.array(layers, np.int32), "n_heads": a.n_heads})

    # Groups come from every prompt (see grid_groups): a group with a pending prompt is rerun
    # whole, as first composed, and only its missing shards are written.
    def finished(group: list[Prompt]) -> bool:
        return all(p.index not in todo for p in group)

    rerun = sum(len(g) for g in grid_groups(prompts) if not finished(g))
    bar = tqdm(total=rerun * Lp, unit="prompt-layer", desc="ablation grid", disable=not progress,
               file=sys.stderr)
    try:
        iter_grid(adapter, prompts, spec, means, sink=sink, done=finish, tick=bar.update,
                  all_prompts=prompts, skip=finished)
    finally:
        bar.close()
    return {"prompts": len(pending), "means_s": round(t1 - t0, 3),
            "grid_s": round(time.perf_counter() - t1, 3)}
