"""Batched per-head and per-block ablation: the whole layers x units grid, zero and mean.

Naive tooling runs one hooked full forward per (prompt, layer, head). This engine does the
same math with far less work, exactly:

- **Reuse the clean residual.** Ablating a unit of block ``l`` leaves the residual stream
  before block ``l`` untouched, so every ablated run starts from the clean ``resid[l]``.
- **Batch the units.** A layer's H heads, its attention block and its MLP block are U = H + 2
  rows of one batch; a hook on block ``l`` removes a different unit in each row.
- **Share the prompt prefix** (all-position ablation). Prompts of one template share the
  tokens before the word; by causality their ablated states there are identical, so the
  prefix runs once per (group, layer) and each prompt runs only its remaining positions
  against the prefix's keys and values.
- **Reuse the clean key/value cache** (last-position ablation). Removing a unit's output at
  the last position changes nothing before it, so only the last position runs, attending to
  the clean keys and values of the earlier positions.

Mean ablation replaces a unit's output by its mean over the prompts of the same template at
the same *position role*: positions before the word by absolute index, the word's tokens
pooled into one mean, positions after the word by their offset from the end. For a head the
mean is taken of its slice of the o_proj input (its output is that slice times W_O, a linear
map, so this is the mean output). Means are recomputed from every prompt on each run, so a
resumed run uses the same means.

Units per layer: 0..H-1 heads, H the attention block (its whole output, o_proj bias included),
H+1 the MLP block.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from extract.models import Adapter
from extract.prompts import Prompt
from store.schema import ABLATION_DIR, A, Mode, Role
from store.warehouse import WarehouseWriter

MODE_NAMES = tuple(m.name.lower() for m in Mode)


# -- a minimal key/value cache: the only method attention calls is update() ------------------


class KV:
    """Keys/values per layer; ``frozen`` layers are prepended to new ones but never grow.

    Decoder layers call ``cache.update(k, v, layer_idx, ...)`` and attend to what it returns;
    that is the whole protocol, so this works across transformers versions.
    """

    def __init__(self, frozen: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 record: bool = False) -> None:
        self.frozen = frozen or {}
        self.record = record
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.frozen:
            fk, fv = self.frozen[layer_idx]
            k = torch.cat([fk, k], dim=-2)
            v = torch.cat([fv, v], dim=-2)
        if self.record:
            self.store[layer_idx] = (k, v)
        return k, v


def _mask(q: int, kv: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive causal mask (1, 1, q, kv) for q new positions after kv - q cached ones."""
    i = torch.arange(q, device=device)[:, None] + (kv - q)
    j = torch.arange(kv, device=device)[None, :]
    m = torch.zeros(q, kv, dtype=dtype, device=device)
    m[j > i] = torch.finfo(dtype).min
    return m[None, None]


# -- replacing units -------------------------------------------------------------------------


@dataclass
class Replacement:
    """What each batch row removes at block ``layer``, at every position being run.

    ``z``/``attn``/``mlp`` hold the values put in place (zeros, or means for these positions):
    z (q, H*hd), attn (q, D), mlp (q, D). Row r ablates unit ``r % U``.
    """

    layer: int
    units: int  # U = H + 2
    head_dim: int
    z: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor


@contextmanager
def _replacing(adapter: Adapter, rep: Replacement | None) -> Iterator[None]:
    if rep is None:
        yield
        return
    a = adapter.arch
    H, hd, U = a.n_heads, rep.head_dim, rep.units
    layer = adapter.layers[rep.layer]

    def rows(n: int, device) -> torch.Tensor:
        return torch.arange(n, device=device) % U  # unit removed by each row

    def pre_o(mod, args):
        z = args[0]  # (B, q, H*hd)
        unit = rows(z.shape[0], z.device)
        head_of = torch.arange(H, device=z.device).repeat_interleave(hd)  # (H*hd,)
        hit = (unit[:, None] == head_of[None, :])[:, None, :]  # (B, 1, H*hd)
        assert rep.z.shape == z.shape[1:], (rep.z.shape, z.shape)
        return (torch.where(hit, rep.z.to(z.dtype)[None], z),)

    def post_attn(mod, args, out):
        o = out[0]  # (B, q, D)
        hit = (rows(o.shape[0], o.device) == H)[:, None, None]
        return (torch.where(hit, rep.attn.to(o.dtype)[None], o), *out[1:])

    def post_mlp(mod, args, out):
        hit = (rows(out.shape[0], out.device) == H + 1)[:, None, None]
        return torch.where(hit, rep.mlp.to(out.dtype)[None], out)

    hs = [layer.self_attn.o_proj.register_forward_pre_hook(pre_o),
          layer.self_attn.register_forward_hook(post_attn),
          layer.mlp.register_forward_hook(post_mlp)]
    try:
        yield
    finally:
        for h in hs:
            h.remove()


