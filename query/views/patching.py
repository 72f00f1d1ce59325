"""Views over the activation-patching shards (``patching/<a>-<b>/pNNNNN.h5``, store.schema.PT).

Light views, materialised whole on first use (a default pair of 44 words holds ~400k rows):
``patching`` (one row per patch), ``patching_pairs`` (one row per pair direction: the logit
difference's tokens and clean values), ``patching_positions`` (every destination position:
shared prefix, aligned, or unpatchable) and ``patching_validation``; registered as the kind
``patching`` (this module's last line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from query.columns import INVARIANT_CHECK, ROLE_NAMES, WORD, Column, T
from query.registry import View, ViewKind, register, table
from store.schema import PATCHING_DIR, PT, F
from store.schema import PatchKind as K
from store.warehouse import shard_indices

if TYPE_CHECKING:
    from query.shards import Shards as Loader

KIND_NAMES = {int(k): k.name.lower() for k in K}
PAIR = Column("pair", T.VARCHAR, "template pair 'a-b'")
DIRECTION = Column("direction", T.INTEGER, "0: template a's prompt patched into template b's; 1: the reverse")
_ITS_TEXT = "its text"

VIEWS: tuple[View, ...] = (
    View("patching", "activation patching: one row per patch of a pair direction, metrics at the "
         "destination's last position (empty unless extracted with --patching)", (
        PAIR, WORD, DIRECTION,
        Column("source_prompt", T.INTEGER, "prompt whose activation is put in"),
        Column("dest_prompt", T.INTEGER, "prompt that is run (metrics are its)"),
        Column("kind", T.VARCHAR, "'resid', 'attn', 'mlp', 'head' (one position), 'head_all' (every aligned "
               "differing position), 'resid_all' (boundary 0, every differing position: check row), "
               "'nothing' (check row)"),
        Column("boundary", T.INTEGER, "residual boundary for resid kinds (0 = embeddings), else NULL"),
        Column("layer", T.INTEGER, "block index; for resid kinds boundary - 1 (-1 = embeddings), as in the "
               "resid view; 0 for the 'nothing' check row"),
        Column("head", T.INTEGER, "head for 'head'/'head_all', else NULL"),
        Column("dst_pos", T.INTEGER, "destination position patched (NULL: several at once, head_all and a "
               "resid_all of more than one token)"),
        Column("src_pos", T.INTEGER, "aligned source position read (NULL: several)"),
        Column("from_end", T.INTEGER, "destination positions before the last (0 = last): aligns words of "
               "different lengths"),
        Column("dst_role", T.VARCHAR, "role of dst_pos ('template', 'word', 'suffix', 'last')"),
        Column("dst_token", T.VARCHAR, "destination token at dst_pos"),
        Column("src_token", T.VARCHAR, "source token at src_pos"),
        Column("target_logit", T.FLOAT, "destination target logit after patching"),
        Column("target_prob", T.FLOAT, "destination target probability after patching"),
        Column("logit_diff", T.FLOAT, "LD after patching (patching_pairs: which tokens)"),
        Column("ld_change", T.FLOAT, "logit_diff - LD of the destination's clean run (the exact effect)"),
        Column("recovery", T.FLOAT, "(LD patched - LD dest) / (LD source - LD dest): 0 destination, 1 source"),
        Column("kl_source", T.FLOAT, "KL(source clean || patched), nats"),
        Column("kl_dest", T.FLOAT, "KL(destination clean || patched), nats"),
        Column("top1_id", T.INTEGER, "top-1 token after patching"),
        Column("top1_text", T.VARCHAR, _ITS_TEXT),
        Column("attribution", T.FLOAT, "attribution patching's estimate of ld_change (gradient x activation "
               "difference)"),
        Column("attribution_recovery", T.FLOAT, "attribution / (LD source - LD dest): the estimate of recovery"),
    )),
    View("patching_pairs", "per pair direction: the logit difference LD = logit[token0] - logit[token1] "
         "and its clean values (empty unless extracted with --patching)", (
        PAIR, WORD, DIRECTION,
        Column("source_prompt", T.INTEGER, "source prompt"),
        Column("dest_prompt", T.INTEGER, "destination prompt"),
        Column("ld_rule", T.VARCHAR, "'top1': source top-1 minus destination top-1; 'target' (the top-1s "
               "agree): target minus the token with the highest clean destination logit other than the target"),
        Column("token0", T.INTEGER, "LD's first token"),
        Column("token0_text", T.VARCHAR, _ITS_TEXT),
        Column("token1", T.INTEGER, "LD's second token"),
        Column("token1_text", T.VARCHAR, _ITS_TEXT),
        Column("ld_source", T.FLOAT, "LD of the source's clean run"),
        Column("ld_dest", T.FLOAT, "LD of the destination's clean run"),
        Column("shared_prefix", T.INTEGER, "leading positions identical in both prompts (never patched: "
               "identical activations)"),
        Column("n_unpatchable", T.INTEGER, "destination positions with no counterpart (never guessed)"),
        Column("embed_all_check", T.VARCHAR, "whether patch_embed_all_is_source was checked, and why not"),
        Column("clean_references", T.VARCHAR, "which clean runs the metrics use"),
    )),
    View("patching_positions", "every destination position of every pair direction and its "
         "counterpart (empty unless extracted with --patching)", (
        PAIR, WORD, DIRECTION,
        Column("dst_pos", T.INTEGER, "destination position"),
        Column("src_pos", T.INTEGER, "aligned source position (NULL: unpatchable)"),
        Column("status", T.VARCHAR, "'shared_prefix' (identical, not patched), 'aligned' (patched) or "
               "'unpatchable'"),
        Column("from_end", T.INTEGER, "positions before the destination's last"),
        Column("role", T.VARCHAR, "role of the destination position"),
        Column("dst_token", T.VARCHAR, "destination token"),
        Column("src_token", T.VARCHAR, "source token (NULL: unpatchable)"),
    )),
    View("patching_validation", "invariant checks of each patching shard (both directions; worst "
         "of the two)", (
        PAIR, WORD,
        Column("invariant", T.VARCHAR, "patch_clean_is_model, patch_nothing_is_dest or "
               "patch_embed_all_is_source"),
        *INVARIANT_CHECK,
    )),
)
_BY_NAME = {v.name: v for v in VIEWS}


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _shards(lo: Loader) -> list[tuple[str, int, Any]]:
    root = lo.r.root / PATCHING_DIR
    if not root.is_dir():
        return []
    out = []
    for d in sorted(x for x in root.iterdir() if x.is_dir()):
        for i in shard_indices(d):
            out.append((d.name, i, lo.r.shard(i, f"{PATCHING_DIR}/{d.name}")))
    return out


class _Prompts:
    """Token texts and roles of the prompts a patching shard names, each read once."""

    def __init__(self, lo: Loader) -> None:
        self.lo = lo
        self._tokens: dict[int, list[str]] = {}

    def tokens(self, p: int) -> list[str]:
        if p not in self._tokens:
            self._tokens[p] = list(self.lo.r.read(F.TOKEN_TEXT, p))
        return self._tokens[p]

    def role(self, p: int, t: int) -> str:
        return ROLE_NAMES[int(self.lo.roles(p)[t])]


def _add(cols: dict[str, list], row: dict[str, Any]) -> None:
    for k, x in row.items():
        cols[k].append(x)


def _empty(name: str) -> dict[str, list]:
    return {c: [] for c in _BY_NAME[name].names}


def _validation(lo: Loader) -> pa.Table:
    cols = _empty("patching_validation")
    for pair, _idx, f in _shards(lo):
        word = _str(f.attrs["word"])
        for row in f[PT.VALIDATION.name][()]:
            _add(cols, {"pair": pair, "word": word, "invariant": _str(row["invariant"]),
                        "max_abs_err": float(row["max_abs_err"]), "rel_err": float(row["rel_err"]),
                        "tolerance": float(row["tolerance"]), "passed": bool(row["passed"])})
    return table(_BY_NAME["patching_validation"], lo.d_model, cols)


def _pairs(lo: Loader) -> pa.Table:
    cols = _empty("patching_pairs")
    for pair, _idx, f in _shards(lo):
        word, prompts, d2s = _str(f.attrs["word"]), f[PT.PROMPTS.name][()], f[PT.DST_TO_SRC.name][()]
        lt = f[PT.LD_TOKENS.name][()]
        rules = [_str(x) for x in f.attrs["ld_rule"]]
        notes = [_str(x) for x in f.attrs["embed_all_check"]]
        for r in range(2):
            t0, t1 = (int(x) for x in lt[r])
            _add(cols, {"pair": pair, "word": word, "direction": r, "source_prompt": int(prompts[r, 0]),
                        "dest_prompt": int(prompts[r, 1]), "ld_rule": rules[r], "token0": t0,
                        "token0_text": lo.text([t0])[0], "token1": t1, "token1_text": lo.text([t1])[0],
                        "ld_source": float(f[PT.LD_SOURCE.name][r]), "ld_dest": float(f[PT.LD_DEST.name][r]),
                        "shared_prefix": int(f.attrs["shared_prefix"]), "n_unpatchable": int((d2s[r] == -1).sum()),
                        "embed_all_check": notes[r], "clean_references": _str(f.attrs["references"])})
    return table(_BY_NAME["patching_pairs"], lo.d_model, cols)


def _positions(lo: Loader) -> pa.Table:
    cols, pr = _empty("patching_positions"), _Prompts(lo)
    for pair, _idx, f in _shards(lo):
        word, prompts, d2s = _str(f.attrs["word"]), f[PT.PROMPTS.name][()], f[PT.DST_TO_SRC.name][()]
        P = int(f.attrs["shared_prefix"])
        for r in range(2):
            s, d = (int(x) for x in prompts[r])
            ts, td = pr.tokens(s), pr.tokens(d)
            T = len(td)
            for t in range(T):
                j = int(d2s[r, t])
                st = "shared_prefix" if t < P else ("aligned" if j >= 0 else "unpatchable")
                _add(cols, {"pair": pair, "word": word, "direction": r, "dst_pos": t,
                            "src_pos": j if j >= 0 else None, "status": st, "from_end": T - 1 - t,
                            "role": pr.role(d, t), "dst_token": td[t], "src_token": ts[j] if j >= 0 else None})
    return table(_BY_NAME["patching_positions"], lo.d_model, cols)


def _patches(lo: Loader) -> pa.Table:
    """The ``patching`` view: one row per patch, its position columns from the prompts' tokens."""
    cols, pr = _empty("patching"), _Prompts(lo)
    for pair, _idx, f in _shards(lo):
        prompts = f[PT.PROMPTS.name][()]
        direction, kind, layer, head, dpos, spos = (f[fld.name][()].astype(np.int64) for fld in (
            PT.DIRECTION, PT.KIND, PT.LAYER, PT.HEAD, PT.DST_POS, PT.SRC_POS))  # (N,) each
        ld_s, ld_d = f[PT.LD_SOURCE.name][()], f[PT.LD_DEST.name][()]
        n = direction.size
        resid = np.isin(kind, [K.RESID, K.RESID_ALL])
        T_dst = {r: len(pr.tokens(int(prompts[r, 1]))) for r in range(2)}
        cols["pair"] += [pair] * n
        cols["word"] += [_str(f.attrs["word"])] * n
        cols["direction"] += direction.tolist()
        cols["source_prompt"] += prompts[direction, 0].tolist()
        cols["dest_prompt"] += prompts[direction, 1].tolist()
        cols["kind"] += [KIND_NAMES[k] for k in kind.tolist()]
        cols["boundary"] += [int(x) if r else None for x, r in zip(layer, resid, strict=True)]
        cols["layer"] += np.where(resid, layer - 1, layer).tolist()
        cols["head"] += [int(x) if x >= 0 else None for x in head]
        cols["dst_pos"] += [int(x) if x >= 0 else None for x in dpos]
        cols["src_pos"] += [int(x) if x >= 0 else None for x in spos]
        cols["from_end"] += [T_dst[r] - 1 - int(x) if x >= 0 else None for r, x in zip(direction, dpos, strict=True)]
        for r_, x, y in zip(direction.tolist(), dpos.tolist(), spos.tolist(), strict=True):
            d, s = int(prompts[r_, 1]), int(prompts[r_, 0])
            cols["dst_role"].append(pr.role(d, x) if x >= 0 else None)
            cols["dst_token"].append(pr.tokens(d)[x] if x >= 0 else None)
            cols["src_token"].append(pr.tokens(s)[y] if y >= 0 else None)
        for fld in (PT.TARGET_LOGIT, PT.TARGET_PROB, PT.LOGIT_DIFF, PT.RECOVERY, PT.KL_SOURCE, PT.KL_DEST,
                    PT.TOP1_ID, PT.ATTRIBUTION):
            cols[fld.name] += f[fld.name][()].tolist()
        cols["ld_change"] += (f[PT.LOGIT_DIFF.name][()] - ld_d[direction]).tolist()
        cols["top1_text"] += lo.text(f[PT.TOP1_ID.name][()])
        cols["attribution_recovery"] += (f[PT.ATTRIBUTION.name][()] / (ld_s - ld_d)[direction]).tolist()
    return table(_BY_NAME["patching"], lo.d_model, cols)


KIND = register(ViewKind("patching", VIEWS, light={
    "patching": _patches, "patching_pairs": _pairs, "patching_positions": _positions,
    "patching_validation": _validation}))
