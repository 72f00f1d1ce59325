"""Activation patching across templates, exact and attribution: the numbers of one direction
(the stage and its shards: extract.stages.patching.stage).

For each word and template pair (a, b) both directions run: direction 0 patches the source
prompt of template a into the destination prompt of template b (with the default templates:
"repeat" into "echo", i.e. denoising the "echo" run towards the "repeat" answer, Heimersheim &
Nanda 2024), direction 1 the reverse (noising). Positions align by role
(extract.stages.patching.pairs); the grid is extract.stages.patching.grid's. Metrics at the destination's
last position, per patch:

- ``target_logit``/``target_prob`` of the destination prompt's target token;
- the logit difference ``LD = logit[t0] - logit[t1]`` where, from the two clean runs, t0 is the
  source's top-1 and t1 the destination's when they differ (rule 'top1'); when they agree, t0
  is the destination's target and t1 the destination's strongest other token (rule 'target');
- ``recovery = (LD_patched - LD_dest) / (LD_source - LD_dest)`` (Wang et al. 2022): 0 = the
  destination's behaviour, 1 = the source's;
- ``kl_source`` = KL(source clean || patched) and ``kl_dest`` = KL(destination clean || patched)
  over the full vocabulary, and the patched top-1.

Clean references: LD_source, LD_dest and both KLs use the engine's own clean forwards of the two
prompts (recorded once per direction), which the shard checks against the model's stored
logits (invariant patch_clean_is_model). ``attribution`` is the gradient of the same LD at the
destination dotted with (source - destination), one backward per pair and direction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from extract.models.families import Adapter
from extract.stages.patching.grid import Patch, attribute, plan, record, run_patches
from extract.stages.patching.pairs import Alignment
from store.schema import PT, Field
from store.schema import PatchKind as K

REFERENCES = ("LD_source/LD_dest, kl_source/kl_dest and recovery use the patching engine's clean "
              "forwards of the source and destination prompts (checked against the stored model "
              "logits: patch_clean_is_model); target_* use the destination prompt's target token")


def ld_tokens(src_logits: torch.Tensor, dst_logits: torch.Tensor, target: int) -> tuple[int, int, str]:
    """(t0, t1, rule) of the logit difference LD = logit[t0] - logit[t1] (module docstring)."""
    s1, d1 = int(src_logits.argmax()), int(dst_logits.argmax())
    if s1 != d1:
        return s1, d1, "top1"
    other = dst_logits.clone()
    other[target] = float("-inf")
    return target, int(other.argmax()), "target"


def metrics(patched: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, toks: tuple[int, int],
            target: int) -> dict[Field, torch.Tensor]:
    """Per-row numbers from patched logits (C, V) and the clean source/destination logits (V,)."""
    lp = torch.log_softmax(patched.double(), -1)  # (C, V)
    ls, ld_ = torch.log_softmax(src.double(), -1), torch.log_softmax(dst.double(), -1)
    t0, t1 = toks
    diff = patched[:, t0].double() - patched[:, t1].double()
    ld_s, ld_d = float(src[t0] - src[t1]), float(dst[t0] - dst[t1])
    return {
        PT.TARGET_LOGIT: patched[:, target].float(),
        PT.TARGET_PROB: lp[:, target].exp().float(),
        PT.LOGIT_DIFF: diff.float(),
        PT.RECOVERY: ((diff - ld_d) / (ld_s - ld_d)).float(),
        PT.KL_SOURCE: (ls.exp() * (ls - lp)).sum(-1).clamp_min(0).float(),
        PT.KL_DEST: (ld_.exp() * (ld_ - lp)).sum(-1).clamp_min(0).float(),
        PT.TOP1_ID: patched.argmax(-1).int(),
    }


def patch_direction(ad: Adapter, src_ids: Sequence[int], dst_ids: Sequence[int], al: Alignment,
                    target: int, rope, tick: Callable[[int], None] = lambda n: None) -> dict:
    """Every patch of one direction: the plan, patched logits, metrics, attribution, references."""
    src, _ = record(ad, src_ids, rope)
    dst0, _ = record(ad, dst_ids, rope)
    t0, t1, rule = ld_tokens(src.logits, dst0.logits, target)
    dst, grads = record(ad, dst_ids, rope, grad=True, ld=lambda lg: lg[t0] - lg[t1])
    assert grads is not None
    a = ad.arch
    patches = plan(a.n_layers, a.n_heads, al.dst_to_src, al.shared_prefix, dst_ids, src_ids)
    out: dict[Field, torch.Tensor] = {}
    checks: dict[K, torch.Tensor] = {}

    def sink(idx: list[int], lg: torch.Tensor) -> None:
        at = torch.tensor(idx)
        for j in range(0, len(idx), 64):  # float64 log-softmax over V: 64 rows at a time
            for k, v in metrics(lg[j : j + 64], src.logits, dst0.logits, (t0, t1), target).items():
                out.setdefault(k, torch.zeros(len(patches), dtype=v.dtype))[at[j : j + 64]] = v.cpu()
        for j, i in enumerate(idx):
            if patches[i].kind in (K.NOTHING, K.RESID_ALL):
                checks[patches[i].kind] = lg[j].float().cpu()

    run_patches(ad, dst0, src, patches, rope, tick, sink=sink)
    return {"patches": patches, "checks": checks, "src": src, "dst": dst0, "metrics": out,
            "attribution": attribute(ad, dst, src, grads, patches), "toks": (t0, t1), "rule": rule,
            "ld_source": float(src.logits[t0] - src.logits[t1]),
            "ld_dest": float(dst0.logits[t0] - dst0.logits[t1])}


def rows(patches: list[Patch], r: int) -> dict[Field, np.ndarray]:
    return {
        PT.DIRECTION: np.full(len(patches), r, np.int8),
        PT.KIND: np.array([int(p.kind) for p in patches], np.int8),
        PT.LAYER: np.array([p.layer for p in patches], np.int16),
        PT.HEAD: np.array([p.head for p in patches], np.int16),
        PT.DST_POS: np.array([p.dst[0] if len(p.dst) == 1 else -1 for p in patches], np.int16),
        PT.SRC_POS: np.array([p.src[0] if len(p.src) == 1 else -1 for p in patches], np.int16),
    }