# -- running layers ----------------------------------------------------------------------------


@torch.no_grad()
def run_layers(adapter: Adapter, h: torch.Tensor, start: int, offset: int, cache: KV,
               rep: Replacement | None = None) -> torch.Tensor:
    """Run blocks start..L-1 on h (B, q, D) at positions offset..offset+q-1; returns (B, q, D)."""
    B, q, D = h.shape
    kv_len = offset + q
    pos = torch.arange(offset, kv_len, device=h.device)[None]  # (1, q)
    cos_sin = adapter.rotary(h, pos)
    mask = _mask(q, kv_len, h.dtype, h.device)
    kw = {adapter.cache_kwarg: cache}
    with _replacing(adapter, rep):
        for i in range(start, adapter.arch.n_layers):
            h = adapter.layers[i](h, attention_mask=mask, position_ids=pos, use_cache=True,
                                  position_embeddings=cos_sin, **kw)
            h = h[0] if isinstance(h, tuple) else h
    assert h.shape == (B, q, D), h.shape
    return h


def last_logits(adapter: Adapter, h_last: torch.Tensor) -> torch.Tensor:
    """(B, D) last residual -> (B, V) float32 logits through the model's own norm and head."""
    return adapter.lm_head(adapter.final_norm(h_last)).float()


@dataclass
class Clean:
    """The clean run of a group of equal-length prompts, from our own layer stepping."""

    resid: torch.Tensor  # (G, L+1, T, D) in the model dtype
    logits: torch.Tensor  # (G, V) float32
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (G, kv, T, hd) keys, values


@torch.no_grad()
def clean_run(adapter: Adapter, ids: torch.Tensor) -> Clean:
    """Embed and step through every block, recording residuals and keys/values."""
    h = adapter.embed(ids)  # (G, T, D)
    G, T, D = h.shape
    cache = KV(record=True)
    pos = torch.arange(T, device=h.device)[None]
    cos_sin = adapter.rotary(h, pos)
    mask = _mask(T, T, h.dtype, h.device)
    resid = [h]
    for layer in adapter.layers:
        h = layer(h, attention_mask=mask, position_ids=pos, use_cache=True, position_embeddings=cos_sin,
                  **{adapter.cache_kwarg: cache})
        h = h[0] if isinstance(h, tuple) else h
        resid.append(h)
    return Clean(torch.stack(resid, 1), last_logits(adapter, h[:, -1]), cache.store)


# -- means ------------------------------------------------------------------------------------


def position_keys(p: Prompt) -> list[tuple]:
    """Role-aligned key of each position: ('pre', i), ('word',) or ('post', offset from end)."""
    first_word = p.roles.index(Role.WORD)
    keys: list[tuple] = []
    for i, r in enumerate(p.roles):
        if r == Role.WORD:
            keys.append(("word",))
        elif i < first_word:
            keys.append(("pre", i))
        else:
            keys.append(("post", p.n_tokens - 1 - i))
    return keys


@dataclass
class Means:
    """Mean o_proj input, attention output and MLP output per (template, layer, position key)."""

    z: dict[tuple[int, tuple], torch.Tensor]  # (template, key) -> (L, H*hd)
    attn: dict[tuple[int, tuple], torch.Tensor]  # -> (L, D)
    mlp: dict[tuple[int, tuple], torch.Tensor]  # -> (L, D)

    def for_positions(self, template: int, keys: list[tuple], layer: int) -> tuple[torch.Tensor, ...]:
        z = torch.stack([self.z[(template, k)][layer] for k in keys])  # (q, H*hd)
        a = torch.stack([self.attn[(template, k)][layer] for k in keys])  # (q, D)
        m = torch.stack([self.mlp[(template, k)][layer] for k in keys])  # (q, D)
        return z, a, m


