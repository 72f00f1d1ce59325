"""Attention-sink views: head norms, norm-weighted attention, the residual's largest values and
the logit lens at position 0 (stored by extract.sinks; README "Attention sinks").

Declared like every other view and registered as the kind ``sinks`` (this module's last
line); the three stored ones are light views read by the loaders below, the two norm-weighted
ones are derived SQL over ``attention`` and ``head_norms``, so DuckDB pushes their filters into
the attention scan. A warehouse extracted before these captures has none of the datasets: its sink views are empty,
never an error.

Norm-weighted attention (Kobayashi et al. 2020) is computed here, not stored: key j's part of
head h's output at query i has norm ``a_ij * ||v_j W_O^h||`` (``value_out_norm``), and its share
is that over the sum across keys j <= i -- the stored pattern and norms suffice (in DOUBLE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from query.columns import (
    BLOCK,
    BOUNDARY,
    HEAD,
    KEY_POS,
    KEY_ROLE,
    POSITION,
    PROMPT,
    QUERY_POS,
    QUERY_ROLE,
    RESID_LAYER,
    ROLE,
    TOKEN_ID,
    TOKEN_TEXT,
    Column,
    K,
    T,
)
from query.registry import View, ViewKind, arrow_schema, register, table
from store import F, M

if TYPE_CHECKING:
    from query.shards import Shards

_FIRST_ROLE = ROLE.doc_as("role of the position (0 = first)")

_NORMED = """
SELECT a.prompt, a.layer, a.head, a.query_pos, a.key_pos, a.query_role, a.key_role, a.weight,
       n.value_out_norm,
       (a.weight::DOUBLE * n.value_out_norm
        / sum(a.weight::DOUBLE * n.value_out_norm) OVER (PARTITION BY a.prompt, a.layer, a.head, a.query_pos))
       ::FLOAT AS norm_share
FROM attention a JOIN head_norms n
  ON n.prompt = a.prompt AND n.layer = a.layer AND n.head = a.head AND n.position = a.key_pos"""

VIEWS: tuple[View, ...] = (
    View("head_norms", "per layer, query head and position: value, value-contribution, key and query norms "
         "(empty for warehouses extracted before these captures)", (
        PROMPT, BLOCK, HEAD,
        Column("kv_group", T.INTEGER, "KV head it reads (GQA): key_norm and value_norm are that head's"),
        POSITION, _FIRST_ROLE,
        Column("value_norm", T.FLOAT, "||v_j||, the value vector at this position"),
        Column("value_out_norm", T.FLOAT, "||v_j W_O^h||: what the head writes per unit of attention on this "
               "position (sandwich norms: times the post-attention gain)"),
        Column("key_norm", T.FLOAT, "||k_j|| (after q/k norm and RoPE, before the score scale)"),
        Column("query_norm", T.FLOAT, "||q_j|| of this head's query at this position"),
    )),
    View("resid_top", "the residual's largest |values| per boundary and position, with their dimensions "
         "and medians (massive activations; empty before these captures)", (
        PROMPT, BOUNDARY, RESID_LAYER, POSITION, _FIRST_ROLE,
        K.doc_as("rank by |value| (0 = largest)"),
        Column("dim", T.INTEGER, "residual dimension"),
        Column("value", T.FLOAT, "its value (signed)"),
        Column("median_abs", T.FLOAT, "median |value| of this position's residual vector"),
        Column("median_abs_all", T.FLOAT, "median |value| of the boundary's whole hidden state, every position "
               "and dimension (Sun et al.'s reference)"),
    )),
    View("lens_first", "logit-lens top-k tokens per layer at position 0 (empty before these captures)", (
        PROMPT, BOUNDARY.doc_as("residual boundary"), RESID_LAYER, K, TOKEN_ID, TOKEN_TEXT,
        Column("logit", T.FLOAT, "logit"),
        Column("prob", T.FLOAT, "softmax probability"),
    )),
    View("attention_norm", "norm-weighted attention in long form, causal entries only: each key's "
         "weight beside its share of the head's output norm (derived from attention and head_norms)", (
        PROMPT, BLOCK, HEAD, QUERY_POS, KEY_POS, QUERY_ROLE, KEY_ROLE,
        Column("weight", T.FLOAT, "attention weight a_ij"),
        Column("value_out_norm", T.FLOAT, "||v_j W_O^h|| of the key"),
        Column("norm_share", T.FLOAT, "a_ij ||v_j W_O^h|| / sum over keys of the same: the key's share of the "
               "head's output norm"),
    ), depends=("attention", "head_norms"), sql=_NORMED),
    View("first_token_share", "per head and query position: attention weight on position 0 beside the share "
         "of the head's output norm that comes from it (norm-weighted attention; derived from attention "
         "and head_norms)", (
        PROMPT, BLOCK, HEAD, QUERY_POS, QUERY_ROLE,
        Column("weight_first", T.FLOAT, "attention weight on position 0, a_i0"),
        Column("norm_share_first", T.FLOAT, "a_i0 ||v_0 W_O^h|| / sum_j a_ij ||v_j W_O^h||: position 0's share "
               "of what the head writes"),
    ), depends=("attention_norm",), sql="""
