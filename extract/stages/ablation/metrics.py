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
the clean pass and the schedules) and this one (results: summaries and shards).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from extract.stages.ablation.block import Ablate, BlockOut, attend, block  # noqa: F401  (re-exported API)
from extract.stages.ablation.grid import (  # noqa: F401
    GROUP_PROMPTS,
    GridSpec,
    grid_groups,
    iter_grid,
    shared_prefix,
)
from extract.stages.ablation.means import KeyMap, Means, compute_means, key_maps  # noqa: F401
from extract.stages.capture.engine import invariant_errors
from extract.models.families import Adapter
from extract.stages.prompts import Prompt
from store.schema import ABLATION_DIR, A, Mode
from store.warehouse import WarehouseWriter, validation_array

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

    Writes ``ablation/pNNNNN.h5`` per prompt (fields store.schema.A, axes (M, L', U[, K]), and
    the engine's clean reference ``clean_*``, axes ()), atomically; returns timings. Every
    number is relative to that clean reference. With ``reference`` (prompt index -> the
    model's own logits at the last position, as the extraction stored them) each shard also
    records invariant 6's first half, checked on every run: the engine's own forward with
    nothing removed reproduces the model (rel. error within ``tolerance``). ``means`` (from
    ``compute_means`` over every prompt) skips recomputing them; only the groups of
    ``grid_groups(prompts)`` for which ``only(group)`` is true are run (a Ray worker runs one
    group per call).
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
        if A.CLEAN_TOP1_ID not in st:
            st.update(clean_reference(clean, targets[p.index]))
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
