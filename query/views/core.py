"""The core views: every prompt's capture (prompts, tokens, the logit lens, DLA, ablations,
validation, the model) and its activations (residual stream, block and head outputs,
attention), declared as data and registered as the kind ``core``.

Three kinds of view (``query.registry``):

* **light** views are small per prompt and are read whole on first use (the core ones by
  ``query.light``);
* **heavy** views hold vectors or attention weights for every layer and position. Each is
  one HDF5 dataset per prompt whose leading axes are declared here (:class:`Axis`); one
  generic reader (``query.heavy``) serves them all, reading only the slices that DuckDB's
  pushed-down predicate can select;
* **derived** views are SQL over other views (``emergence``).

The README's view reference is generated from these declarations (``query.catalogue``).
"""

from __future__ import annotations

from query.columns import (
    BLOCK,
    BOUNDARY,
    HEAD,
    INVARIANT_CHECK,
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
    WORD,
    Column,
    K,
    T,
    vec,
)
from query.registry import Axis, Heavy, View, ViewKind, register
from store import F

SINK_MODES = ("sink", "sink_norenorm")  # ablation modes whose unit H is every head (extract.ablation_grid)

MODE = Column("mode", T.VARCHAR, "'zero', 'mean', 'sink' (attention to position 0 removed, renormalised) or "
              "'sink_norenorm' (position 0's value contribution removed)")
UNIT = (
    Column("unit", T.INTEGER, "ablated unit: 0..H-1 heads, H = attention block (sink modes: every head of the "
                              "layer), H+1 = MLP block"),
    Column("head", T.INTEGER, "head index (NULL for blocks)"),
    Column("unit_kind", T.VARCHAR, "'head', 'attn', 'mlp', or 'all_heads' (sink modes' unit H)"),
)


_TOKEN_AXIS = Axis("position", role="role")
# Per block and token position (attn_out, mlp_out, head_out_all): the columns, and the dataset's leading axes.
_BLOCK_POSITION = (PROMPT, BLOCK, POSITION, ROLE)
_BLOCK_POSITION_AXES = (Axis("layer"), _TOKEN_AXIS)