SELECT prompt, layer, head, query_pos, any_value(query_role) AS query_role,
       max(weight) FILTER (WHERE key_pos = 0) AS weight_first,
       max(norm_share) FILTER (WHERE key_pos = 0) AS norm_share_first
FROM attention_norm GROUP BY prompt, layer, head, query_pos"""),
)
_BY_NAME = {v.name: v for v in VIEWS}


def _collect(parts: dict[str, list], cols: dict[str, Any]) -> None:
    for k, v in cols.items():
        parts.setdefault(k, []).append(np.asarray(v))


def _finish(s: Shards, name: str, parts: dict[str, list]) -> pa.Table:
    view = _BY_NAME[name]
    if not parts:
        return arrow_schema(view, s.d_model).empty_table()
    return table(view, s.d_model, {k: np.concatenate(v) for k, v in parts.items()})


def head_norms(s: Shards) -> pa.Table:
    parts: dict[str, list] = {}
    try:
        kv = np.asarray(s.r.read_model(M.KV_GROUP), np.int64)
    except KeyError:
        kv = np.zeros(s.n_heads, np.int64)
    for p in s.prompts.tolist():
        with s.reading(p):
            if not s.r.has(F.VALUE_NORM, p):
                continue
            arrs = {f.name: s.r.read(f, p) for f in (F.VALUE_NORM, F.VALUE_OUT_NORM, F.KEY_NORM, F.QUERY_NORM)}
        li, hi, ti = (a.reshape(-1) for a in np.indices(arrs["value_norm"].shape))
        _collect(parts, {"prompt": np.full(li.size, p), "layer": li, "head": hi, "kv_group": kv[hi],
                         "position": ti, "role": s.roles(p)[ti],
                         **{k: v.reshape(-1) for k, v in arrs.items()}})
    return _finish(s, "head_norms", parts)


def resid_top(s: Shards) -> pa.Table:
    parts: dict[str, list] = {}
    for p in s.prompts.tolist():
        with s.reading(p):
            if not s.r.has(F.RESID_TOP_VALUES, p):
                continue
            vals = s.r.read(F.RESID_TOP_VALUES, p)  # (B, T, KR)
            dims = s.r.read(F.RESID_TOP_DIMS, p)
            med = s.r.read(F.RESID_MEDIAN_ABS, p)  # (B, T)
            med_all = s.r.read(F.RESID_MEDIAN_ABS_ALL, p)  # (B,)
        bi, ti, ki = (a.reshape(-1) for a in np.indices(vals.shape))
        _collect(parts, {"prompt": np.full(bi.size, p), "boundary": bi, "layer": bi - 1, "position": ti,
                         "role": s.roles(p)[ti], "k": ki, "dim": dims.reshape(-1),
                         "value": vals.reshape(-1), "median_abs": med[bi, ti], "median_abs_all": med_all[bi]})
    return _finish(s, "resid_top", parts)


def lens_first(s: Shards) -> pa.Table:
    parts: dict[str, list] = {}
    for p in s.prompts.tolist():
        with s.reading(p):
            if not s.r.has(F.LENS_FIRST_TOPK_IDS, p):
                continue
            ids = s.r.read(F.LENS_FIRST_TOPK_IDS, p)  # (B, K)
            logits = s.r.read(F.LENS_FIRST_TOPK_LOGITS, p).reshape(-1)
            probs = s.r.read(F.LENS_FIRST_TOPK_PROBS, p).reshape(-1)
        bi, ki = (a.reshape(-1) for a in np.indices(ids.shape))
        _collect(parts, {"prompt": np.full(bi.size, p), "boundary": bi, "layer": bi - 1, "k": ki,
                         "token_id": ids.reshape(-1), "token_text": np.array(s.text(ids.reshape(-1)), dtype=object),
                         "logit": logits, "prob": probs})
    return _finish(s, "lens_first", parts)


KIND = register(ViewKind("sinks", VIEWS, light={"head_norms": head_norms, "resid_top": resid_top,
                                                 "lens_first": lens_first}))
