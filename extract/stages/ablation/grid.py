"""Scheduling of the ablation grid: prompt groups, the clean pass, and the two wavefronts.

See extract.stages.ablation.metrics for what is computed and why it is exact. This module decides which
rows run through which block together: groups of prompts of one template sharing a prefix,
the clean pass that records every residual, key and value once, the all-position schedule
(ablated prefix once per (group, layer), then each prompt's own positions) and the
last-position wavefront (every ablated layer of a prompt chunk advancing block by block).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from extract.models.families import Adapter
from extract.models.sizing import sizes
from extract.stages.ablation.block import Ablate, block
from extract.stages.ablation.means import Means, key_maps
from extract.stages.prompts import Prompt

GROUP_PROMPTS = 64  # prompts sharing one prefix run: bounds memory, amortises the prefix
# Rows per block call and prompts per wavefront come from the device: extract.models.sizing.


def _arange(a: int, b: int, dev) -> torch.Tensor:
    """(1, b - a) absolute positions a..b-1."""
    return torch.arange(a, b, device=dev)[None]


def _logits(ad: Adapter, h_last: torch.Tensor) -> torch.Tensor:
    """(..., D) last residual -> (..., V) float32 logits (model's norm, head and soft-cap)."""
    return ad.logits(h_last)


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


def chunks(items: list, size: int) -> list[list]:
    """``items`` in order, cut into lists of at most ``size`` (at least 1)."""
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


def _clean_blocks(ad: Adapter, h: torch.Tensor, rope, start: int, dev,
                  sh_k: list[torch.Tensor] | None = None, sh_v: list[torch.Tensor] | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Every block, clean, on h (1, N, S, D) at absolute positions start..start+S-1.

    sh_k/sh_v: per layer (1, KV, start, hd) clean keys/values of positions 0..start-1 (None:
    start == 0). Returns the residuals [(1, N, S, D)] x (L+1) (embedding first) and each
    block's keys and values [(1, KV, N, S, hd)] x L.
    """
    S = h.shape[2]
    hs, ks, vs = [h], [], []
    for m in range(ad.arch.n_layers):
        cos, sin = rope[m]
        o = block(ad, m, h, cos[None, start : start + S], sin[None, start : start + S],
                  _arange(start, start + S, dev),
                  sh_k=None if sh_k is None else sh_k[m], sh_v=None if sh_v is None else sh_v[m])
        h = o.h
        hs.append(h)
        ks.append(o.k)
        vs.append(o.v)
    return hs, ks, vs


@torch.no_grad()
def _clean_group(ad: Adapter, prompts: list[Prompt], keys: list[list[int]], rope) -> _Group:
    """Clean prefix once, then every prompt's own positions against its keys and values."""
    a = ad.arch
    L = a.n_layers
    dev = ad.lm_head.weight.device
    P = shared_prefix(prompts, keys)
    pre_resid: list[torch.Tensor] = []  # per boundary (P, D)
    pre_k: list[torch.Tensor] = []  # per layer (1, KV, P, hd)
    pre_v: list[torch.Tensor] = []
    if P:
        h = ad.embed(torch.tensor([prompts[0].input_ids[:P]], device=dev))[None]  # (1, 1, P, D)
        hs, ks, vs = _clean_blocks(ad, h, rope, 0, dev)
        pre_resid = [x[0, 0] for x in hs]
        pre_k = [k[:, :, 0] for k in ks]
        pre_v = [v[:, :, 0] for v in vs]
    suf_resid: list[torch.Tensor] = []
    suf_k: list[torch.Tensor] = []
    suf_v: list[torch.Tensor] = []
    logits = []
    S_max = max(p.n_tokens for p in prompts) - P
    for chunk in chunks(prompts, sizes(ad).rows_per_pass // max(1, S_max)):
        ids, last = _pad_ids(chunk, P, dev)
        N, S = ids.shape
        hs, ks, vs = _clean_blocks(ad, ad.embed(ids)[None], rope, P, dev,  # from (1, N, S, D)
                                   pre_k if P else None, pre_v if P else None)
        h = hs[-1]  # (1, N, S, D)
        r = torch.stack([x[0] for x in hs], 1)  # (N, L+1, S, D)
        kk = torch.stack([k[0] for k in ks], 1)  # (KV, L, N, S, hd)
        vv = torch.stack([v[0] for v in vs], 1)
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


SINK_VARIANT = {"sink": "drop", "sink_norenorm": "zero"}  # mode -> ablation_block key-0 variant


def _keeps(ad: Adapter, spec: GridSpec, dev, dtype) -> tuple:
    """0/1 masks (C,) x width of what each config (mode-major, then unit) keeps; per-config
    mean and sink-variant weights.

    zero/mean: unit u < H removes head u's o_proj-input slice, H the attention block, H+1 the
    MLP block. sink/sink_norenorm: unit u < H removes key 0 for head u, H for every head of the
    layer, H+1 nothing (its row reproduces the clean run).
    """
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
    kz_sink = kz.clone()
    kz_sink[H] = 0  # every head's slice
    one = torch.ones(U, D, dtype=dtype, device=dev)
    z_rows, a_rows, m_rows = [], [], []
    for mo in spec.modes:
        sink = mo in SINK_VARIANT
        z_rows.append(kz_sink if sink else kz)
        a_rows.append(one if sink else ka)
        m_rows.append(one if sink else km)
    kz, ka, km = torch.cat(z_rows), torch.cat(a_rows), torch.cat(m_rows)
    if spec.identity:
        kz, ka, km = torch.ones_like(kz), torch.ones_like(ka), torch.ones_like(km)

    def per_config(pred) -> torch.Tensor:
        return torch.tensor([pred(mo) for mo in spec.modes], dtype=dtype, device=dev).repeat_interleave(U)

    is_mean = per_config(lambda mo: mo == "mean")  # (C,)
    key0 = {v: per_config(lambda mo, v=v: SINK_VARIANT.get(mo) == v)
            for v in ("drop", "zero") if any(SINK_VARIANT.get(mo) == v for mo in spec.modes)}
    return kz, ka, km, is_mean, key0


def _ablate(keeps, means: Means | None, tpl: int, m: int, key_idx: torch.Tensor,
            shape: tuple[int, ...], sel: tuple[slice, ...] = ()) -> Ablate:
    """Ablate for block m; configs on the axis given by ``shape`` ('C' position), keys (..., S).

    ``shape`` is how (C, width) masks broadcast onto the selected rows, e.g. (C, 1, 1, -1) when
    configs are axis 0, (1, C, 1, -1) when they are axis 1.
    """
    kz, ka, km, is_mean, key0 = keeps
    keep_z, keep_a, keep_m = (k.view(shape) for k in (kz, ka, km))
    w_shape = shape[:-1] + (1,)  # (C as shape) x 1
    k0 = {v: w.view(w_shape) for v, w in key0.items()} or None
    if means is None or not bool(is_mean.any()):
        return Ablate(keep_z, keep_a, keep_m, sel=sel, key0=k0)
    w = is_mean.view(w_shape)

    def repl(keep: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        mean = table[tpl][m][key_idx]  # (..., S, X)
        return (1 - keep) * w * mean

    return Ablate(keep_z, keep_a, keep_m, repl(keep_z, means.z), repl(keep_a, means.attn),
                  repl(keep_m, means.mlp), sel=sel, key0=k0)


def _setup(ad: Adapter, g: _Group, spec: GridSpec) -> tuple:
    """What both schedules start from: device, dtype, the keeps of _keeps, C, the template."""
    dev = ad.lm_head.weight.device
    dt = ad.lm_head.weight.dtype
    keeps = _keeps(ad, spec, dev, dt)
    return dev, dt, keeps, keeps[0].shape[0], g.prompts[0].template_index


def _clean_kv(g: _Group, chunk: list[int], m: int, ctx: int, dt, dev) -> list[torch.Tensor]:
    """Block m's clean keys and values [(B, KV, ctx, hd)] x 2 of the chunk's prompts at their
    positions before the last (shared prefix, then their own), right-padded with zeros."""
    KV, hd = g.suf_k[chunk[0]].shape[1], g.suf_k[chunk[0]].shape[3]
    P = g.P
    out = []
    for pre, suf in ((g.pre_k, g.suf_k), (g.pre_v, g.suf_v)):
        x = torch.zeros(len(chunk), KV, ctx, hd, dtype=dt, device=dev)  # (B, KV, ctx, hd)
        for j, i in enumerate(chunk):
            s = g.prompts[i].n_tokens - P - 1  # own clean positions before the last
            if P:
                x[j, :, :P] = pre[m][0]
            x[j, :, P : P + s] = suf[i][m, :, :s]
        out.append(x)
    return out


def _all_positions(ad: Adapter, g: _Group, spec: GridSpec, means: Means | None, rope,
                   sink: Callable[[int, int, torch.Tensor], None], tick: Callable[[int], None]) -> None:
    """Every (layer, config) with the unit removed at every position; calls sink(i, li, logits)."""
    a = ad.arch
    L, D = a.n_layers, a.d_model
    dev, dt, keeps, C, tpl = _setup(ad, g, spec)
    P = g.P
    order = sorted(range(len(g.prompts)), key=lambda i: g.prompts[i].n_tokens)  # little padding
    S_max = max(p.n_tokens for p in g.prompts) - P
    batches = chunks(order, sizes(ad).rows_per_pass // (C * S_max))
    pre_keys = torch.tensor(g.keys[0][:P], dtype=torch.long, device=dev)[None]  # (1, P)
    for li, lay in enumerate(spec.layers):
        pk: list[torch.Tensor | None] = [None] * L
        pv: list[torch.Tensor | None] = [None] * L
        if P:
            # The ablated prefix: block l's attention once (clean input), then C configs.
            h = g.pre_resid[lay][None, None]  # (1, 1, P, D)
            for m in range(lay, L):
                ab = _ablate(keeps, means, tpl, m, pre_keys, (C, 1, 1, -1)) if m == lay else None
                cos, sin = rope[m]
                o = block(ad, m, h, cos[None, :P], sin[None, :P], _arange(0, P, dev), ab=ab,
                          kv_only=m == L - 1)
                pk[m], pv[m] = o.k[:, :, 0], o.v[:, :, 0]  # (c, KV, P, hd)
                h = o.h
        for chunk in batches:
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
                cos, sin = rope[m]
                o = block(ad, m, h, cos[None, P : P + S], sin[None, P : P + S], _arange(P, P + S, dev),
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
    L, D = a.n_layers, a.d_model
    dev, dt, keeps, C, tpl = _setup(ad, g, spec)
    starts = set(spec.layers)
    for chunk in chunks(list(range(len(g.prompts))), sizes(ad).wave_prompts):
        ps = [g.prompts[i] for i in chunk]
        B = len(ps)
        ctx = max(p.n_tokens for p in ps) - 1  # clean keys before the last position
        pos = torch.tensor([p.n_tokens - 1 for p in ps], device=dev)  # (B,) each row's last position
        mask = torch.ones(B, ctx, dtype=torch.bool, device=dev)
        for j, p in enumerate(ps):
            mask[j, : p.n_tokens - 1] = False
        kidx = torch.tensor([g.keys[i][-1] for i in chunk], device=dev)[:, None, None]  # (B, 1, 1)
        # Row 0 is the clean spine: nothing removed, from the embedding on. Every config starts
        # from the spine's state at its layer and the spine's logits are the clean reference, so
        # a unit that removes nothing gives bit for bit the reference (also in bfloat16).
        h = torch.stack([g.suf_resid[i][0, -1] for i in chunk])[:, None, None]  # (B, 1, 1, D)
        for m in range(L):
            ab = None
            if m in starts:
                new = h[:, :1].expand(B, C, 1, D)  # the spine at block m: clean
                h = torch.cat([h, new], 1)
                ab = _ablate(keeps, means, tpl, m, kidx, (1, C, 1, -1),
                             sel=(slice(None), slice(h.shape[1] - C, None)))
            sk, sv = _clean_kv(g, chunk, m, ctx, dt, dev)  # (B, KV, ctx, hd) each
            cos, sin = rope[m]
            h = block(ad, m, h, cos[pos][:, None], sin[pos][:, None], pos[:, None],  # (B, 1, rd)
                      sh_k=sk, sh_v=sv, sh_mask=mask, ab=ab).h
        R = h.shape[1]
        assert 1 + len(spec.layers) * C == R, (R, C)
        for j, i in enumerate(chunk):
            logits = _logits(ad, h[j, :, 0])  # (1 + L'*C, V): the spine, then rows layer-major
            g.clean_logits[i] = logits[0]
            for li in range(len(spec.layers)):
                sink(i, li, logits[1 + li * C : 1 + (li + 1) * C])
        tick(B * len(spec.layers))


def grid_groups(prompts: Sequence[Prompt]) -> list[list[Prompt]]:
    """The prompt groups the grid runs together: per template, chunks of GROUP_PROMPTS.

    Cut from the whole prompt set, so a resumed run composes every group (and therefore every
    batch) exactly as the first run did and reproduces its numbers bit for bit.
    """
    by_tpl: dict[int, list[Prompt]] = {}
    for p in prompts:
        by_tpl.setdefault(p.template_index, []).append(p)
    return [g for tpl in sorted(by_tpl) for g in chunks(by_tpl[tpl], GROUP_PROMPTS)]


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
    rope = ad.rope(max(p.n_tokens for p in prompts))  # per layer (cos, sin)
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
