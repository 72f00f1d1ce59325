"""The documented views of a warehouse and how each is read from HDF5 into Arrow.

Light views are small per prompt and are materialised whole on first use. Heavy views hold
vectors or attention patterns for every layer and position; they are read only for the
prompts, layers, heads and positions a statement's predicates allow (see ``pushdown``), one
HDF5 chunk (= one layer of one prompt) at a time, and the bytes read are counted so the
benchmark can show what a one-layer query saves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import pyarrow as pa

from query.pushdown import Pred, eval_preds
from store import A, F, M, Role, WarehouseReader
from store.schema import ABLATION_DIR

SINK_MODES = ("sink", "sink_norenorm")  # ablation modes whose unit H is every head (extract.ablation_grid)


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # DuckDB type as a user sees it
    doc: str


@dataclass(frozen=True)
class View:
    name: str
    doc: str
    columns: tuple[Column, ...]
    heavy: bool = False
    pushable: frozenset[str] = frozenset()  # heavy views: columns whose predicates narrow reads
    depends: tuple[str, ...] = ()  # derived (SQL) views: the views they read
    sql: str = ""  # derived views: their SELECT

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


def _c(spec: str) -> tuple[Column, ...]:
    """Columns from ``name TYPE | doc`` lines (one table per view, kept next to its doc)."""
    out = []
    for line in spec.strip().splitlines():
        left, doc = line.split("|", 1)
        name, typ = left.split(None, 1)
        out.append(Column(name.strip(), typ.strip(), doc.strip()))
    return tuple(out)


_LAYER = "layer | residual after block `layer` (= boundary - 1; -1 = embeddings)"
_UNIT = """\
unit INTEGER | ablated unit: 0..H-1 heads, H = attention block (sink modes: every head of the layer), H+1 = MLP block
head INTEGER | head index (NULL for blocks)
unit_kind VARCHAR | 'head', 'attn', 'mlp', or 'all_heads' (sink modes' unit H)"""

VIEWS: tuple[View, ...] = (
    View("prompts", "one row per prompt: its word, template, target token and the model's answer", _c("""
prompt INTEGER | prompt index (shard number)
word VARCHAR | the word
template_index INTEGER | template number in the manifest
template VARCHAR | template text with {word}
text VARCHAR | full prompt text as the model saw it
n_tokens INTEGER | number of prompt tokens T
word_start INTEGER | first token position of the word
word_end INTEGER | one past the word's last token position (a raw prompt's word is the last token)
target_id INTEGER | target token id (first token of the answer)
target_text VARCHAR | target token text
target_form VARCHAR | written form the target comes from (word, ' word', Word, ' Word')
word_multi_token BOOLEAN | that form splits into several tokens
top1_id INTEGER | the model's top-1 token at the last position
top1_text VARCHAR | its text
target_logit FLOAT | the model's logit of the target at the last position
final_scale FLOAT | frozen final-norm scale (1/rms) used by DLA
generation VARCHAR | greedy continuation text
echo_first_token BOOLEAN | greedy first token == target token
echo_correct BOOLEAN | the continuation starts with the word (any case; quotes, punctuation aside)
echo_exact BOOLEAN | the continuation is the word and nothing else (any case)""")),
    View("tokens", "one row per prompt token", _c("""
prompt INTEGER | prompt index
position INTEGER | token position (0 = first)
token_id INTEGER | token id
token_text VARCHAR | token decoded on its own
role TINYINT | store.schema.Role: 0 first, 1 template, 2 word, 3 suffix, 4 last (first and last win)
role_name VARCHAR | 'first', 'template', 'word', 'suffix', 'last'
in_word BOOLEAN | the token is part of the word (also when its role is 'last' or 'first')""")),
    View("generations", "the greedy continuation, one row per generated token", _c("""
prompt INTEGER | prompt index
step INTEGER | 0 = first generated token
token_id INTEGER | token id
token_text VARCHAR | token text""")),
    View("logit_lens", "target logit, probability and rank under the logit lens at the last position", _c(f"""
prompt INTEGER | prompt index
boundary INTEGER | residual boundary (0 = embeddings, l = input of block l, L = last output)
{_LAYER.replace("layer |", "layer INTEGER |")}
target_logit FLOAT | target logit
target_prob FLOAT | target probability
target_rank INTEGER | target rank (0 = top-1)""")),
    View("lens_topk", "logit-lens top-k tokens per layer at the last position", _c(f"""
prompt INTEGER | prompt index
boundary INTEGER | residual boundary
{_LAYER.replace("layer |", "layer INTEGER |")}
k INTEGER | rank within the top-k (0 = top-1)
token_id INTEGER | token id
token_text VARCHAR | token text
logit FLOAT | logit
prob FLOAT | softmax probability""")),
    View("dla", "direct logit attribution to the target, per component", _c("""
prompt INTEGER | prompt index
layer INTEGER | block index (-1 for the embedding)
component VARCHAR | 'embed', 'head', 'attn_bias' or 'mlp'
head INTEGER | head index for component 'head', else NULL
dla FLOAT | contribution to the target logit (frozen final scale)""")),
    View("ablation", "per-unit ablation results at the last position (empty when not extracted)", _c(f"""
prompt INTEGER | prompt index
mode VARCHAR | 'zero', 'mean', 'sink' (attention to position 0 removed, renormalised) or 'sink_norenorm' (position 0's value contribution removed)
layer INTEGER | block index of the ablated unit
{_UNIT}
target_logit FLOAT | target logit after ablation
target_prob FLOAT | target probability after ablation
target_rank INTEGER | target rank after ablation (0 = top-1)
logit_diff FLOAT | clean minus ablated target logit (> 0: the unit helped the target)
top1_id INTEGER | top-1 token after ablation
top1_text VARCHAR | its text
top1_prob FLOAT | its probability
kl FLOAT | KL(clean || ablated), nats
positions VARCHAR | where the unit was removed: 'all' or 'last'""")),
    View("ablation_topk", "top-k tokens after each ablation (empty when not extracted)", _c(f"""
prompt INTEGER | prompt index
mode VARCHAR | 'zero', 'mean', 'sink' or 'sink_norenorm' (see ablation)
layer INTEGER | block index
{_UNIT}
k INTEGER | rank (0 = top-1)
token_id INTEGER | token id
token_text VARCHAR | token text
logit FLOAT | logit after ablation""")),
    View("validation", "invariant checks per prompt", _c("""
prompt INTEGER | prompt index
invariant VARCHAR | invariant name (store.schema.INVARIANTS)
max_abs_err DOUBLE | largest absolute error
rel_err DOUBLE | max_abs_err / max(1, max |reference|)
tolerance DOUBLE | allowed rel_err
passed BOOLEAN | rel_err <= tolerance""")),
    View("manifest", "run metadata, one row per top-level manifest key", _c("""
key VARCHAR | manifest key (model, config, prompts, templates, timings, ...)
value VARCHAR | its value as JSON text (use json_extract on it)""")),
    View("heads", "query heads of the model and the KV head each reads (GQA)", _c("""
head INTEGER | query head
kv_group INTEGER | KV head it reads""")),
    View("vocab", "every token id and its text", _c("""
token_id INTEGER | token id
token_text VARCHAR | token decoded on its own""")),
    View(
        "emergence", "per prompt, the first layer from which the target stays top-1 to the end",
        _c("""
prompt INTEGER | prompt index
emergence_layer INTEGER | smallest layer with target_rank = 0 at it and every later layer; NULL if the final top-1 is not the target"""),
        depends=("logit_lens",),
        sql="""
SELECT prompt,
       CASE WHEN max(layer) FILTER (WHERE target_rank <> 0) = max(layer) THEN NULL
            ELSE coalesce(max(layer) FILTER (WHERE target_rank <> 0) + 1, min(layer)) END
       ::INTEGER AS emergence_layer
FROM logit_lens GROUP BY prompt""",
    ),
    View("resid", "residual stream vectors, every boundary and position", _c(f"""
prompt INTEGER | prompt index
boundary INTEGER | 0 = embeddings, l = input of block l, L = last block output
{_LAYER.replace("layer |", "layer INTEGER |")}
position INTEGER | token position
role TINYINT | role of the position (4 = last)
vec FLOAT[D] | the residual vector"""), heavy=True,
        pushable=frozenset({"prompt", "boundary", "layer", "position", "role"})),
    View("attn_out", "attention block outputs, every layer and position", _c("""
prompt INTEGER | prompt index
layer INTEGER | block index
position INTEGER | token position
role TINYINT | role of the position
vec FLOAT[D] | attention block output"""), heavy=True,
        pushable=frozenset({"prompt", "layer", "position", "role"})),
    View("mlp_out", "MLP block outputs, every layer and position", _c("""
prompt INTEGER | prompt index
layer INTEGER | block index
position INTEGER | token position
role TINYINT | role of the position
vec FLOAT[D] | MLP block output"""), heavy=True,
        pushable=frozenset({"prompt", "layer", "position", "role"})),
    View("head_out", "per-head outputs at the last position", _c("""
prompt INTEGER | prompt index
layer INTEGER | block index
head INTEGER | query head
vec FLOAT[D] | the head's output (its o_proj input slice times its W_O slice)"""), heavy=True,
        pushable=frozenset({"prompt", "layer", "head"})),
    View("head_out_all", "per-head outputs at every position; empty unless extracted with "
         "--head-out-all-positions", _c("""
prompt INTEGER | prompt index
layer INTEGER | block index
position INTEGER | token position
role TINYINT | role of the position
head INTEGER | query head
vec FLOAT[D] | the head's output at that position"""), heavy=True,
        pushable=frozenset({"prompt", "layer", "position", "role", "head"})),
    View("attention", "attention weights in long form, causal entries only (key_pos <= query_pos)", _c("""
prompt INTEGER | prompt index
layer INTEGER | block index
head INTEGER | query head
query_pos INTEGER | query position
key_pos INTEGER | key position
query_role TINYINT | role of the query position (4 = last)
key_role TINYINT | role of the key position (0 = first)
weight FLOAT | attention weight"""), heavy=True,
        pushable=frozenset({"prompt", "layer", "head", "query_pos", "query_role"})),
)
VIEW_BY_NAME: dict[str, View] = {v.name: v for v in VIEWS}
ROLE_NAMES = {int(r): r.name.lower() for r in Role}

_ARROW: dict[str, pa.DataType] = {
    "INTEGER": pa.int32(), "TINYINT": pa.int8(), "VARCHAR": pa.string(), "BOOLEAN": pa.bool_(),
    "FLOAT": pa.float32(), "DOUBLE": pa.float64(),
}


def arrow_schema(view: View, d_model: int) -> pa.Schema:
    return pa.schema([
        (c.name, pa.list_(pa.float32(), d_model) if c.type == "FLOAT[D]" else _ARROW[c.type])
        for c in view.columns
    ])


def _table(view: View, d_model: int, cols: Mapping[str, Any]) -> pa.Table:
    """An Arrow table in the view's exact column order and types."""
    schema = arrow_schema(view, d_model)
    arrays = []
    for f in schema:
        v = cols[f.name]
        if isinstance(f.type, pa.FixedSizeListType):
            flat = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), f.type.list_size))
        else:
            arrays.append(pa.array(v, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _i32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.int32)


def _runs(idx: np.ndarray) -> list[slice]:
    """Contiguous runs of sorted indices as slices (one h5py read each)."""
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [idx.size - 1]])
    return [slice(int(idx[s]), int(idx[e]) + 1) for s, e in zip(starts, ends, strict=True)]


