"""The patching stage: one job per (template pair, word), both directions, one shard each.

``patching/<a>-<b>/pNNNNN.h5`` (store.schema.PT; the shard index is template a's prompt):
every patch of extract.stages.patching.grid's plan in both directions, exact and attribution,
the clean references and the invariant checks (extract.stages.patching.metrics). Pairs come
from ``cfg.patch_pairs`` (default 0:1); a pair whose shard is on disk is not rerun.
"""

from __future__ import annotations

import numpy as np
import torch

from extract.stages.base import Job, Loaded, PlanInput, Shard, Tick
from extract.stages.capture.engine import invariant_errors
from extract.stages.patching.grid import plan
from extract.stages.patching.metrics import REFERENCES, patch_direction, rows
from extract.stages.patching.pairs import Pair, align, build_pairs
from store.schema import PATCHING_DIR, PT, F
from store.schema import PatchKind as K
from store.warehouse import validation_array

TABLE = (PT.DIRECTION, PT.KIND, PT.LAYER, PT.HEAD, PT.DST_POS, PT.SRC_POS, PT.TARGET_LOGIT,
         PT.TARGET_PROB, PT.LOGIT_DIFF, PT.RECOVERY, PT.KL_SOURCE, PT.KL_DEST, PT.TOP1_ID, PT.ATTRIBUTION)


def pair_folder(pr: Pair) -> str:
    return f"{PATCHING_DIR}/{pr.name}"


def n_patches(n_layers: int, n_heads: int, pair: Pair) -> int:
    """Patches of both directions of a pair (the plan, without running it)."""
    n = 0
    for r in (0, 1):
        s, d = pair.direction(r)
        al = align(d, s)
        n += len(plan(n_layers, n_heads, al.dst_to_src, al.shared_prefix, d.input_ids, s.input_ids))
    return n


class PatchingStage:
    """The activation-patching grid as a stage (module docstring)."""

    name = "patching"
    unit = "patch"
    count = "pairs"

    def __init__(self) -> None:
        self._rope = None  # per process: cos/sin for the longest prompt of any pair

    @staticmethod
    def pairs(cfg, prompts) -> list[Pair]:
        return build_pairs(prompts, cfg.patch_pairs or ((0, 1),))

    def plan(self, inp: PlanInput) -> list[Job]:
        if not inp.cfg.patching:
            return []
        a = inp.arch
        return [Job(self.name, (pr.a.index, pr.b.index), (pr.a.index,), n_patches(a.n_layers, a.n_heads, pr))
                for pr in self.pairs(inp.cfg, inp.prompts) if pr.a.index not in inp.done(pair_folder(pr))]

    def run(self, job: Job, model: Loaded, tick: Tick) -> list[Shard]:
        pairs = self.pairs(model.cfg, model.prompts)
        (pr,) = [p for p in pairs if (p.a.index, p.b.index) == job.members]
        if self._rope is None:
            self._rope = model.adapter.rope(max(max(p.a.n_tokens, p.b.n_tokens) for p in pairs))
        with model.reader() as stored:
            targets = {i: int(stored.prompt_attrs(i)["target_id"]) for i in job.members}
            refs = {i: torch.from_numpy(np.asarray(stored.read(F.FINAL_LOGITS, i), np.float32))
                    for i in job.members}
        return [pair_shard(model, pr, targets, refs, self._rope, tick)]


def _checks(res: dict, s, d, al, refs: dict[int, torch.Tensor]) -> tuple[list[tuple], str]:
    """One direction's invariant rows (name, abs, rel) and its embed_all_check note."""
    ref_s, ref_d = refs[s.index], refs[d.index]
    clean = torch.stack([res["src"].logits.float().cpu(), res["dst"].logits.float().cpu()])
    out = [("patch_clean_is_model", *invariant_errors(clean, torch.stack([ref_s, ref_d]))[0])]
    lg = res["checks"]
    out.append(("patch_nothing_is_dest", *invariant_errors(lg[K.NOTHING][None], ref_d[None])[0]))
    if d.n_tokens == s.n_tokens and not al.unpatchable and K.RESID_ALL in lg:
        out.append(("patch_embed_all_is_source", *invariant_errors(lg[K.RESID_ALL][None], ref_s[None])[0]))
        return out, "checked"
    return out, (f"not applicable: lengths {s.n_tokens}/{d.n_tokens}, {len(al.unpatchable)} unpatchable "
                 "positions (the patched run is a hybrid of both prompts, not the source)")


def pair_shard(model: Loaded, pr: Pair, targets: dict[int, int], refs: dict[int, torch.Tensor],
               rope, tick: Tick) -> Shard:
    """Both directions of one pair -> its shard (patch table, references, validation)."""
    ad = model.adapter
    T = max(pr.a.n_tokens, pr.b.n_tokens)
    cols: dict = {}
    dst_to_src = np.full((2, T), -2, np.int16)
    toks, ld_s, ld_d, rules, prompts, checks, embed_note = [], [], [], [], [], [], []
    for r in (0, 1):
        s, d = pr.direction(r)
        al = align(d, s)
        res = patch_direction(ad, s.input_ids, d.input_ids, al, targets[d.index], rope, tick)
        table = rows(res["patches"], r)
        table.update({k: v.numpy() for k, v in res["metrics"].items()})
        table[PT.ATTRIBUTION] = res["attribution"].float().numpy()
        for k, v in table.items():
            cols.setdefault(k, []).append(v)
        dst_to_src[r, : d.n_tokens] = al.dst_to_src
        toks.append(res["toks"])
        ld_s.append(res["ld_source"])
        ld_d.append(res["ld_dest"])
        rules.append(res["rule"])
        prompts.append((s.index, d.index))
        rows_r, note = _checks(res, s, d, al, refs)
        checks += rows_r
        embed_note.append(note)
    worst: dict[str, tuple[float, float]] = {}
    for name, err, rel in checks:
        e0, r0 = worst.get(name, (0.0, 0.0))
        worst[name] = (max(e0, err), max(r0, rel))
    tol = model.tolerance
    arrays = {fld: np.concatenate(cols[fld]) for fld in TABLE}
    arrays.update({
        PT.DST_TO_SRC: dst_to_src, PT.LD_TOKENS: np.array(toks, np.int32),
        PT.LD_SOURCE: np.array(ld_s, np.float32), PT.LD_DEST: np.array(ld_d, np.float32),
        PT.PROMPTS: np.array(prompts, np.int32),
        PT.VALIDATION: validation_array([(n, e, rel, tol, rel <= tol) for n, (e, rel) in worst.items()]),
    })
    attrs = {"pair": pr.name, "word": pr.word, "fingerprint": model.fingerprint,
             "shared_prefix": align(pr.b, pr.a).shared_prefix, "ld_rule": rules,
             "references": REFERENCES, "embed_all_check": embed_note,
             "kind_names": [k.name.lower() for k in K]}
    return Shard(pair_folder(pr), pr.a.index, arrays, attrs)