@torch.no_grad()
def compute_means(adapter: Adapter, prompts: list[Prompt], batch: int, progress: bool) -> Means:
    """Stream clean runs of every prompt, accumulating float64 sums per template and key."""
    from extract.capture import capture

    sums: dict[str, dict] = {"z": defaultdict(lambda: 0.0), "attn": defaultdict(lambda: 0.0),
                             "mlp": defaultdict(lambda: 0.0)}
    counts: dict[tuple, int] = defaultdict(int)
    dev = adapter.lm_head.weight.device
    groups = prompt_groups(prompts, batch)
    for g in tqdm(groups, desc="ablation means", unit="group", disable=not progress, file=sys.stderr):
        cap = capture(adapter, torch.tensor([p.input_ids for p in g], device=dev))
        for b, p in enumerate(g):
            for pos, key in enumerate(position_keys(p)):
                k = (p.template_index, key)
                sums["z"][k] = sums["z"][k] + cap.z[b, :, pos].double()
                sums["attn"][k] = sums["attn"][k] + cap.attn_out[b, :, pos].double()
                sums["mlp"][k] = sums["mlp"][k] + cap.mlp_out[b, :, pos].double()
                counts[k] += 1
    dt = adapter.lm_head.weight.dtype
    out = {name: {k: (v / counts[k]).to(dt) for k, v in s.items()} for name, s in sums.items()}
    return Means(out["z"], out["attn"], out["mlp"])


# -- the grid -----------------------------------------------------------------------------------


def prompt_groups(prompts: list[Prompt], size: int) -> list[list[Prompt]]:
    """Prompts of one template and one length: same prefix and suffix positions."""
    by: dict[tuple[int, int], list[Prompt]] = defaultdict(list)
    for p in prompts:
        by[(p.template_index, p.n_tokens)].append(p)
    return [g[i : i + size] for _, g in sorted(by.items()) for i in range(0, len(g), size)]


def shared_prefix(group: list[Prompt]) -> int:
    """Positions shared by every prompt of the group, up to the word (at least 1 left to run)."""
    first_word = min(p.roles.index(Role.WORD) for p in group)
    n = 0
    while n < first_word and len({p.input_ids[n] for p in group}) == 1:
        n += 1
    return min(n, group[0].n_tokens - 1)


@dataclass
class GridSpec:
    modes: tuple[str, ...]
    positions: str  # "all" | "last"
    layers: tuple[int, ...]


def _replacement(adapter: Adapter, mode: str, layer: int, means: Means | None, template: int,
                 keys: list[tuple], device) -> Replacement:
    a = adapter.arch
    U = a.n_heads + 2
    q = len(keys)
    dt = adapter.lm_head.weight.dtype
    if mode == "zero":
        z = torch.zeros(q, a.n_heads * a.head_dim, dtype=dt, device=device)
        at = torch.zeros(q, a.d_model, dtype=dt, device=device)
        ml = torch.zeros(q, a.d_model, dtype=dt, device=device)
    else:
        assert means is not None
        z, at, ml = means.for_positions(template, keys, layer)
    return Replacement(layer, U, a.head_dim, z, at, ml)