def _sel(idx: np.ndarray, n: int) -> slice | list[int]:
    if idx.size == n:
        return slice(None)
    runs = _runs(idx)
    return runs[0] if len(runs) == 1 else idx.tolist()


class Loader:
    """Reads views from a warehouse; never writes (files are opened read-only by the reader)."""

    def __init__(self, reader: WarehouseReader) -> None:
        self.r = reader
        attrs = reader.model_attrs()
        self.n_layers = int(attrs["n_layers"])
        self.n_heads = int(attrs["n_heads"])
        self.d_model = int(attrs["d_model"])
        self.prompts = np.array(reader.prompt_indices(), dtype=np.int64)
        self.bytes_read = 0
        self._vocab: np.ndarray | None = None
        self._roles: dict[int, np.ndarray] = {}

    # -- helpers ---------------------------------------------------------------------------
    def vocab(self) -> np.ndarray:
        if self._vocab is None:
            try:
                self._vocab = self.r.read_model(M.VOCAB_TEXT)
            except KeyError:
                self._vocab = np.array([], dtype=object)
        return self._vocab

    def text(self, ids: np.ndarray) -> list[str | None]:
        v = self.vocab()
        return [v[i] if 0 <= i < len(v) else None for i in np.asarray(ids).tolist()]

    def word_span(self, p: int, attrs: Mapping[str, Any] | None = None) -> tuple[int, int]:
        """The word's token positions [start, end): stored by the extraction, else its WORD roles."""
        a = self.r.prompt_attrs(p) if attrs is None else attrs
        if a.get("word_start") is not None and a.get("word_end") is not None:
            return int(a["word_start"]), int(a["word_end"])
        pos = np.flatnonzero(self.roles(p) == Role.WORD)
        return (int(pos[0]), int(pos[-1]) + 1) if pos.size else (0, 0)

    def roles(self, p: int) -> np.ndarray:
        if p not in self._roles:
            self._roles[p] = self.r.read(F.POSITION_ROLE, p).astype(np.int8)
        return self._roles[p]

    def _read(self, ds: h5py.Dataset, sel: tuple) -> np.ndarray:
        out = np.asarray(ds.astype("float32")[sel])
        self.bytes_read += out.size * ds.dtype.itemsize
        return out

    def _read_axes(self, ds: h5py.Dataset, first: np.ndarray, *others: np.ndarray | None) -> np.ndarray:
        """Rows ``first`` of axis 0 (run by run: a chunk is one row), ``others`` of the next axes.

        h5py takes at most one index list per read: a second list is read as a slice and
        taken in numpy.
        """
        sels: list[Any] = []
        after: list[tuple[int, np.ndarray]] = []
        for ax, idx in enumerate(others, start=1):
            s = slice(None) if idx is None else _sel(idx, ds.shape[ax])
            if isinstance(s, list) and any(isinstance(x, list) for x in sels):
                after.append((ax, idx))
                s = slice(None)
            sels.append(s)
        runs = [slice(None)] if first.size == ds.shape[0] else _runs(first)
        parts = [self._read(ds, (r, *sels)) for r in runs]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        for ax, idx in after:
            out = np.take(out, idx, axis=ax)
        return out

    # -- light views -----------------------------------------------------------------------
    def load(self, name: str) -> pa.Table:
        return getattr(self, f"_v_{name}")()

    def _v_prompts(self) -> pa.Table:
        rows: dict[str, list] = {c: [] for c in VIEW_BY_NAME["prompts"].names}
        for p in self.prompts.tolist():
            a = self.r.prompt_attrs(p)
            f = self.r.shard(p)
            tid = a.get("target_id")
            rows["prompt"].append(p)
            ws, we = self.word_span(p, a)
            rows["word_start"].append(ws)
            rows["word_end"].append(we)
            for k in ("word", "template_index", "template", "text", "n_tokens", "target_id",
                      "target_text", "target_form", "word_multi_token", "top1_id", "generation",
                      "echo_first_token", "echo_correct", "echo_exact"):
                rows[k].append(a.get(k))
            top = a.get("top1_id")
            rows["top1_text"].append(self.text([top])[0] if top is not None else None)
            logits = f.get(F.FINAL_LOGITS.name)
            rows["target_logit"].append(
                float(logits[int(tid)]) if logits is not None and tid is not None and 0 <= tid < logits.shape[0] else None)
            scale = f.get(F.FINAL_SCALE.name)
            rows["final_scale"].append(float(scale[()]) if scale is not None else None)
        return _table(VIEW_BY_NAME["prompts"], self.d_model, rows)

    def _v_tokens(self) -> pa.Table:
        cols: dict[str, list] = {c: [] for c in VIEW_BY_NAME["tokens"].names}
        for p in self.prompts.tolist():
            ids = self.r.read(F.INPUT_IDS, p)
            text = self.r.read(F.TOKEN_TEXT, p)
            roles = self.roles(p)
            n = len(ids)
            cols["prompt"] += [p] * n
            cols["position"] += list(range(n))
            cols["token_id"] += ids.tolist()
            cols["token_text"] += [str(t) for t in text]
            cols["role"] += roles.tolist()
            cols["role_name"] += [ROLE_NAMES.get(int(r)) for r in roles]
            ws, we = self.word_span(p)
            cols["in_word"] += [ws <= i < we for i in range(n)]
        return _table(VIEW_BY_NAME["tokens"], self.d_model, cols)

    def _v_generations(self) -> pa.Table:
        cols: dict[str, list] = {c: [] for c in VIEW_BY_NAME["generations"].names}
        for p in self.prompts.tolist():
            if not self.r.has(F.GENERATED_IDS, p):
                continue
            ids = self.r.read(F.GENERATED_IDS, p)
            cols["prompt"] += [p] * len(ids)
            cols["step"] += list(range(len(ids)))
            cols["token_id"] += ids.tolist()
            cols["token_text"] += self.text(ids)
        return _table(VIEW_BY_NAME["generations"], self.d_model, cols)

    def _lens(self, fields: Mapping[str, Any], topk: bool) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for p in self.prompts.tolist():
            arrs = {k: self.r.read(f, p) for k, f in fields.items()}
            b, k = next(iter(arrs.values())).shape[0], (next(iter(arrs.values())).shape[1] if topk else 1)
            bnd = np.repeat(np.arange(b), k)
            cols = {"prompt": np.full(b * k, p), "boundary": bnd, "layer": bnd - 1}
            if topk:
                cols["k"] = np.tile(np.arange(k), b)
            cols.update({name: a.reshape(-1) for name, a in arrs.items()})
            for name, a in cols.items():
                parts.setdefault(name, []).append(a)
        names = ["prompt", "boundary", "layer", *(["k"] if topk else []), *fields]
        return {n: (np.concatenate(parts[n]) if parts else np.array([], dtype=np.int64)) for n in names}

    def _v_logit_lens(self) -> pa.Table:
        cols = self._lens({"target_logit": F.LENS_TARGET_LOGIT, "target_prob": F.LENS_TARGET_PROB,
                           "target_rank": F.LENS_TARGET_RANK}, topk=False)
        return _table(VIEW_BY_NAME["logit_lens"], self.d_model, cols)

    def _v_lens_topk(self) -> pa.Table:
        cols: dict[str, Any] = self._lens({"token_id": F.LENS_TOPK_IDS, "logit": F.LENS_TOPK_LOGITS,
                                           "prob": F.LENS_TOPK_PROBS}, topk=True)
        cols["token_text"] = self.text(cols["token_id"])
        return _table(VIEW_BY_NAME["lens_topk"], self.d_model, cols)

    def _v_dla(self) -> pa.Table:
        cols: dict[str, list] = {c: [] for c in VIEW_BY_NAME["dla"].names}

        def add(p: int, layer: list[int], comp: str, head: list, val: np.ndarray) -> None:
            n = len(layer)
            cols["prompt"] += [p] * n
            cols["layer"] += layer
            cols["component"] += [comp] * n
            cols["head"] += head
            cols["dla"] += np.asarray(val, dtype=np.float32).reshape(-1).tolist()

        L, H = self.n_layers, self.n_heads
        for p in self.prompts.tolist():
            add(p, [-1], "embed", [None], np.atleast_1d(self.r.read(F.DLA_EMBED, p)))
            heads = self.r.read(F.DLA_HEAD, p)
            add(p, np.repeat(np.arange(L), H).tolist(), "head", np.tile(np.arange(H), L).tolist(), heads)
            add(p, list(range(L)), "attn_bias", [None] * L, self.r.read(F.DLA_ATTN_BIAS, p))
            add(p, list(range(L)), "mlp", [None] * L, self.r.read(F.DLA_MLP, p))
        return _table(VIEW_BY_NAME["dla"], self.d_model, cols)

    def _ablation(self, topk: bool) -> pa.Table:
        view = VIEW_BY_NAME["ablation_topk" if topk else "ablation"]
        parts: dict[str, list] = {}
        for p in self.r.ablation_indices():
            f = self.r.shard(p, ABLATION_DIR)
            modes = _attr_list(f.attrs.get("modes", []))
            layers = np.asarray(f.attrs.get("layers", []), dtype=np.int64)
            h = int(f.attrs.get("n_heads", self.n_heads))
            positions = _attr_str(f.attrs.get("positions", ""))
            ref = f[A.TARGET_LOGIT.name] if not topk else f[A.TOPK_IDS.name]
            m_n, l_n, u_n = ref.shape[:3]
            k_n = ref.shape[3] if topk else 1
            shape = (m_n, l_n, u_n, k_n)
            mi, li, ui, ki = (a.reshape(-1) for a in np.indices(shape))
            # sink modes: unit H removes key 0 for every head ('all_heads'); unit H+1 removes nothing
            sink = np.isin(np.array(modes + [""] * m_n, dtype=object)[mi], SINK_MODES)
            unit_kind = np.where(ui < h, "head", np.where(ui == h, np.where(sink, "all_heads", "attn"), "mlp"))
            keep = ~(sink & (ui == h + 1))
            cols: dict[str, Any] = {
                "prompt": np.full(mi.size, p),
                "mode": [modes[i] if i < len(modes) else str(i) for i in mi.tolist()],
                "layer": layers[li] if layers.size == l_n else li,
                "unit": ui,
                "head": [u if u < h else None for u in ui.tolist()],
                "unit_kind": unit_kind.tolist(),
            }
            if topk:
                ids = self.r.read(A.TOPK_IDS, p, subdir=ABLATION_DIR).reshape(-1)
                cols.update(k=ki, token_id=ids, token_text=self.text(ids),
                            logit=self.r.read(A.TOPK_LOGITS, p, subdir=ABLATION_DIR).reshape(-1))
            else:
                for fld in (A.TARGET_LOGIT, A.TARGET_PROB, A.TARGET_RANK, A.LOGIT_DIFF, A.TOP1_ID,
                            A.TOP1_PROB, A.KL):
                    cols[fld.name] = self.r.read(fld, p, subdir=ABLATION_DIR).reshape(-1)
                cols["top1_text"] = self.text(cols["top1_id"])
                cols["positions"] = [positions] * mi.size
            for k, v in cols.items():
                v = np.asarray(v, dtype=object if not isinstance(v, np.ndarray) else None)[keep]
                parts.setdefault(k, []).append(list(v) if v.dtype == object else v)
        if not parts:
            return arrow_schema(view, self.d_model).empty_table()
        merged = {k: (np.concatenate(v) if isinstance(v[0], np.ndarray) else sum(v, []))
                  for k, v in parts.items()}
        return _table(view, self.d_model, merged)

    def _v_ablation(self) -> pa.Table:
        return self._ablation(topk=False)

    def _v_ablation_topk(self) -> pa.Table:
        return self._ablation(topk=True)

    def _v_validation(self) -> pa.Table:
        cols: dict[str, list] = {c: [] for c in VIEW_BY_NAME["validation"].names}
        ablated = set(self.r.ablation_indices())
        for p in self.prompts.tolist():
            rows = [self.r.read(F.VALIDATION, p)] if self.r.has(F.VALIDATION, p) else []
            if p in ablated and self.r.has(A.VALIDATION, p, ABLATION_DIR):
                rows.append(self.r.read(A.VALIDATION, p, subdir=ABLATION_DIR))
            if not rows:
                continue
            v = np.concatenate(rows)
            cols["prompt"] += [p] * len(v)
            cols["invariant"] += [_attr_str(x) for x in v["invariant"]]
            for k in ("max_abs_err", "rel_err", "tolerance"):
                cols[k] += v[k].astype(float).tolist()
            cols["passed"] += v["passed"].astype(bool).tolist()
        return _table(VIEW_BY_NAME["validation"], self.d_model, cols)

    def _v_manifest(self) -> pa.Table:
        m = self.r.manifest
        keys = sorted(m)
        return _table(VIEW_BY_NAME["manifest"], self.d_model,
                      {"key": keys, "value": [json.dumps(m[k], sort_keys=True, default=str) for k in keys]})

    def _v_heads(self) -> pa.Table:
        try:
            kv = self.r.read_model(M.KV_GROUP)
        except KeyError:
            kv = np.full(self.n_heads, None)
        return _table(VIEW_BY_NAME["heads"], self.d_model, {"head": np.arange(self.n_heads), "kv_group": list(kv)})

    def _v_vocab(self) -> pa.Table:
        v = self.vocab()
        return _table(VIEW_BY_NAME["vocab"], self.d_model, {"token_id": np.arange(len(v)), "token_text": list(v)})

    # -- heavy views -----------------------------------------------------------------------
    def load_heavy(self, name: str, want: list[dict[str, list[Pred]]]) -> pa.Table:
        """Rows of a heavy view that any of ``want`` (one predicate set per reference) may need."""
        return getattr(self, f"_h_{name}")(want)

    def _mask(self, want: list[dict[str, list[Pred]]], domain: Mapping[str, np.ndarray]) -> np.ndarray:
        """Union over references of the AND of their predicates on this axis' columns."""
        n = len(next(iter(domain.values())))
        out = np.zeros(n, dtype=bool)
        for preds in want:
            m = np.ones(n, dtype=bool)
            for col, values in domain.items():
                if col in preds:
                    m &= eval_preds(preds[col], values)
            out |= m
        return out

    def _prompt_sel(self, want: list[dict[str, list[Pred]]]) -> list[int]:
        return self.prompts[self._mask(want, {"prompt": self.prompts})].tolist()

    def _positions(self, want: list[dict[str, list[Pred]]], p: int, pos: str, role: str) -> np.ndarray:
        roles = self.roles(p)
        return np.flatnonzero(self._mask(want, {pos: np.arange(len(roles)), role: roles}))

    def _vectors(self, name: str, fld: Any, want: list[dict[str, list[Pred]]], boundary: bool) -> pa.Table:
        n0 = self.n_layers + 1 if boundary else self.n_layers
        axis = np.arange(n0)
        dom = {"boundary": axis, "layer": axis - 1} if boundary else {"layer": axis}
        first = np.flatnonzero(self._mask(want, dom))
        parts: dict[str, list[np.ndarray]] = {}
        for p in self._prompt_sel(want):
            pos = self._positions(want, p, "position", "role")
            if first.size == 0 or pos.size == 0:
                continue
            data = self._read_axes(self.r.shard(p)[fld.name], first, pos)  # (nl, nt, D)
            nl, nt = first.size, pos.size
            lay = np.repeat(first, nt)
            cols = {"prompt": np.full(nl * nt, p), "position": np.tile(pos, nl),
                    "role": np.tile(self.roles(p)[pos], nl), "vec": data.reshape(nl * nt, -1)}
            if boundary:
                cols.update(boundary=lay, layer=lay - 1)
            else:
                cols["layer"] = lay
            for k, v in cols.items():
                parts.setdefault(k, []).append(v)
        return self._finish(name, parts)

    def _finish(self, name: str, parts: dict[str, list[np.ndarray]]) -> pa.Table:
        view = VIEW_BY_NAME[name]
        if not parts:
            return arrow_schema(view, self.d_model).empty_table()
        return _table(view, self.d_model, {k: np.concatenate(v) for k, v in parts.items()})

    def _h_resid(self, want: list[dict[str, list[Pred]]]) -> pa.Table:
        return self._vectors("resid", F.RESID, want, boundary=True)

    def _h_attn_out(self, want: list[dict[str, list[Pred]]]) -> pa.Table:
        return self._vectors("attn_out", F.ATTN_OUT, want, boundary=False)

    def _h_mlp_out(self, want: list[dict[str, list[Pred]]]) -> pa.Table:
        return self._vectors("mlp_out", F.MLP_OUT, want, boundary=False)

    def _h_head_out(self, want: list[dict[str, list[Pred]]]) -> pa.Table:
        layers = np.flatnonzero(self._mask(want, {"layer": np.arange(self.n_layers)}))
        heads = np.flatnonzero(self._mask(want, {"head": np.arange(self.n_heads)}))
        parts: dict[str, list[np.ndarray]] = {}
        for p in self._prompt_sel(want):
            if layers.size == 0 or heads.size == 0:
                continue
            data = self._read_axes(self.r.shard(p)[F.HEAD_OUT.name], layers, heads)
            n = layers.size * heads.size
            for k, v in {"prompt": np.full(n, p), "layer": np.repeat(layers, heads.size),
                         "head": np.tile(heads, layers.size), "vec": data.reshape(n, -1)}.items():
                parts.setdefault(k, []).append(v)
        return self._finish("head_out", parts)

    def _h_head_out_all(self, want: list[dict[str, list[Pred]]]) -> pa.Table:
        layers = np.flatnonzero(self._mask(want, {"layer": np.arange(self.n_layers)}))
        heads = np.flatnonzero(self._mask(want, {"head": np.arange(self.n_heads)}))
        parts: dict[str, list[np.ndarray]] = {}
        for p in self._prompt_sel(want):
            if layers.size == 0 or heads.size == 0 or not self.r.has(F.HEAD_OUT_ALL, p):
                continue
            pos = self._positions(want, p, "position", "role")
            if pos.size == 0:
                continue
            data = self._read_axes(self.r.shard(p)[F.HEAD_OUT_ALL.name], layers, pos, heads)  # (l, t, h, D)
            nl, nt, nh = layers.size, pos.size, heads.size
            n = nl * nt * nh
            li, ti, hi = (a.reshape(-1) for a in np.indices((nl, nt, nh)))
            for k, v in {"prompt": np.full(n, p), "layer": layers[li], "position": pos[ti],
                         "role": self.roles(p)[pos][ti], "head": heads[hi], "vec": data.reshape(n, -1)}.items():
                parts.setdefault(k, []).append(v)
        return self._finish("head_out_all", parts)

    def _h_attention(self, want: list[dict[str, list[Pred]]]) -> pa.Table:
        layers = np.flatnonzero(self._mask(want, {"layer": np.arange(self.n_layers)}))
        heads = np.flatnonzero(self._mask(want, {"head": np.arange(self.n_heads)}))
        parts: dict[str, list[np.ndarray]] = {}
        for p in self._prompt_sel(want):
            q = self._positions(want, p, "query_pos", "query_role")
            if layers.size == 0 or heads.size == 0 or q.size == 0:
                continue
            ds = self.r.shard(p)[F.ATTN_PATTERN.name]
            t = ds.shape[-1]
            # (nl, nh, T, T) -> keep the query rows asked for; heads as a slice when contiguous
            data = self._read_axes(ds, layers, heads, q)
            data = data.reshape(layers.size, heads.size, q.size, t)
            causal = np.arange(t)[None, :] <= q[:, None]  # (nq, T)
            qi, ki = np.nonzero(causal)
            nlh = layers.size * heads.size
            roles = self.roles(p)
            w = data.reshape(nlh, q.size, t)[:, qi, ki].reshape(-1)
            n = w.size
            cols = {
                "prompt": np.full(n, p),
                "layer": np.repeat(layers, heads.size * qi.size),
                "head": np.tile(np.repeat(heads, qi.size), layers.size),
                "query_pos": np.tile(q[qi], nlh), "key_pos": np.tile(ki, nlh),
                "query_role": np.tile(roles[q[qi]], nlh), "key_role": np.tile(roles[ki], nlh),
                "weight": w,
            }
            for k, v in cols.items():
                parts.setdefault(k, []).append(v)
        return self._finish("attention", parts)


def _attr_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _attr_list(v: Any) -> list[str]:
    if isinstance(v, (str, bytes)):
        return [_attr_str(v)]
    return [_attr_str(x) for x in np.asarray(v).tolist()]



# The attention-sink views are declared and loaded in their own module (query.sink_views).
from query import sink_views as _sinks  # noqa: E402

VIEWS = VIEWS + _sinks.SINK_VIEWS
VIEW_BY_NAME.update({v.name: v for v in _sinks.SINK_VIEWS})
for _name, _fn in _sinks.LOADERS.items():
    setattr(Loader, _name, _fn)
