"""The documented views of a warehouse, declared as data: typed columns, shared definitions.

Three kinds of view:

* **light** views are small per prompt and are read whole on first use (``query.light``);
* **heavy** views hold vectors or attention weights for every layer and position. Each is
  one HDF5 dataset per prompt whose leading axes are declared here (:class:`Axis`); one
  generic reader (``query.heavy``) serves them all, reading only the slices that DuckDB's
  pushed-down predicate can select;
* **derived** views are SQL over other views (``emergence``).

The README's view reference is generated from these declarations (``query.catalogue``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import polars as pl
import pyarrow as pa

from store import F, Role
from store.schema import Field

ROLE_NAMES = {int(r): r.name.lower() for r in Role}
SINK_MODES = ("sink", "sink_norenorm")  # ablation modes whose unit H is every head (extract.ablation_grid)


@dataclass(frozen=True)
class Column:
    """One column of a view: its name, its DuckDB type as a user sees it, and what it means."""

    name: str
    type: str  # INTEGER, TINYINT, VARCHAR, BOOLEAN, FLOAT, DOUBLE or FLOAT[D] (D = d_model)
    doc: str

    def doc_as(self, doc: str) -> Column:
        """The same column with another description (one view's wording of a shared column)."""
        return replace(self, doc=doc)


@dataclass(frozen=True)
class Axis:
    """One leading axis of a heavy view's HDF5 dataset (the prompt is the shard, not an axis).

    ``column`` holds the index along the axis. A token axis may also expose each position's
    role (``role``); the residual's boundary axis also exposes ``layer`` = boundary - 1.
    Reads are narrowed on every axis whose ``narrows`` is set; the others are read whole.
    """

    column: str
    role: str | None = None
    minus_one: str | None = None
    narrows: bool = True


@dataclass(frozen=True)
class Heavy:
    """Where a heavy view's rows come from: one dataset per prompt shard.

    The dataset's shape is ``(*axes, D)`` when ``value`` is a vector column (FLOAT[D]) and
    ``(*axes)`` when it is one number per row. ``causal`` names (query, key) axis columns of
    which only the entries with key <= query are rows. ``optional``: a prompt without the
    dataset has no rows (instead of being an error).
    """

    field: Field
    axes: tuple[Axis, ...]
    value: str
    causal: tuple[str, str] | None = None
    optional: bool = False

    @property
    def index_columns(self) -> tuple[str, ...]:
        """The view's integer columns that a predicate can narrow reads on (prompt first)."""
        out = ["prompt"]
        for a in self.axes:
            if a.narrows:
                out += [c for c in (a.column, a.minus_one, a.role) if c]
        return tuple(out)


@dataclass(frozen=True)
class View:
    """One documented view: light unless ``heavy`` is given, derived when ``sql`` is."""

    name: str
    doc: str
    columns: tuple[Column, ...]
    heavy: Heavy | None = None
    depends: tuple[str, ...] = ()  # derived views: the views their SQL reads
    sql: str = ""  # derived views: their SELECT

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


# -- shared column definitions -----------------------------------------------------------------
PROMPT = Column("prompt", "INTEGER", "prompt index")
BOUNDARY = Column("boundary", "INTEGER", "residual boundary (0 = embeddings, l = input of block l, L = last output)")
RESID_LAYER = Column("layer", "INTEGER", "residual after block `layer` (= boundary - 1; -1 = embeddings)")
BLOCK = Column("layer", "INTEGER", "block index")
HEAD = Column("head", "INTEGER", "query head")
POSITION = Column("position", "INTEGER", "token position")
ROLE = Column("role", "TINYINT", "role of the position")
TOKEN_ID = Column("token_id", "INTEGER", "token id")
TOKEN_TEXT = Column("token_text", "VARCHAR", "token text")
K = Column("k", "INTEGER", "rank within the top-k (0 = top-1)")
MODE = Column("mode", "VARCHAR", "'zero', 'mean', 'sink' (attention to position 0 removed, renormalised) or "
              "'sink_norenorm' (position 0's value contribution removed)")
UNIT = (
    Column("unit", "INTEGER", "ablated unit: 0..H-1 heads, H = attention block (sink modes: every head of the "
                              "layer), H+1 = MLP block"),
    Column("head", "INTEGER", "head index (NULL for blocks)"),
    Column("unit_kind", "VARCHAR", "'head', 'attn', 'mlp', or 'all_heads' (sink modes' unit H)"),
)


def _cols(*cols: Column) -> tuple[Column, ...]:
    return tuple(cols)


def columns_from_spec(spec: str) -> tuple[Column, ...]:
    """Columns from ``name TYPE | doc`` lines (the patching and sink view modules keep their
    column tables next to their docs this way)."""
    out = []
    for line in spec.strip().splitlines():
        left, doc = line.split("|", 1)
        name, typ = left.split(None, 1)
        out.append(Column(name.strip(), typ.strip(), doc.strip()))
    return tuple(out)


def _vec(doc: str) -> Column:
    return Column("vec", "FLOAT[D]", doc)


_TOKEN_AXIS = Axis("position", role="role")
# Per block and token position (attn_out, mlp_out, head_out_all): the columns, and the dataset's leading axes.
_BLOCK_POSITION = (PROMPT, BLOCK, POSITION, ROLE)
_BLOCK_POSITION_AXES = (Axis("layer"), _TOKEN_AXIS)

VIEWS: tuple[View, ...] = (
    View("prompts", "one row per prompt: its word, template, target token and the model's answer", _cols(
        PROMPT.doc_as("prompt index (shard number)"),
        Column("word", "VARCHAR", "the word"),
        Column("template_index", "INTEGER", "template number in the manifest"),
        Column("template", "VARCHAR", "template text with {word}"),
        Column("text", "VARCHAR", "full prompt text as the model saw it"),
        Column("n_tokens", "INTEGER", "number of prompt tokens T"),
        Column("word_start", "INTEGER", "first token position of the word"),
        Column("word_end", "INTEGER", "one past the word's last token position (a raw prompt's word is the last token)"),
        Column("target_id", "INTEGER", "target token id (first token of the answer)"),
        Column("target_text", "VARCHAR", "target token text"),
        Column("target_form", "VARCHAR", "written form the target comes from (word, ' word', Word, ' Word')"),
        Column("word_multi_token", "BOOLEAN", "that form splits into several tokens"),
        Column("top1_id", "INTEGER", "the model's top-1 token at the last position"),
        Column("top1_text", "VARCHAR", "its text"),
        Column("target_logit", "FLOAT", "the model's logit of the target at the last position"),
        Column("final_scale", "FLOAT", "frozen final-norm scale (1/rms) used by DLA"),
        Column("generation", "VARCHAR", "greedy continuation text"),
        Column("echo_first_token", "BOOLEAN", "greedy first token == target token"),
        Column("echo_correct", "BOOLEAN", "the continuation starts with the word (any case; quotes, punctuation aside)"),
        Column("echo_exact", "BOOLEAN", "the continuation is the word and nothing else (any case)"),
    )),
    View("tokens", "one row per prompt token", _cols(
        PROMPT, POSITION.doc_as("token position (0 = first)"), TOKEN_ID,
        TOKEN_TEXT.doc_as("token decoded on its own"),
        ROLE.doc_as("store.schema.Role: 0 first, 1 template, 2 word, 3 suffix, 4 last (first and last win)"),
        Column("role_name", "VARCHAR", "'first', 'template', 'word', 'suffix', 'last'"),
        Column("in_word", "BOOLEAN", "the token is part of the word (also when its role is 'last' or 'first')"),
    )),
    View("generations", "the greedy continuation, one row per generated token", _cols(
        PROMPT, Column("step", "INTEGER", "0 = first generated token"), TOKEN_ID, TOKEN_TEXT,
    )),
    View("logit_lens", "target logit, probability and rank under the logit lens at the last position", _cols(
        PROMPT, BOUNDARY, RESID_LAYER,
        Column("target_logit", "FLOAT", "target logit"),
        Column("target_prob", "FLOAT", "target probability"),
        Column("target_rank", "INTEGER", "target rank (0 = top-1)"),
    )),
    View("lens_topk", "logit-lens top-k tokens per layer at the last position", _cols(
        PROMPT, BOUNDARY.doc_as("residual boundary"), RESID_LAYER, K, TOKEN_ID, TOKEN_TEXT,
        Column("logit", "FLOAT", "logit"), Column("prob", "FLOAT", "softmax probability"),
    )),
    View("dla", "direct logit attribution to the target, per component", _cols(
        PROMPT, BLOCK.doc_as("block index (-1 for the embedding)"),
        Column("component", "VARCHAR", "'embed', 'head', 'attn_bias' or 'mlp'"),
        HEAD.doc_as("head index for component 'head', else NULL"),
        Column("dla", "FLOAT", "contribution to the target logit (frozen final scale)"),
    )),
    View("ablation", "per-unit ablation results at the last position (empty when not extracted); every "
         "number is relative to one clean reference, the ablation engine's own clean forward "
         "(clean_* columns), not prompts.top1_id/target_logit (the HF forward; in bfloat16 they differ)", _cols(
        PROMPT, MODE, BLOCK.doc_as("block index of the ablated unit"), *UNIT,
        Column("target_logit", "FLOAT", "target logit after ablation"),
        Column("target_prob", "FLOAT", "target probability after ablation"),
        Column("target_rank", "INTEGER", "target rank after ablation (0 = top-1)"),
        Column("logit_diff", "FLOAT", "clean_target_logit minus ablated target logit (> 0: the unit helped the target)"),
        Column("top1_id", "INTEGER", "top-1 token after ablation"),
        Column("top1_text", "VARCHAR", "its text"),
        Column("top1_prob", "FLOAT", "its probability"),
        Column("kl", "FLOAT", "KL(clean || ablated) with the engine's clean logits, nats"),
        Column("positions", "VARCHAR", "where the unit was removed: 'all' or 'last'"),
        Column("clean_top1_id", "INTEGER", "top-1 token of the engine's clean forward (the reference of top1_changed)"),
        Column("clean_top1_text", "VARCHAR", "its text"),
        Column("clean_target_logit", "FLOAT", "target logit of the engine's clean forward (the reference of logit_diff)"),
        Column("clean_target_prob", "FLOAT", "target probability of the engine's clean forward"),
        Column("clean_target_rank", "INTEGER", "target rank of the engine's clean forward (the reference of rank_change)"),
        Column("top1_changed", "BOOLEAN", "top1_id <> clean_top1_id: the ablation changes the answer"),
        Column("rank_change", "INTEGER", "target_rank - clean_target_rank (> 0: the target fell)"),
    )),
    View("ablation_topk", "top-k tokens after each ablation (empty when not extracted)", _cols(
        PROMPT, MODE, BLOCK, *UNIT, K.doc_as("rank (0 = top-1)"), TOKEN_ID, TOKEN_TEXT,
        Column("logit", "FLOAT", "logit after ablation"),
    )),
    View("validation", "invariant checks per prompt", _cols(
        PROMPT,
        Column("invariant", "VARCHAR", "invariant name (store.schema.INVARIANTS)"),
        Column("max_abs_err", "DOUBLE", "largest absolute error"),
        Column("rel_err", "DOUBLE", "max_abs_err / max(1, max |reference|)"),
        Column("tolerance", "DOUBLE", "allowed rel_err"),
        Column("passed", "BOOLEAN", "rel_err <= tolerance"),
    )),
    View("manifest", "run metadata, one row per top-level manifest key", _cols(
        Column("key", "VARCHAR", "manifest key (model, config, prompts, templates, timings, ...)"),
        Column("value", "VARCHAR", "its value as JSON text (use json_extract on it)"),
    )),
    View("models", "the model of the warehouse, one row (one per warehouse in a comparison)", _cols(
        Column("model", "VARCHAR", "the model's label: the --model it was extracted with (a local path by its last "
               "component) or the LABEL of -w LABEL=DIR; the `model` column of a comparison"),
        Column("model_id", "VARCHAR", "--model as given to the extraction"),
        Column("model_type", "VARCHAR", "architecture family (llama, qwen2, ...)"),
        Column("n_layers", "INTEGER", "blocks L (relative depth of block `layer` = layer / n_layers)"),
        Column("n_heads", "INTEGER", "query heads per block"),
        Column("n_kv_heads", "INTEGER", "key/value heads per block"),
        Column("d_model", "INTEGER", "residual width D"),
        Column("vocab_size", "INTEGER", "vocabulary size"),
        Column("n_prompts", "INTEGER", "finished prompt shards"),
        Column("n_ablated", "INTEGER", "finished ablation shards"),
        Column("schema_version", "INTEGER", "warehouse schema version"),
        Column("warehouse", "VARCHAR", "the warehouse directory"),
    )),
    View("heads", "query heads of the model and the KV head each reads (GQA)", _cols(
        HEAD, Column("kv_group", "INTEGER", "KV head it reads"),
    )),
    View("vocab", "every token id and its text", _cols(TOKEN_ID, TOKEN_TEXT.doc_as("token decoded on its own"))),
    View(
        "emergence", "per prompt, the first layer from which the target stays top-1 to the end",
        _cols(PROMPT, Column("emergence_layer", "INTEGER", "smallest layer with target_rank = 0 at it and every "
                             "later layer; NULL if the final top-1 is not the target")),
        depends=("logit_lens",),
        sql="""
SELECT prompt,
       CASE WHEN max(layer) FILTER (WHERE target_rank <> 0) = max(layer) THEN NULL
            ELSE coalesce(max(layer) FILTER (WHERE target_rank <> 0) + 1, min(layer)) END
       ::INTEGER AS emergence_layer
FROM logit_lens GROUP BY prompt""",
    ),
    View("resid", "residual stream vectors, every boundary and position", _cols(
        PROMPT, BOUNDARY.doc_as("0 = embeddings, l = input of block l, L = last block output"), RESID_LAYER,
        POSITION, ROLE.doc_as("role of the position (4 = last)"), _vec("the residual vector"),
    ), heavy=Heavy(F.RESID, (Axis("boundary", minus_one="layer"), _TOKEN_AXIS), "vec")),
    View("attn_out", "attention block outputs, every layer and position", _cols(
        *_BLOCK_POSITION, _vec("attention block output"),
    ), heavy=Heavy(F.ATTN_OUT, _BLOCK_POSITION_AXES, "vec")),
    View("mlp_out", "MLP block outputs, every layer and position", _cols(
        *_BLOCK_POSITION, _vec("MLP block output"),
    ), heavy=Heavy(F.MLP_OUT, _BLOCK_POSITION_AXES, "vec")),
    View("head_out", "per-head outputs at the last position", _cols(
        PROMPT, BLOCK, HEAD, _vec("the head's output (its o_proj input slice times its W_O slice)"),
    ), heavy=Heavy(F.HEAD_OUT, (Axis("layer"), Axis("head")), "vec")),
    View("head_out_all", "per-head outputs at every position; empty unless extracted with "
         "--head-out-all-positions", _cols(
        *_BLOCK_POSITION, HEAD, _vec("the head's output at that position"),
    ), heavy=Heavy(F.HEAD_OUT_ALL, (*_BLOCK_POSITION_AXES, Axis("head")), "vec", optional=True)),
    View("attention", "attention weights in long form, causal entries only (key_pos <= query_pos)", _cols(
        PROMPT, BLOCK, HEAD,
        Column("query_pos", "INTEGER", "query position"),
        Column("key_pos", "INTEGER", "key position"),
        Column("query_role", "TINYINT", "role of the query position (4 = last)"),
        Column("key_role", "TINYINT", "role of the key position (0 = first)"),
        Column("weight", "FLOAT", "attention weight"),
    ), heavy=Heavy(F.ATTN_PATTERN, (Axis("layer"), Axis("head"), Axis("query_pos", role="query_role"),
                                     Axis("key_pos", role="key_role", narrows=False)),
                   "weight", causal=("query_pos", "key_pos"))),
)
# Activation-patching views live in their own module; they join the catalogue here.
from query import patching_views  # noqa: E402  (needs View and Column above)

VIEWS = VIEWS + patching_views.views()

# The attention-sink views are declared (and their loaders kept) in their own module.
from query import sink_views  # noqa: E402

VIEWS = VIEWS + sink_views.views()
VIEW_BY_NAME: dict[str, View] = {v.name: v for v in VIEWS}

_ARROW: dict[str, pa.DataType] = {
    "INTEGER": pa.int32(), "TINYINT": pa.int8(), "VARCHAR": pa.string(), "BOOLEAN": pa.bool_(),
    "FLOAT": pa.float32(), "DOUBLE": pa.float64(),
}
_POLARS: dict[str, pl.DataType] = {
    "INTEGER": pl.Int32(), "TINYINT": pl.Int8(), "VARCHAR": pl.String(), "BOOLEAN": pl.Boolean(),
    "FLOAT": pl.Float32(), "DOUBLE": pl.Float64(),
}


def arrow_schema(view: View, d_model: int) -> pa.Schema:
    """The view's columns as an Arrow schema (FLOAT[D] = fixed-size list of D float32)."""
    return pa.schema([
        (c.name, pa.list_(pa.float32(), d_model) if c.type == "FLOAT[D]" else _ARROW[c.type])
        for c in view.columns
    ])


def polars_schema(view: View, d_model: int) -> pl.Schema:
    """The view's columns as a Polars schema (FLOAT[D] = Array(Float32, D))."""
    return pl.Schema([
        (c.name, pl.Array(pl.Float32, d_model) if c.type == "FLOAT[D]" else _POLARS[c.type])
        for c in view.columns
    ])
