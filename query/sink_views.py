"""Attention-sink views: head norms, norm-weighted attention, the residual's largest values and
the logit lens at position 0 (stored by extract.sinks; README "Attention sinks").

Declared like every other view and registered by ``query.views`` (its last lines): the loaders
below become ``Loader._v_<name>`` / ``Loader._h_<name>``. A warehouse extracted before these
captures has none of the datasets: its sink views are empty, never an error.

Norm-weighted attention (Kobayashi et al. 2020) is computed here, not stored: key j's part of
head h's output at query i has norm ``a_ij * ||v_j W_O^h||`` (``value_out_norm``), and its share
is that over the sum across keys j <= i -- the stored pattern and norms suffice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from query.pushdown import Pred
from query.views import Loader, View, _c
from store import F, M

_LAYER = "layer INTEGER | residual after block `layer` (= boundary - 1; -1 = embeddings)"

SINK_VIEWS: tuple[View, ...] = (
    View("head_norms", "per layer, query head and position: value, value-contribution, key and query norms "
         "(empty for warehouses extracted before these captures)", _c("""
prompt INTEGER | prompt index
layer INTEGER | block index
head INTEGER | query head
kv_group INTEGER | KV head it reads (GQA): key_norm and value_norm are that head's
position INTEGER | token position
role TINYINT | role of the position (0 = first)
value_norm FLOAT | ||v_j||, the value vector at this position
value_out_norm FLOAT | ||v_j W_O^h||: what the head writes per unit of attention on this position (sandwich norms: times the post-attention gain)
key_norm FLOAT | ||k_j|| (after q/k norm and RoPE, before the score scale)
query_norm FLOAT | ||q_j|| of this head's query at this position""")),
    View("resid_top", "the residual's largest |values| per boundary and position, with their dimensions "
         "and medians (massive activations; empty before these captures)", _c(f"""
prompt INTEGER | prompt index
boundary INTEGER | residual boundary (0 = embeddings, l = input of block l, L = last output)
{_LAYER}
position INTEGER | token position
role TINYINT | role of the position (0 = first)
k INTEGER | rank by |value| (0 = largest)
dim INTEGER | residual dimension
value FLOAT | its value (signed)
median_abs FLOAT | median |value| of this position's residual vector
median_abs_all FLOAT | median |value| of the boundary's whole hidden state, every position and dimension (Sun et al.'s reference)""")),
    View("lens_first", "logit-lens top-k tokens per layer at position 0 (empty before these captures)", _c(f"""
prompt INTEGER | prompt index
boundary INTEGER | residual boundary
{_LAYER}
k INTEGER | rank within the top-k (0 = top-1)
token_id INTEGER | token id
token_text VARCHAR | token text
logit FLOAT | logit
prob FLOAT | softmax probability""")),
    View("first_token_share", "per head and query position: attention weight on position 0 beside the share "
         "of the head's output norm that comes from it (norm-weighted attention)", _c("""
prompt INTEGER | prompt index
layer INTEGER | block index
head INTEGER | query head
query_pos INTEGER | query position
query_role TINYINT | role of the query position (4 = last)
weight_first FLOAT | attention weight on position 0, a_i0
norm_share_first FLOAT | a_i0 ||v_0 W_O^h|| / sum_j a_ij ||v_j W_O^h||: position 0's share of what the head writes"""),
        heavy=True, pushable=frozenset({"prompt", "layer", "head", "query_pos", "query_role"})),
    View("attention_norm", "norm-weighted attention in long form, causal entries only: each key's "
         "weight beside its share of the head's output norm", _c("""
prompt INTEGER | prompt index
layer INTEGER | block index
head INTEGER | query head
query_pos INTEGER | query position
key_pos INTEGER | key position
query_role TINYINT | role of the query position (4 = last)
key_role TINYINT | role of the key position (0 = first)
weight FLOAT | attention weight a_ij
value_out_norm FLOAT | ||v_j W_O^h|| of the key
norm_share FLOAT | a_ij ||v_j W_O^h|| / sum over keys of the same: the key's share of the head's output norm"""),
        heavy=True, pushable=frozenset({"prompt", "layer", "head", "query_pos", "query_role"})),
)


def _collect(parts: dict[str, list], cols: dict[str, Any]) -> None:
    for k, v in cols.items():
        parts.setdefault(k, []).append(np.asarray(v))


def _v_head_norms(self: Loader) -> pa.Table:
    parts: dict[str, list] = {}
    try:
        kv = np.asarray(self.r.read_model(M.KV_GROUP), np.int64)
    except KeyError:
        kv = np.zeros(self.n_heads, np.int64)
    for p in self.prompts.tolist():
        if not self.r.has(F.VALUE_NORM, p):
            continue
        arrs = {f.name: self.r.read(f, p) for f in (F.VALUE_NORM, F.VALUE_OUT_NORM, F.KEY_NORM, F.QUERY_NORM)}
        li, hi, ti = (a.reshape(-1) for a in np.indices(arrs["value_norm"].shape))
        _collect(parts, {"prompt": np.full(li.size, p), "layer": li, "head": hi, "kv_group": kv[hi],
                         "position": ti, "role": self.roles(p)[ti],
                         **{k: v.reshape(-1) for k, v in arrs.items()}})
    return self._finish("head_norms", parts)