@torch.no_grad()
def ablate_group(adapter: Adapter, group: list[Prompt], clean: Clean, spec: GridSpec,
                 means: Means | None, on_layer: Callable[[], None] | None = None) -> torch.Tensor:
    """Ablated last-position logits for every (mode, layer, prompt, unit): (M, L', G, U, V)."""
    a = adapter.arch
    U = a.n_heads + 2
    G = len(group)
    T = group[0].n_tokens
    keys = position_keys(group[0])
    tpl = group[0].template_index
    out = []
    for mode in spec.modes:
        per_layer = []
        for layer in spec.layers:
            if spec.positions == "last":
                rep = _replacement(adapter, mode, layer, means, tpl, keys[-1:], clean.resid.device)
                frozen = {i: tuple(t[:, :, : T - 1].repeat_interleave(U, 0) for t in clean.kv[i])
                          for i in range(layer, a.n_layers)}
                h = clean.resid[:, layer, T - 1 :].repeat_interleave(U, 0)  # (G*U, 1, D)
                h = run_layers(adapter, h, layer, T - 1, KV(frozen), rep)
            else:
                P = shared_prefix(group)
                if P > 0:
                    rep_p = _replacement(adapter, mode, layer, means, tpl, keys[:P], clean.resid.device)
                    pre = KV(record=True)
                    hp = clean.resid[:1, layer, :P].expand(U, P, a.d_model)  # (U, P, D)
                    run_layers(adapter, hp, layer, 0, pre, rep_p)
                    # row g*U + u of the suffix batch continues prefix row u
                    frozen = {i: tuple(t.repeat(G, 1, 1, 1) for t in pre.store[i]) for i in range(layer, a.n_layers)}
                else:
                    frozen = {}
                rep = _replacement(adapter, mode, layer, means, tpl, keys[P:], clean.resid.device)
                h = clean.resid[:, layer, P:].repeat_interleave(U, 0)  # (G*U, T-P, D)
                h = run_layers(adapter, h, layer, P, KV(frozen), rep)
            logits = last_logits(adapter, h[:, -1]).view(G, U, -1)  # (G, U, V)
            per_layer.append(logits)
            if on_layer is not None:
                on_layer()
        out.append(torch.stack(per_layer))
    return torch.stack(out)  # (M, L', G, U, V)


def summarise(ablated: torch.Tensor, clean_logits: torch.Tensor, target: int, top_k: int) -> dict:
    """Per-(mode, layer, unit) numbers for one prompt from its ablated logits (M, L', U, V)."""
    lp = torch.log_softmax(ablated, -1)
    clean_lp = torch.log_softmax(clean_logits, -1)  # (V,)
    t_logit = ablated[..., target]
    top_v, top_i = ablated.topk(top_k, dim=-1)
    kl = (clean_lp.exp() * (clean_lp - lp)).sum(-1)
    return {
        A.TARGET_LOGIT: t_logit,
        A.TARGET_PROB: lp[..., target].exp(),
        A.TARGET_RANK: (ablated > t_logit[..., None]).sum(-1),
        A.LOGIT_DIFF: clean_logits[target] - t_logit,
        A.TOP1_ID: top_i[..., 0],
        A.TOP1_PROB: lp.gather(-1, top_i[..., :1])[..., 0].exp(),
        A.KL: kl.clamp_min(0.0),
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
    positions: str,
    layers: tuple[int, ...] | None,
    top_k: int,
    fingerprint: str,
    batch: int = 16,
    progress: bool = True,
) -> dict[str, float]:
    """Ablate every unit of every requested layer for every prompt without a shard yet."""
    L = adapter.arch.n_layers
    layers = tuple(range(L)) if layers is None else tuple(layers)
    bad = [x for x in layers if not 0 <= x < L]
    if bad:
        raise ValueError(f"--ablate-layers {bad} outside 0..{L - 1}")
    spec = GridSpec(tuple(modes), positions, layers)
    t0 = time.perf_counter()
    done = writer.done(ABLATION_DIR)
    pending = [p for p in prompts if p.index not in done]
    if not pending or not modes:
        return {"prompts": 0, "means_s": 0.0, "grid_s": 0.0}
    means = compute_means(adapter, prompts, batch, progress) if "mean" in modes else None
    t1 = time.perf_counter()
    dev = adapter.lm_head.weight.device
    groups = prompt_groups(pending, batch)
    bar = tqdm(total=len(pending) * len(layers) * len(modes), unit="prompt-layer", desc="ablation",
               disable=not progress, file=sys.stderr)
    for g in groups:
        clean = clean_run(adapter, torch.tensor([p.input_ids for p in g], device=dev))
        grid = ablate_group(adapter, g, clean, spec, means, on_layer=partial(bar.update, len(g)))
        for b, p in enumerate(g):
            stats = summarise(grid[:, :, b], clean.logits[b], targets[p.index], top_k)
            with writer.shard_writer(p.index, ABLATION_DIR) as s:
                for field, value in stats.items():
                    s.put(field, value.cpu().numpy())
                s.attrs({"prompt_index": p.index, "fingerprint": fingerprint, "modes": list(modes),
                         "positions": positions, "layers": np.array(layers, np.int32),
                         "n_heads": adapter.arch.n_heads})
    bar.close()
    return {"prompts": len(pending), "means_s": round(t1 - t0, 3), "grid_s": round(time.perf_counter() - t1, 3)}
