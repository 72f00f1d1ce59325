"""Mean ablation's position keys and means (see extract.stages.ablation.metrics for the definitions).

A template's positions are keyed by role: positions before the word (FIRST/TEMPLATE) by
absolute index, the word's tokens (WORD) pooled into one key, positions after the word
(SUFFIX/LAST) by their offset from the end. Means are taken per (template, layer, key) of the
o_proj input, the attention block's residual contribution and the MLP block's, from one clean
forward per prompt (batch size 1, float64 sums, prompt order): deterministic across resumes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from extract.models.families import Adapter
from extract.stages.ablation.block import block
from extract.stages.prompts import Prompt
from store.schema import Role


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
    rope = ad.rope(max(p.n_tokens for p in prompts))
    for p in tqdm(prompts, desc="ablation means", unit="prompt", disable=not progress, file=sys.stderr):
        T = p.n_tokens
        idx = torch.tensor(maps[p.template_index].keys(p), device=dev)
        h = ad.embed(torch.tensor([p.input_ids], device=dev))[None]  # (1, 1, T, D)
        pos = torch.arange(T, device=dev)[None]  # (1, T)
        zs, at, ml = sums[p.template_index]
        for m in range(L):
            cos, sin = rope[m]
            o = block(ad, m, h, cos[None, :T], sin[None, :T], pos, record=True)
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
