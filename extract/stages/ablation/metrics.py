"""Batched per-head and per-block ablation: the whole layers x units grid, zero and mean.

Naive tooling runs one hooked full forward per (prompt, layer, unit). This engine computes the
same numbers with far less work, and exactly (tests compare it with hooked HF forwards):

- **Own block stepping from the model's modules, no hooks.** A decoder block is run from the
  family adapter's module handles (norms, q/k/v or fused qkv and o projections, q/k norms, the
  MLP module, the rotary module; extract.models.families) with only the attention core ours
  (extract.stages.ablation.block.attend: shared-prefix keys, soft-cap, sliding window, softmax), so an
  ablation is an elementwise blend at a named point -- the o_proj input, the attention block's
  contribution, the MLP block's -- and keys/values can be shared between batch rows without
  copying. GQA is computed grouped (no repeat_kv copies). A new family is an adapter entry.
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
offset from the end. For a head the mean is taken of its slice of the o_proj input (without a
post-attention norm its output is that slice times W_O, a linear map, so this equals the mean
output; under sandwich norms the head's slice is replaced and the norm then rescales as in the
model). The attention-block mean is the mean of the block's residual contribution (o_proj bias
and any post-attention norm included); the MLP mean is the MLP block's (post-norm included). With ``positions='last'`` only
the LAST key's mean is used. Means are recomputed from every prompt (one clean forward each,
batch size 1, float64 sums, in prompt order) on every run, so a resumed run uses identical
means.

Units per layer: 0..H-1 heads (the head's o_proj-input slice removed; the o_proj bias stays),
H the attention block (its whole residual contribution, o_proj bias and post-norm included),
H+1 the MLP block. Sliding-window layers mask keys by absolute position in every path (the
shared prefix, each prompt's own positions, the last-position wavefront).

Modules, one concern each: extract.stages.ablation.means (position keys and means),
extract.stages.ablation.block (one block and the attention core), extract.stages.ablation.grid (groups,
the clean pass and the schedules), this one (the numbers stored per unit) and
extract.stages.ablation.stage (the stage: jobs, shards).
"""

from __future__ import annotations

import numpy as np
import torch

from extract.stages.ablation.block import Ablate, BlockOut, attend, block  # noqa: F401  (re-exported API)
from extract.stages.ablation.grid import (  # noqa: F401
    GROUP_PROMPTS,
    GridSpec,
    grid_groups,
    iter_grid,
    shared_prefix,
)
from extract.stages.ablation.means import KeyMap, Means, compute_means, key_maps  # noqa: F401
from store.schema import A, Mode

MODE_NAMES: tuple[str, ...] = tuple(m.name.lower() for m in Mode)


# -- numbers stored per (mode, layer, unit) ------------------------------------------------------


def clean_reference(clean_logits: torch.Tensor, target: int) -> dict:
    """The one clean reference of every ablation number, from the engine's clean logits (V,)."""
    clean = clean_logits.float()
    lp = torch.log_softmax(clean.double(), -1)  # (V,)
    top1 = int(clean.argmax())  # first index of the max (ties broken as summarise does)
    t_logit = clean[target]
    return {
        A.CLEAN_TOP1_ID: np.int32(top1),
        A.CLEAN_TOP1_PROB: np.float32(lp[top1].exp()),
        A.CLEAN_TARGET_LOGIT: np.float32(t_logit),
        A.CLEAN_TARGET_PROB: np.float32(lp[target].exp()),
        A.CLEAN_TARGET_RANK: np.int32((clean > t_logit).sum()),
    }


def summarise(ablated: torch.Tensor, clean_logits: torch.Tensor, target: int, top_k: int) -> dict:
    """Per-row numbers from ablated logits (R, V) against the engine's clean logits (V,).

    logit_diff and KL use the same clean logits that ``clean_reference`` summarises, so
    logit_diff == clean_target_logit - target_logit exactly (float32).
    """
    ablated = ablated.float()
    lp = torch.log_softmax(ablated.double(), -1)  # (R, V), as the clean side: equal logits, KL 0
    clean_lp = torch.log_softmax(clean_logits.double(), -1)  # (V,)
    kl = (clean_lp.exp() * (clean_lp - lp)).sum(-1)  # (R,)
    t_logit = ablated[:, target]
    top_v, top_i = ablated.topk(top_k, dim=-1)
    top1 = ablated.argmax(-1)  # (R,) first index of the max, as clean_reference: ties agree
    return {
        A.TARGET_LOGIT: t_logit,
        A.TARGET_PROB: lp[:, target].exp().float(),
        A.TARGET_RANK: (ablated > t_logit[:, None]).sum(-1),
        A.LOGIT_DIFF: clean_logits.float()[target] - t_logit,
        A.TOP1_ID: top1,
        A.TOP1_PROB: lp.gather(-1, top1[:, None])[:, 0].exp().float(),
        A.KL: kl.clamp_min(0.0).float(),
        A.TOPK_IDS: top_i,
        A.TOPK_LOGITS: top_v,
    }
