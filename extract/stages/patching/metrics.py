"""Activation patching across templates, exact and attribution: metrics and shards.

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

import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from extract.stages.capture.engine import invariant_errors
from extract.models.families import Adapter
from extract.stages.patching.grid import Patch, attribute, plan, record, run_patches
from extract.stages.patching.pairs import Alignment, Pair, align
from store.schema import PATCHING_DIR, PT
from store.schema import PatchKind as K
from store.warehouse import WarehouseWriter, shard_indices, validation_array

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
            target: int) -> dict[str, np.ndarray]:
    """Per-row numbers from patched logits (C, V) and the clean source/destination logits (V,)."""
    lp = torch.log_softmax(patched.double(), -1)  # (C, V)
    ls, ld_ = torch.log_softmax(src.double(), -1), torch.log_softmax(dst.double(), -1)
    t0, t1 = toks
    diff = patched[:, t0].double() - patched[:, t1].double()
    ld_s, ld_d = float(src[t0] - src[t1]), float(dst[t0] - dst[t1])
    return {
        PT.TARGET_LOGIT.name: patched[:, target].float(),
        PT.TARGET_PROB.name: lp[:, target].exp().float(),
        PT.LOGIT_DIFF.name: diff.float(),
        PT.RECOVERY.name: ((diff - ld_d) / (ld_s - ld_d)).float(),
        PT.KL_SOURCE.name: (ls.exp() * (ls - lp)).sum(-1).clamp_min(0).float(),
        PT.KL_DEST.name: (ld_.exp() * (ld_ - lp)).sum(-1).clamp_min(0).float(),
        PT.TOP1_ID.name: patched.argmax(-1).int(),
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
    out: dict[str, torch.Tensor] = {}
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


def n_patches(ad: Adapter, pair: Pair) -> int:
    a = ad.arch
    n = 0
    for r in (0, 1):
        s, d = pair.direction(r)
        al = align(d, s)
        n += len(plan(a.n_layers, a.n_heads, al.dst_to_src, al.shared_prefix, d.input_ids, s.input_ids))
    return n


def _rows(patches: list[Patch], r: int) -> dict[str, np.ndarray]:
    return {
        PT.DIRECTION.name: np.full(len(patches), r, np.int8),
        PT.KIND.name: np.array([int(p.kind) for p in patches], np.int8),
        PT.LAYER.name: np.array([p.layer for p in patches], np.int16),
        PT.HEAD.name: np.array([p.head for p in patches], np.int16),
        PT.DST_POS.name: np.array([p.dst[0] if len(p.dst) == 1 else -1 for p in patches], np.int16),
        PT.SRC_POS.name: np.array([p.src[0] if len(p.src) == 1 else -1 for p in patches], np.int16),
    }


def run_patching(ad: Adapter, pairs: Sequence[Pair], targets: dict[int, int], writer: WarehouseWriter, *,
                 fingerprint: str, reference: Callable[[int], np.ndarray], tolerance: float,
                 progress: bool = True) -> dict[str, float]:
    """Write ``patching/<a>-<b>/pNNNNN.h5`` (shard index: template a's prompt) for every pair
    without one, atomically; a resumed run skips finished pairs. Returns counts."""
    todo = []
    for pr in pairs:
        folder = writer.root / PATCHING_DIR / pr.name
        folder.mkdir(parents=True, exist_ok=True)
        if pr.a.index not in shard_indices(folder):
            todo.append(pr)
    if not todo:
        return {"pairs": 0}
    rope = ad.rope(max(max(p.a.n_tokens, p.b.n_tokens) for p in todo))
    bar = tqdm(total=sum(n_patches(ad, p) for p in todo), unit="patch", desc="patching grid",
               disable=not progress, file=sys.stderr)
    try:
        for pr in todo:
            _one_pair(ad, pr, targets, writer, fingerprint, reference, tolerance, rope, bar.update)
    finally:
        bar.close()
    return {"pairs": len(todo)}


def _one_pair(ad, pr: Pair, targets, writer, fingerprint, reference, tolerance, rope, tick) -> None:
    T = max(pr.a.n_tokens, pr.b.n_tokens)
    cols: dict[str, list[np.ndarray]] = {}
    dst_to_src = np.full((2, T), -2, np.int16)
    toks, ld_s, ld_d, rules, prompts, checks = [], [], [], [], [], []
    embed_note = []
    for r in (0, 1):
        s, d = pr.direction(r)
        al = align(d, s)
        res = patch_direction(ad, s.input_ids, d.input_ids, al, targets[d.index], rope, tick)
        rows = _rows(res["patches"], r)
        rows.update({k: v.numpy() for k, v in res["metrics"].items()})
        rows[PT.ATTRIBUTION.name] = res["attribution"].float().numpy()
        for k, v in rows.items():
            cols.setdefault(k, []).append(v)
        dst_to_src[r, : d.n_tokens] = al.dst_to_src
        toks.append(res["toks"])
        ld_s.append(res["ld_source"])
        ld_d.append(res["ld_dest"])
        rules.append(res["rule"])
        prompts.append((s.index, d.index))
        ref_s = torch.from_numpy(np.asarray(reference(s.index), np.float32))
        ref_d = torch.from_numpy(np.asarray(reference(d.index), np.float32))
        clean = torch.stack([res["src"].logits.float().cpu(), res["dst"].logits.float().cpu()])
        checks.append(("patch_clean_is_model", *invariant_errors(clean, torch.stack([ref_s, ref_d]))[0]))
        lg = res["checks"]
        checks.append(("patch_nothing_is_dest", *invariant_errors(lg[K.NOTHING][None], ref_d[None])[0]))
        full = (d.n_tokens == s.n_tokens and not al.unpatchable and K.RESID_ALL in lg)
        if full:
            checks.append(("patch_embed_all_is_source", *invariant_errors(lg[K.RESID_ALL][None], ref_s[None])[0]))
            embed_note.append("checked")
        else:
            embed_note.append(f"not applicable: lengths {s.n_tokens}/{d.n_tokens}, "
                              f"{len(al.unpatchable)} unpatchable positions (the patched run is a hybrid "
                              "of both prompts, not the source)")
    worst: dict[str, tuple[float, float]] = {}
    for name, err, rel in checks:
        e0, r0 = worst.get(name, (0.0, 0.0))
        worst[name] = (max(e0, err), max(r0, rel))
    val = validation_array([(n, e, rel, tolerance, rel <= tolerance) for n, (e, rel) in worst.items()])
    with writer.shard_writer(pr.a.index, f"{PATCHING_DIR}/{pr.name}") as sw:
        for fld in (PT.DIRECTION, PT.KIND, PT.LAYER, PT.HEAD, PT.DST_POS, PT.SRC_POS, PT.TARGET_LOGIT,
                    PT.TARGET_PROB, PT.LOGIT_DIFF, PT.RECOVERY, PT.KL_SOURCE, PT.KL_DEST, PT.TOP1_ID,
                    PT.ATTRIBUTION):
            sw.put(fld, np.concatenate(cols[fld.name]))
        sw.put(PT.DST_TO_SRC, dst_to_src)
        sw.put(PT.LD_TOKENS, np.array(toks, np.int32))
        sw.put(PT.LD_SOURCE, np.array(ld_s, np.float32))
        sw.put(PT.LD_DEST, np.array(ld_d, np.float32))
        sw.put(PT.PROMPTS, np.array(prompts, np.int32))
        sw.put(PT.VALIDATION, val)
        sw.attrs({"pair": pr.name, "word": pr.word, "fingerprint": fingerprint,
                  "shared_prefix": align(pr.b, pr.a).shared_prefix, "ld_rule": rules,
                  "references": REFERENCES, "embed_all_check": embed_note,
                  "kind_names": [k.name.lower() for k in K]})