def _v_resid_top(self: Loader) -> pa.Table:
    parts: dict[str, list] = {}
    for p in self.prompts.tolist():
        if not self.r.has(F.RESID_TOP_VALUES, p):
            continue
        vals = self.r.read(F.RESID_TOP_VALUES, p)  # (B, T, KR)
        dims = self.r.read(F.RESID_TOP_DIMS, p)
        med = self.r.read(F.RESID_MEDIAN_ABS, p)  # (B, T)
        med_all = self.r.read(F.RESID_MEDIAN_ABS_ALL, p)  # (B,)
        bi, ti, ki = (a.reshape(-1) for a in np.indices(vals.shape))
        _collect(parts, {"prompt": np.full(bi.size, p), "boundary": bi, "layer": bi - 1, "position": ti,
                         "role": self.roles(p)[ti], "k": ki, "dim": dims.reshape(-1),
                         "value": vals.reshape(-1), "median_abs": med[bi, ti], "median_abs_all": med_all[bi]})
    return self._finish("resid_top", parts)


def _v_lens_first(self: Loader) -> pa.Table:
    parts: dict[str, list] = {}
    for p in self.prompts.tolist():
        if not self.r.has(F.LENS_FIRST_TOPK_IDS, p):
            continue
        ids = self.r.read(F.LENS_FIRST_TOPK_IDS, p)  # (B, K)
        bi, ki = (a.reshape(-1) for a in np.indices(ids.shape))
        _collect(parts, {"prompt": np.full(bi.size, p), "boundary": bi, "layer": bi - 1, "k": ki,
                         "token_id": ids.reshape(-1), "token_text": np.array(self.text(ids.reshape(-1)), dtype=object),
                         "logit": self.r.read(F.LENS_FIRST_TOPK_LOGITS, p).reshape(-1),
                         "prob": self.r.read(F.LENS_FIRST_TOPK_PROBS, p).reshape(-1)})
    return self._finish("lens_first", parts)


def _norm_weighted(self: Loader, want: list[dict[str, list[Pred]]], p: int):
    """(layers, heads, queries, weights a_ij (nl, nh, nq, T), norms n_j (nl, nh, T),
    contributions a_ij n_j (nl, nh, nq, T) in float64), or None when nothing is selected."""
    layers = np.flatnonzero(self._mask(want, {"layer": np.arange(self.n_layers)}))
    heads = np.flatnonzero(self._mask(want, {"head": np.arange(self.n_heads)}))
    q = self._positions(want, p, "query_pos", "query_role")
    if layers.size == 0 or heads.size == 0 or q.size == 0 or not self.r.has(F.VALUE_OUT_NORM, p):
        return None
    shard = self.r.shard(p)
    w = self._read_axes(shard[F.ATTN_PATTERN.name], layers, heads, q)
    w = w.reshape(layers.size, heads.size, q.size, -1)  # (nl, nh, nq, T)
    n = self._read_axes(shard[F.VALUE_OUT_NORM.name], layers, heads)  # (nl, nh, T)
    contrib = w.astype(np.float64) * n[:, :, None, :]
    return layers, heads, q, w, n, contrib


def _h_first_token_share(self: Loader, want: list[dict[str, list[Pred]]]) -> pa.Table:
    parts: dict[str, list] = {}
    for p in self._prompt_sel(want):
        got = _norm_weighted(self, want, p)
        if got is None:
            continue
        layers, heads, q, w, _, contrib = got
        tot = contrib.sum(-1)
        share = np.divide(contrib[..., 0], tot, out=np.full(tot.shape, np.nan), where=tot > 0)
        li, hi, qi = (a.reshape(-1) for a in np.indices(tot.shape))
        _collect(parts, {"prompt": np.full(li.size, p), "layer": layers[li], "head": heads[hi],
                         "query_pos": q[qi], "query_role": self.roles(p)[q[qi]],
                         "weight_first": w[..., 0].reshape(-1), "norm_share_first": share.reshape(-1)})
    return self._finish("first_token_share", parts)


def _h_attention_norm(self: Loader, want: list[dict[str, list[Pred]]]) -> pa.Table:
    parts: dict[str, list] = {}
    for p in self._prompt_sel(want):
        got = _norm_weighted(self, want, p)
        if got is None:
            continue
        layers, heads, q, w, n, contrib = got
        t = w.shape[-1]
        tot = contrib.sum(-1, keepdims=True)
        share = np.divide(contrib, tot, out=np.full(contrib.shape, np.nan), where=tot > 0)
        causal = np.arange(t)[None, :] <= q[:, None]  # (nq, T)
        qi, ki = np.nonzero(causal)
        nlh = layers.size * heads.size
        roles = self.roles(p)
        _collect(parts, {
            "prompt": np.full(nlh * qi.size, p),
            "layer": np.repeat(layers, heads.size * qi.size),
            "head": np.tile(np.repeat(heads, qi.size), layers.size),
            "query_pos": np.tile(q[qi], nlh), "key_pos": np.tile(ki, nlh),
            "query_role": np.tile(roles[q[qi]], nlh), "key_role": np.tile(roles[ki], nlh),
            "weight": w.reshape(nlh, q.size, t)[:, qi, ki].reshape(-1),
            "value_out_norm": n.reshape(nlh, t)[:, ki].reshape(-1),
            "norm_share": share.reshape(nlh, q.size, t)[:, qi, ki].reshape(-1),
        })
    return self._finish("attention_norm", parts)


LOADERS = {
    "_v_head_norms": _v_head_norms,
    "_v_resid_top": _v_resid_top,
    "_v_lens_first": _v_lens_first,
    "_h_first_token_share": _h_first_token_share,
    "_h_attention_norm": _h_attention_norm,
}