VIEWS: tuple[View, ...] = (
    View("prompts", "one row per prompt: its word, template, target token and the model's answer", (
        PROMPT.doc_as("prompt index (shard number)"),
        WORD,
        Column("template_index", T.INTEGER, "template number in the manifest"),
        Column("template", T.VARCHAR, "template text with {word}"),
        Column("text", T.VARCHAR, "full prompt text as the model saw it"),
        Column("n_tokens", T.INTEGER, "number of prompt tokens T"),
        Column("word_start", T.INTEGER, "first token position of the word"),
        Column("word_end", T.INTEGER, "one past the word's last token position (a raw prompt's word is the last token)"),
        Column("target_id", T.INTEGER, "target token id (first token of the answer)"),
        Column("target_text", T.VARCHAR, "target token text"),
        Column("target_form", T.VARCHAR, "written form the target comes from (word, ' word', Word, ' Word')"),
        Column("word_multi_token", T.BOOLEAN, "that form splits into several tokens"),
        Column("top1_id", T.INTEGER, "the model's top-1 token at the last position"),
        Column("top1_text", T.VARCHAR, "its text"),
        Column("target_logit", T.FLOAT, "the model's logit of the target at the last position"),
        Column("final_scale", T.FLOAT, "frozen final-norm scale (1/rms) used by DLA"),
        Column("generation", T.VARCHAR, "greedy continuation text"),
        Column("echo_first_token", T.BOOLEAN, "greedy first token == target token"),
        Column("echo_correct", T.BOOLEAN, "the continuation starts with the word (any case; quotes, punctuation aside)"),
        Column("echo_exact", T.BOOLEAN, "the continuation is the word and nothing else (any case)"),
    )),
    View("tokens", "one row per prompt token", (
        PROMPT, POSITION.doc_as("token position (0 = first)"), TOKEN_ID,
        TOKEN_TEXT.doc_as("token decoded on its own"),
        ROLE.doc_as("store.schema.Role: 0 first, 1 template, 2 word, 3 suffix, 4 last (first and last win)"),
        Column("role_name", T.VARCHAR, "'first', 'template', 'word', 'suffix', 'last'"),
        Column("in_word", T.BOOLEAN, "the token is part of the word (also when its role is 'last' or 'first')"),
    )),
    View("generations", "the greedy continuation, one row per generated token", (
        PROMPT, Column("step", T.INTEGER, "0 = first generated token"), TOKEN_ID, TOKEN_TEXT,
    )),
    View("logit_lens", "target logit, probability and rank under the logit lens at the last position", (
        PROMPT, BOUNDARY, RESID_LAYER,
        Column("target_logit", T.FLOAT, "target logit"),
        Column("target_prob", T.FLOAT, "target probability"),
        Column("target_rank", T.INTEGER, "target rank (0 = top-1)"),
    )),
    View("lens_topk", "logit-lens top-k tokens per layer at the last position", (
        PROMPT, BOUNDARY.doc_as("residual boundary"), RESID_LAYER, K, TOKEN_ID, TOKEN_TEXT,
        Column("logit", T.FLOAT, "logit"), Column("prob", T.FLOAT, "softmax probability"),
    )),
    View("dla", "direct logit attribution to the target, per component", (
        PROMPT, BLOCK.doc_as("block index (-1 for the embedding)"),
        Column("component", T.VARCHAR, "'embed', 'head', 'attn_bias' or 'mlp'"),
        HEAD.doc_as("head index for component 'head', else NULL"),
        Column("dla", T.FLOAT, "contribution to the target logit (frozen final scale)"),
    )),
    View("ablation", "per-unit ablation results at the last position (empty when not extracted); every "
         "number is relative to one clean reference, the ablation engine's own clean forward "
         "(clean_* columns), not prompts.top1_id/target_logit (the HF forward; in bfloat16 they differ)", (
        PROMPT, MODE, BLOCK.doc_as("block index of the ablated unit"), *UNIT,
        Column("target_logit", T.FLOAT, "target logit after ablation"),
        Column("target_prob", T.FLOAT, "target probability after ablation"),
        Column("target_rank", T.INTEGER, "target rank after ablation (0 = top-1)"),
        Column("logit_diff", T.FLOAT, "clean_target_logit minus ablated target logit (> 0: the unit helped the target)"),
        Column("top1_id", T.INTEGER, "top-1 token after ablation"),
        Column("top1_text", T.VARCHAR, "its text"),
        Column("top1_prob", T.FLOAT, "its probability"),
        Column("kl", T.FLOAT, "KL(clean || ablated) with the engine's clean logits, nats"),
        Column("positions", T.VARCHAR, "where the unit was removed: 'all' or 'last'"),
        Column("clean_top1_id", T.INTEGER, "top-1 token of the engine's clean forward (the reference of top1_changed)"),
        Column("clean_top1_text", T.VARCHAR, "its text"),
        Column("clean_target_logit", T.FLOAT, "target logit of the engine's clean forward (the reference of logit_diff)"),
        Column("clean_target_prob", T.FLOAT, "target probability of the engine's clean forward"),
        Column("clean_target_rank", T.INTEGER, "target rank of the engine's clean forward (the reference of rank_change)"),
        Column("top1_changed", T.BOOLEAN, "top1_id <> clean_top1_id: the ablation changes the answer"),
        Column("rank_change", T.INTEGER, "target_rank - clean_target_rank (> 0: the target fell)"),
    )),
    View("ablation_topk", "top-k tokens after each ablation (empty when not extracted)", (
        PROMPT, MODE, BLOCK, *UNIT, K.doc_as("rank (0 = top-1)"), TOKEN_ID, TOKEN_TEXT,
        Column("logit", T.FLOAT, "logit after ablation"),
    )),
    View("validation", "invariant checks per prompt", (
        PROMPT,
        Column("invariant", T.VARCHAR, "invariant name (store.schema.INVARIANTS)"),
        *INVARIANT_CHECK,
    )),
    View("manifest", "run metadata, one row per top-level manifest key", (
        Column("key", T.VARCHAR, "manifest key (model, config, prompts, templates, timings, ...)"),
        Column("value", T.VARCHAR, "its value as JSON text (use json_extract on it)"),
    )),
    View("models", "the model of the warehouse, one row (one per warehouse in a comparison)", (
        Column("model", T.VARCHAR, "the model's label: the --model it was extracted with (a local path by its last "
               "component) or the LABEL of -w LABEL=DIR; the `model` column of a comparison"),
        Column("model_id", T.VARCHAR, "--model as given to the extraction"),
        Column("model_type", T.VARCHAR, "architecture family (llama, qwen2, ...)"),
        Column("n_layers", T.INTEGER, "blocks L (relative depth of block `layer` = layer / n_layers)"),
        Column("n_heads", T.INTEGER, "query heads per block"),
        Column("n_kv_heads", T.INTEGER, "key/value heads per block"),
        Column("d_model", T.INTEGER, "residual width D"),
        Column("vocab_size", T.INTEGER, "vocabulary size"),
        Column("n_prompts", T.INTEGER, "finished prompt shards"),
        Column("n_ablated", T.INTEGER, "finished ablation shards"),
        Column("schema_version", T.INTEGER, "warehouse schema version"),
        Column("warehouse", T.VARCHAR, "the warehouse directory"),
    )),
    View("heads", "query heads of the model and the KV head each reads (GQA)", (
        HEAD, Column("kv_group", T.INTEGER, "KV head it reads"),
    )),
    View("vocab", "every token id and its text", (TOKEN_ID, TOKEN_TEXT.doc_as("token decoded on its own"))),
    View(
        "emergence", "per prompt, the first layer from which the target stays top-1 to the end",
        (PROMPT, Column("emergence_layer", T.INTEGER, "smallest layer with target_rank = 0 at it and every "
                             "later layer; NULL if the final top-1 is not the target")),
        depends=("logit_lens",),
        sql="""
SELECT prompt,
       CASE WHEN max(layer) FILTER (WHERE target_rank <> 0) = max(layer) THEN NULL
            ELSE coalesce(max(layer) FILTER (WHERE target_rank <> 0) + 1, min(layer)) END
       ::INTEGER AS emergence_layer
FROM logit_lens GROUP BY prompt""",
    ),
    View("resid", "residual stream vectors, every boundary and position", (
        PROMPT, BOUNDARY.doc_as("0 = embeddings, l = input of block l, L = last block output"), RESID_LAYER,
        POSITION, ROLE.doc_as("role of the position (4 = last)"), vec("the residual vector"),
    ), heavy=Heavy(F.RESID, (Axis("boundary", minus_one="layer"), _TOKEN_AXIS), "vec")),
    View("attn_out", "attention block outputs, every layer and position", (
        *_BLOCK_POSITION, vec("attention block output"),
    ), heavy=Heavy(F.ATTN_OUT, _BLOCK_POSITION_AXES, "vec")),
    View("mlp_out", "MLP block outputs, every layer and position", (
        *_BLOCK_POSITION, vec("MLP block output"),
    ), heavy=Heavy(F.MLP_OUT, _BLOCK_POSITION_AXES, "vec")),
    View("head_out", "per-head outputs at the last position", (
        PROMPT, BLOCK, HEAD, vec("the head's output (its o_proj input slice times its W_O slice)"),
    ), heavy=Heavy(F.HEAD_OUT, (Axis("layer"), Axis("head")), "vec")),
    View("head_out_all", "per-head outputs at every position; empty unless extracted with "
         "--head-out-all-positions", (
        *_BLOCK_POSITION, HEAD, vec("the head's output at that position"),
    ), heavy=Heavy(F.HEAD_OUT_ALL, (*_BLOCK_POSITION_AXES, Axis("head")), "vec", optional=True)),
    View("attention", "attention weights in long form, causal entries only (key_pos <= query_pos)", (
        PROMPT, BLOCK, HEAD,
        QUERY_POS, KEY_POS, QUERY_ROLE, KEY_ROLE, Column("weight", T.FLOAT, "attention weight"),
    ), heavy=Heavy(F.ATTN_PATTERN, (Axis("layer"), Axis("head"), Axis("query_pos", role="query_role"),
                                     Axis("key_pos", role="key_role", narrows=False)),
                   "weight", causal=("query_pos", "key_pos"))),
)
KIND = register(ViewKind("core", VIEWS, loaders_in="query.light"))
