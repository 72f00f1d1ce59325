"""Views over the task-vector study's shards (store.taskvec_schema: ``taskvec/vectors.h5`` and the
per held-out word ``taskvec/aie/wNNNNN.h5`` and ``taskvec/interventions/wNNNNN.h5``).

Light views, every one empty unless extracted with --task-vectors: ``taskvec_interventions`` (one
row per intervention and held-out word), ``taskvec_clean`` (the clean reference of each prompt
kind per word: the baselines), ``taskvec_aie`` (per head and held-out word), ``taskvec_vectors``
(per train-built vector and boundary: norm and cosine with the steering direction),
``taskvec_split`` and ``taskvec_validation``; registered as the kind ``taskvec`` (last line).
Files are opened through the warehouse reader (``taskvec_file``), so each is checked on open.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pyarrow as pa

from query.columns import INVARIANT_CHECK, WORD, Column, T
from query.registry import View, ViewKind, register, table
from query.shards import shard_error
from store import WarehouseError
from store.taskvec_schema import AIE_SET, INTERVENTIONS_SET, TQ, TV, Compared, Kind, Method, Where

if TYPE_CHECKING:
    from query.shards import Shards as Loader

KIND_NAMES = {int(k): k.name.lower() for k in Kind}
METHOD_NAMES = {int(m): m.name.lower() for m in Method}
WHERE_NAMES = {int(w): w.name.lower() for w in Where}
TV_SOURCE_NAMES = {0: "tv_demo", 1: "tv_repeat"}
WORD_INDEX = Column("word_index", T.INTEGER, "the word's index in the study's word list")
BOUNDARY = Column("boundary", T.INTEGER, "residual boundary b (0 = embeddings, l = input of block l, L = last "
                  "output); the intervention writes resid[b]")
LAYER = Column("layer", T.INTEGER, "= boundary - 1: the residual after block `layer` (-1 = embeddings), as in "
               "the resid view")
_EMPTY = " (empty unless extracted with --task-vectors)"

VIEWS: tuple[View, ...] = (
    View("taskvec_interventions", "task vectors, function vectors and steering: one row per intervention and "
         "held-out word, metrics at the destination prompt's last position" + _EMPTY, (
        WORD, WORD_INDEX,
        Column("method", T.VARCHAR, "'task_vector', 'function_vector', 'steer' or 'self_patch' (a check row)"),
        Column("source_kind", T.VARCHAR, "task_vector: the prompt kind TV was built from ('demo', 'repeat'); "
               "steer: the kind it pushes towards; else NULL"),
        Column("dest_kind", T.VARCHAR, "the prompt that is run: 'zero_shot', 'neutral', 'echo', 'repeat'"),
        BOUNDARY, LAYER,
        Column("k", T.INTEGER, "function_vector: the number of top-AIE heads summed; else NULL"),
        Column("coefficient", T.DOUBLE, "steer: the signed coefficient (+c * SV on echo prompts, -c * SV on "
               "repeat prompts); else NULL"),
        Column("position_mode", T.VARCHAR, "'last' (the last token) or 'from_verb' (every position from the "
               "verb's first token on)"),
        Column("target_prob", T.FLOAT, "P(target) after the intervention (target: echo rule on the destination's "
               "clean logits)"),
        Column("target_rank", T.INTEGER, "target rank after it (0 = top-1)"),
        Column("correct", T.BOOLEAN, "the intervened top-1 is a first token of the word, ' word', Word or ' Word'"),
        Column("kl", T.FLOAT, "KL(clean || intervened), nats"),
        Column("top1_id", T.INTEGER, "the intervened top-1 token"),
        Column("top1_text", T.VARCHAR, "its text"),
    )),
    View("taskvec_clean", "the clean reference of every prompt kind of each held-out word (the baselines)"
         + _EMPTY, (
        WORD, WORD_INDEX,
        Column("kind", T.VARCHAR, "'demo', 'zero_shot', 'shuffled', 'repeat', 'echo', 'neutral'"),
        Column("target_id", T.INTEGER, "target token (echo rule on the clean logits)"),
        Column("target_text", T.VARCHAR, "its text"),
        Column("target_prob", T.FLOAT, "clean P(target)"),
        Column("target_rank", T.INTEGER, "clean target rank (0 = top-1)"),
        Column("top1_id", T.INTEGER, "clean top-1"),
        Column("top1_text", T.VARCHAR, "its text"),
        Column("correct", T.BOOLEAN, "clean top-1 is echo-correct"),
    )),
    View("taskvec_aie", "indirect effect of each head per held-out word: its train-mean o_proj-input slice "
         "put in at the last position of the shuffled-label prompt" + _EMPTY, (
        Column("layer", T.INTEGER, "block index"), Column("head", T.INTEGER, "query head"), WORD, WORD_INDEX,
        Column("aie", T.DOUBLE, "P(target | head = its mean) - P(target | shuffled): the word's term of the "
               "average indirect effect (mean over words = vectors.h5's aie)"),
        Column("target_prob", T.FLOAT, "P(target) with the head's mean put in"),
        Column("base_prob", T.FLOAT, "P(target) of the clean shuffled prompt"),
    )),
    View("taskvec_vectors", "every train-built vector per boundary: its norm and its cosine with the steering "
         "direction SV[b] = mean repeat - mean echo" + _EMPTY, (
        Column("vector", T.VARCHAR, "'tv_demo', 'tv_repeat' (task vectors), 'fv_5', 'fv_10', 'fv_20' (function "
               "vectors, the same at every boundary), 'steer' (SV itself), 'mean_repeat_vs_echo' (cosine: the "
               "mean repeat residual with the mean echo residual, the study's template cosine; norm: the mean "
               "echo residual's)"),
        BOUNDARY, LAYER,
        Column("norm", T.DOUBLE, "L2 norm of the vector"),
        Column("cosine", T.DOUBLE, "cosine with SV[b] (NULL where SV[b] = 0)"),
    )),
    View("taskvec_split", "the study's word list: train words build the vectors, held-out words are evaluated"
         + _EMPTY, (
        WORD, WORD_INDEX,
        Column("split", T.VARCHAR, "'train' (even index) or 'held_out' (odd index)"),
    )),
    View("taskvec_validation", "invariant checks of each task-vector file" + _EMPTY, (
        Column("file", T.VARCHAR, "'vectors', or the set ('aie', 'interventions') of a word's shard"),
        Column("word", T.VARCHAR, "the word (NULL: vectors.h5)"),
        Column("invariant", T.VARCHAR, "store.taskvec_schema.TV_INVARIANTS"),
        *INVARIANT_CHECK,
    )),
)
_BY_NAME = {v.name: v for v in VIEWS}
_COMPARED = {"tv_demo": Compared.TV_DEMO, "tv_repeat": Compared.TV_REPEAT, "fv_5": Compared.FV_5,
             "fv_10": Compared.FV_10, "fv_20": Compared.FV_20}


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _vectors(lo: Loader) -> h5py.File | None:
    if not lo.r.has_taskvec():
        return None
    try:
        return lo.r.taskvec_file()
    except (WarehouseError, OSError, KeyError, ValueError) as e:
        raise shard_error(e, "taskvec/vectors.h5") from None


def _words(lo: Loader, subset: str) -> Iterator[tuple[int, h5py.File]]:
    for i in lo.r.taskvec_indices(subset):
        try:
            yield i, lo.r.taskvec_file(subset, i)
        except (WarehouseError, OSError, KeyError, ValueError) as e:
            raise shard_error(e, f"taskvec/{subset}/w{i:05d}.h5") from None


def _empty(name: str) -> dict[str, list]:
    return {c: [] for c in _BY_NAME[name].names}


def _interventions(lo: Loader) -> pa.Table:
    cols = _empty("taskvec_interventions")
    for i, f in _words(lo, INTERVENTIONS_SET):
        a = {fld: f[fld.name][()] for fld in (TQ.METHOD, TQ.KIND, TQ.SOURCE, TQ.LAYER, TQ.K, TQ.COEF, TQ.WHERE)}
        n = a[TQ.METHOD].size
        cols["word"] += [_str(f.attrs["word"])] * n
        cols["word_index"] += [i] * n
        cols["method"] += [METHOD_NAMES[int(m)] for m in a[TQ.METHOD]]
        for m, k, s in zip(a[TQ.METHOD], a[TQ.KIND], a[TQ.SOURCE], strict=True):
            if m == Method.TASK_VECTOR:
                cols["source_kind"].append(KIND_NAMES[int(s)])
            elif m == Method.STEER:  # +SV on echo pushes towards repeat, -SV on repeat towards echo
                cols["source_kind"].append("repeat" if k == Kind.ECHO else "echo")
            else:
                cols["source_kind"].append(None)
        cols["dest_kind"] += [KIND_NAMES[int(k)] for k in a[TQ.KIND]]
        cols["boundary"] += a[TQ.LAYER].astype(int).tolist()
        cols["layer"] += (a[TQ.LAYER].astype(int) - 1).tolist()
        fv, st = a[TQ.METHOD] == Method.FUNCTION_VECTOR, a[TQ.METHOD] == Method.STEER
        cols["k"] += [int(k) if f_ else None for k, f_ in zip(a[TQ.K], fv, strict=True)]
        sign = np.where(a[TQ.KIND] == Kind.REPEAT, -1.0, 1.0)
        cols["coefficient"] += [float(s * c) + 0.0 if s_ else None for s, c, s_ in zip(sign, a[TQ.COEF], st, strict=True)]
        cols["position_mode"] += [WHERE_NAMES[int(w)] for w in a[TQ.WHERE]]
        cols["target_prob"] += f[TQ.TARGET_PROB.name][()].tolist()
        cols["target_rank"] += f[TQ.TARGET_RANK.name][()].tolist()
        cols["correct"] += f[TQ.ECHO_CORRECT.name][()].tolist()
        cols["kl"] += f[TQ.KL.name][()].tolist()
        top1 = f[TQ.TOP1_ID.name][()]
        cols["top1_id"] += top1.tolist()
        cols["top1_text"] += lo.text(top1)
    return table(_BY_NAME["taskvec_interventions"], lo.d_model, cols)


def _clean(lo: Loader) -> pa.Table:
    cols = _empty("taskvec_clean")
    for i, f in _words(lo, INTERVENTIONS_SET):
        kinds = f[TQ.CLEAN_KIND.name][()]
        n = kinds.size
        cols["word"] += [_str(f.attrs["word"])] * n
        cols["word_index"] += [i] * n
        cols["kind"] += [KIND_NAMES[int(k)] for k in kinds]
        tid, top1 = f[TQ.CLEAN_TARGET_ID.name][()], f[TQ.CLEAN_TOP1_ID.name][()]
        cols["target_id"] += tid.tolist()
        cols["target_text"] += lo.text(tid)
        cols["target_prob"] += f[TQ.CLEAN_TARGET_PROB.name][()].tolist()
        cols["target_rank"] += f[TQ.CLEAN_TARGET_RANK.name][()].tolist()
        cols["top1_id"] += top1.tolist()
        cols["top1_text"] += lo.text(top1)
        cols["correct"] += f[TQ.CLEAN_ECHO_CORRECT.name][()].tolist()
    return table(_BY_NAME["taskvec_clean"], lo.d_model, cols)


def _aie(lo: Loader) -> pa.Table:
    cols = _empty("taskvec_aie")
    for i, f in _words(lo, AIE_SET):
        assert (f[TQ.METHOD.name][()] == Method.HEAD_MEAN).all(), "an AIE shard holds HEAD_MEAN rows only"
        kinds = f[TQ.CLEAN_KIND.name][()].tolist()
        base = float(f[TQ.CLEAN_TARGET_PROB.name][kinds.index(Kind.SHUFFLED)])
        p = f[TQ.TARGET_PROB.name][()]
        n = p.size
        cols["layer"] += f[TQ.LAYER.name][()].astype(int).tolist()
        cols["head"] += f[TQ.HEAD.name][()].astype(int).tolist()
        cols["word"] += [_str(f.attrs["word"])] * n
        cols["word_index"] += [i] * n
        cols["aie"] += (p.astype(np.float64) - base).tolist()
        cols["target_prob"] += p.tolist()
        cols["base_prob"] += [base] * n
    return table(_BY_NAME["taskvec_aie"], lo.d_model, cols)


def _f32(f: h5py.File, fld) -> np.ndarray:
    """An activation dataset as float32 whatever the store dtype (bfloat16 is converted by HDF5)."""
    return np.asarray(f[fld.name].astype("float32")[()])


def _norm_cos(v: np.ndarray, sv: np.ndarray) -> tuple[list[float], list[float | None]]:
    """Per boundary: ||v[b]|| and cos(v[b], sv[b]) (None where either is 0). v, sv: (B, D)."""
    v, sv = v.astype(np.float64), sv.astype(np.float64)
    nv, ns = np.linalg.norm(v, axis=-1), np.linalg.norm(sv, axis=-1)
    cos = [float((a * b).sum() / (x * y)) if x * y > 0 else None for a, b, x, y in zip(v, sv, nv, ns, strict=True)]
    return nv.tolist(), cos


def _vector_rows(lo: Loader) -> pa.Table:
    cols = _empty("taskvec_vectors")
    f = _vectors(lo)
    if f is not None:
        sv = _f32(f, TV.STEER_VECTOR)  # (B, D)
        B = sv.shape[0]
        tv, fv, ks = _f32(f, TV.TASK_VECTOR), _f32(f, TV.FUNCTION_VECTOR), f[TV.FV_K.name][()]  # (S, B, D), (KF, D)
        stored = f[TV.COSINE.name][()]  # (CV, B)
        vecs = {TV_SOURCE_NAMES[s]: tv[s] for s in range(tv.shape[0])}
        vecs |= {f"fv_{int(k)}": np.broadcast_to(fv[j], sv.shape) for j, k in enumerate(ks)}
        vecs["steer"] = sv
        for name, v in vecs.items():
            norm, cos = _norm_cos(v, sv)
            if name in _COMPARED:  # the engine's float64 cosine of the unrounded vectors
                cos = [None if np.isnan(c) else float(c) for c in stored[_COMPARED[name]]]
            cols["vector"] += [name] * B
            cols["norm"] += norm
            cols["cosine"] += cos
        echo = _f32(f, TV.MEAN_ECHO)
        cols["vector"] += ["mean_repeat_vs_echo"] * B
        cols["norm"] += np.linalg.norm(echo.astype(np.float64), axis=-1).tolist()
        cols["cosine"] += [None if np.isnan(c) else float(c) for c in stored[Compared.MEAN_REPEAT_VS_ECHO]]
        n_vec = len(vecs) + 1
        cols["boundary"] += list(range(B)) * n_vec
        cols["layer"] += list(range(-1, B - 1)) * n_vec
    return table(_BY_NAME["taskvec_vectors"], lo.d_model, cols)


def _split(lo: Loader) -> pa.Table:
    cols = _empty("taskvec_split")
    f = _vectors(lo)
    if f is not None:
        words = [_str(w) for w in f[TV.WORDS.name][()]]
        held = f[TV.HELD_OUT.name][()]
        cols["word"] = words
        cols["word_index"] = list(range(len(words)))
        cols["split"] = ["held_out" if h else "train" for h in held]
    return table(_BY_NAME["taskvec_split"], lo.d_model, cols)


def _validation(lo: Loader) -> pa.Table:
    cols = _empty("taskvec_validation")
    files: list[tuple[str, str | None, h5py.File]] = []
    if (f := _vectors(lo)) is not None:
        files.append(("vectors", None, f))
    for subset in (AIE_SET, INTERVENTIONS_SET):
        files += [(subset, _str(g.attrs["word"]), g) for _, g in _words(lo, subset)]
    for name, word, f in files:
        for row in f[TQ.VALIDATION.name][()]:
            cols["file"].append(name)
            cols["word"].append(word)
            cols["invariant"].append(_str(row["invariant"]))
            for c in ("max_abs_err", "rel_err", "tolerance"):
                cols[c].append(float(row[c]))
            cols["passed"].append(bool(row["passed"]))
    return table(_BY_NAME["taskvec_validation"], lo.d_model, cols)


KIND = register(ViewKind("taskvec", VIEWS, light={
    "taskvec_interventions": _interventions, "taskvec_clean": _clean, "taskvec_aie": _aie,
    "taskvec_vectors": _vector_rows, "taskvec_split": _split, "taskvec_validation": _validation}))
