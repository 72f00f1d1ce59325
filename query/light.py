"""Light views: small per prompt, each read whole from the shards into one Arrow table."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from query.shards import Shards
from query.views import LOADERS, ROLE_NAMES, SINK_MODES, VIEW_BY_NAME, arrow_schema, table
from store import A, F, M
from store.schema import ABLATION_DIR


def _empty(name: str) -> dict[str, list]:
    return {c: [] for c in VIEW_BY_NAME[name].names}


def _prompts(s: Shards) -> pa.Table:
    rows = _empty("prompts")
    for p in s.prompts.tolist():
        with s.reading(p):
            a = s.r.prompt_attrs(p)
            # both datasets are required: a missing or damaged one raises, naming the shard
            logits = s.r.read(F.FINAL_LOGITS, p)  # (V,)
            tid = a.get("target_id")
            ok = tid is not None and 0 <= tid < logits.shape[0]
            rows["target_logit"].append(float(logits[int(tid)]) if ok else None)
            rows["final_scale"].append(float(s.r.read(F.FINAL_SCALE, p)[()]))
        rows["prompt"].append(p)
        ws, we = s.word_span(p, a)
        rows["word_start"].append(ws)
        rows["word_end"].append(we)
        for k in ("word", "template_index", "template", "text", "n_tokens", "target_id", "target_text",
                  "target_form", "word_multi_token", "top1_id", "generation", "echo_first_token",
                  "echo_correct", "echo_exact"):
            rows[k].append(a.get(k))
        top = a.get("top1_id")
        rows["top1_text"].append(s.text([top])[0] if top is not None else None)
    return table(VIEW_BY_NAME["prompts"], s.d_model, rows)


def _tokens(s: Shards) -> pa.Table:
    cols = _empty("tokens")
    for p in s.prompts.tolist():
        with s.reading(p):
            ids = s.r.read(F.INPUT_IDS, p)
            text = s.r.read(F.TOKEN_TEXT, p)
        roles = s.roles(p)
        n = len(ids)
        ws, we = s.word_span(p)
        cols["prompt"] += [p] * n
        cols["position"] += list(range(n))
        cols["token_id"] += ids.tolist()
        cols["token_text"] += [str(t) for t in text]
        cols["role"] += roles.tolist()
        cols["role_name"] += [ROLE_NAMES.get(int(r)) for r in roles]
        cols["in_word"] += [ws <= i < we for i in range(n)]
    return table(VIEW_BY_NAME["tokens"], s.d_model, cols)


def _generations(s: Shards) -> pa.Table:
    cols = _empty("generations")
    for p in s.prompts.tolist():
        with s.reading(p):
            if not s.r.has(F.GENERATED_IDS, p):
                continue
            ids = s.r.read(F.GENERATED_IDS, p)
        cols["prompt"] += [p] * len(ids)
        cols["step"] += list(range(len(ids)))
        cols["token_id"] += ids.tolist()
        cols["token_text"] += s.text(ids)
    return table(VIEW_BY_NAME["generations"], s.d_model, cols)


def _lens(s: Shards, fields: Mapping[str, Any], topk: bool) -> dict[str, np.ndarray]:
    """Per-boundary lens arrays (B,) or (B, K) of every prompt as long columns."""
    parts: dict[str, list[np.ndarray]] = {}
    for p in s.prompts.tolist():
        with s.reading(p):
            arrs = {k: s.r.read(f, p) for k, f in fields.items()}
        first = next(iter(arrs.values()))
        b, k = first.shape[0], (first.shape[1] if topk else 1)
        bnd = np.repeat(np.arange(b), k)
        cols = {"prompt": np.full(b * k, p), "boundary": bnd, "layer": bnd - 1}
        if topk:
            cols["k"] = np.tile(np.arange(k), b)
        cols.update({name: a.reshape(-1) for name, a in arrs.items()})
        for name, a in cols.items():
            parts.setdefault(name, []).append(a)
    names = ["prompt", "boundary", "layer", *(["k"] if topk else []), *fields]
    return {n: (np.concatenate(parts[n]) if parts else np.array([], dtype=np.int64)) for n in names}


def _logit_lens(s: Shards) -> pa.Table:
    cols = _lens(s, {"target_logit": F.LENS_TARGET_LOGIT, "target_prob": F.LENS_TARGET_PROB,
                     "target_rank": F.LENS_TARGET_RANK}, topk=False)
    return table(VIEW_BY_NAME["logit_lens"], s.d_model, cols)


def _lens_topk(s: Shards) -> pa.Table:
    cols: dict[str, Any] = _lens(s, {"token_id": F.LENS_TOPK_IDS, "logit": F.LENS_TOPK_LOGITS,
                                     "prob": F.LENS_TOPK_PROBS}, topk=True)
    cols["token_text"] = s.text(cols["token_id"])
    return table(VIEW_BY_NAME["lens_topk"], s.d_model, cols)


def _dla(s: Shards) -> pa.Table:
    cols = _empty("dla")

    def add(p: int, layer: list[int], comp: str, head: list, val: np.ndarray) -> None:
        n = len(layer)
        cols["prompt"] += [p] * n
        cols["layer"] += layer
        cols["component"] += [comp] * n
        cols["head"] += head
        cols["dla"] += np.asarray(val, dtype=np.float32).reshape(-1).tolist()

    L, H = s.n_layers, s.n_heads
    for p in s.prompts.tolist():
        with s.reading(p):
            embed = np.atleast_1d(s.r.read(F.DLA_EMBED, p))
            heads = s.r.read(F.DLA_HEAD, p)
            bias = s.r.read(F.DLA_ATTN_BIAS, p)
            mlp = s.r.read(F.DLA_MLP, p)
        add(p, [-1], "embed", [None], embed)
        add(p, np.repeat(np.arange(L), H).tolist(), "head", np.tile(np.arange(H), L).tolist(), heads)
        add(p, list(range(L)), "attn_bias", [None] * L, bias)
        add(p, list(range(L)), "mlp", [None] * L, mlp)
    return table(VIEW_BY_NAME["dla"], s.d_model, cols)


def ablation_shard_columns(s: Shards, p: int, topk: bool) -> dict[str, Any]:
    """Prompt ``p``'s ablation shard, its grid (M, L', U[, K]) as long columns by name.

    The columns are the ``ablation_topk`` view's when ``topk``, else the ``ablation`` view's;
    :func:`table` turns them into that view's Arrow table. The sink modes' unit H+1 (nothing
    removed) is dropped. Read failures are the caller's to wrap (``s.reading``). Used by the
    ``ablation`` views here and by ``query.export``, which exports one prompt at a time.
    """
    f = s.r.shard(p, ABLATION_DIR)
    modes = _attr_list(f.attrs.get("modes", []))
    layers = np.asarray(f.attrs.get("layers", []), dtype=np.int64)
    h = int(f.attrs.get("n_heads", s.n_heads))
    positions = _attr_str(f.attrs.get("positions", ""))
    ref = f[A.TOPK_IDS.name] if topk else f[A.TARGET_LOGIT.name]
    m_n, l_n, u_n = ref.shape[:3]
    k_n = ref.shape[3] if topk else 1
    mi, li, ui, ki = (a.reshape(-1) for a in np.indices((m_n, l_n, u_n, k_n)))
    # sink modes: unit H removes key 0 for every head ('all_heads'); unit H+1 removes nothing (dropped)
    sink = np.isin(np.array(modes + [""] * m_n, dtype=object)[mi], SINK_MODES)
    cols: dict[str, Any] = {
        "prompt": np.full(mi.size, p),
        "mode": [modes[i] if i < len(modes) else str(i) for i in mi.tolist()],
        "layer": layers[li] if layers.size == l_n else li,
        "unit": ui,
        "head": [u if u < h else None for u in ui.tolist()],
        "unit_kind": np.where(ui < h, "head", np.where(ui == h, np.where(sink, "all_heads", "attn"), "mlp")).tolist(),
    }
    if topk:
        ids = s.r.read(A.TOPK_IDS, p, subdir=ABLATION_DIR).reshape(-1)
        cols.update(k=ki, token_id=ids, token_text=s.text(ids),
                    logit=s.r.read(A.TOPK_LOGITS, p, subdir=ABLATION_DIR).reshape(-1))
    else:
        for fld in (A.TARGET_LOGIT, A.TARGET_PROB, A.TARGET_RANK, A.LOGIT_DIFF, A.TOP1_ID, A.TOP1_PROB, A.KL):
            cols[fld.name] = s.r.read(fld, p, subdir=ABLATION_DIR).reshape(-1)
        cols["top1_text"] = s.text(cols["top1_id"])
        cols["positions"] = [positions] * mi.size
        for fld in (A.CLEAN_TOP1_ID, A.CLEAN_TARGET_LOGIT, A.CLEAN_TARGET_PROB, A.CLEAN_TARGET_RANK):
            cols[fld.name] = np.full(mi.size, s.r.read(fld, p, subdir=ABLATION_DIR)[()])
        cols["clean_top1_text"] = s.text(cols["clean_top1_id"])
        cols["top1_changed"] = cols["top1_id"] != cols["clean_top1_id"]
        cols["rank_change"] = cols["target_rank"] - cols["clean_target_rank"]
    keep = ~(sink & (ui == h + 1))
    if not keep.all():
        cols = {k: (v[keep] if isinstance(v, np.ndarray) else [x for x, k_ in zip(v, keep, strict=True) if k_])
                for k, v in cols.items()}
    return cols


def _ablation(s: Shards, topk: bool) -> pa.Table:
    view = VIEW_BY_NAME["ablation_topk" if topk else "ablation"]
    parts: dict[str, list] = {}
    for p in s.r.ablation_indices():
        with s.reading(p, ABLATION_DIR):
            cols = ablation_shard_columns(s, p, topk)
        for k, v in cols.items():
            parts.setdefault(k, []).append(v if isinstance(v, np.ndarray) else list(v))
    if not parts:
        return arrow_schema(view, s.d_model).empty_table()
    merged = {k: (np.concatenate(v) if isinstance(v[0], np.ndarray) else sum(v, [])) for k, v in parts.items()}
    return table(view, s.d_model, merged)


def _validation(s: Shards) -> pa.Table:
    cols = _empty("validation")
    ablated = set(s.r.ablation_indices())
    for p in s.prompts.tolist():
        with s.reading(p):
            rows = [s.r.read(F.VALIDATION, p)] if s.r.has(F.VALIDATION, p) else []
        if p in ablated:
            with s.reading(p, ABLATION_DIR):
                if s.r.has(A.VALIDATION, p, ABLATION_DIR):
                    rows.append(s.r.read(A.VALIDATION, p, subdir=ABLATION_DIR))
        if not rows:
            continue
        v = np.concatenate(rows)
        cols["prompt"] += [p] * len(v)
        cols["invariant"] += [_attr_str(x) for x in v["invariant"]]
        for k in ("max_abs_err", "rel_err", "tolerance"):
            cols[k] += v[k].astype(float).tolist()
        cols["passed"] += v["passed"].astype(bool).tolist()
    return table(VIEW_BY_NAME["validation"], s.d_model, cols)


def _manifest(s: Shards) -> pa.Table:
    m = s.r.manifest
    keys = sorted(m)
    return table(VIEW_BY_NAME["manifest"], s.d_model,
                 {"key": keys, "value": [json.dumps(m[k], sort_keys=True, default=str) for k in keys]})


def _models(s: Shards) -> pa.Table:
    m, a = s.r.manifest, s.model_attrs
    model = m.get("model") if isinstance(m.get("model"), dict) else {}
    return table(VIEW_BY_NAME["models"], s.d_model, {
        "model": [s.label], "model_id": [str(model.get("model") or model.get("id") or "")],
        "model_type": [a.get("model_type")], "n_layers": [s.n_layers], "n_heads": [s.n_heads],
        "n_kv_heads": [a.get("n_kv_heads")], "d_model": [s.d_model], "vocab_size": [a.get("vocab_size")],
        "n_prompts": [len(s.prompts)], "n_ablated": [len(s.r.ablation_indices())],
        "schema_version": [m.get("schema_version")], "warehouse": [str(s.r.root)],
    })


def _heads(s: Shards) -> pa.Table:
    with s.reading():
        try:
            kv = s.r.read_model(M.KV_GROUP)
        except KeyError:
            kv = np.full(s.n_heads, None)
    return table(VIEW_BY_NAME["heads"], s.d_model, {"head": np.arange(s.n_heads), "kv_group": list(kv)})


def _vocab(s: Shards) -> pa.Table:
    v = s.vocab()
    return table(VIEW_BY_NAME["vocab"], s.d_model, {"token_id": np.arange(len(v)), "token_text": list(v)})


def _attr_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _attr_list(v: Any) -> list[str]:
    if isinstance(v, str | bytes):
        return [_attr_str(v)]
    return [_attr_str(x) for x in np.asarray(v).tolist()]


LIGHT: dict[str, Callable[[Shards], pa.Table]] = {
    "prompts": _prompts, "tokens": _tokens, "generations": _generations, "logit_lens": _logit_lens,
    "lens_topk": _lens_topk, "dla": _dla, "ablation": lambda s: _ablation(s, topk=False),
    "ablation_topk": lambda s: _ablation(s, topk=True), "validation": _validation, "manifest": _manifest, "models": _models,
    "heads": _heads, "vocab": _vocab,
}

# The light views of every other kind, registered with their declarations (query.registry).
LIGHT.update(LOADERS)
