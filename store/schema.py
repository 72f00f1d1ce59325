"""The warehouse schema: the one contract between extraction, queries and reports.

A warehouse is a directory::

    W/
      manifest.json            run metadata (model, prompt set, config, timings, validation)
      model.h5                 per-model arrays: folded unembedding rows, vocab text, head groups
      prompts/p00000.h5 ...    one immutable shard per prompt (clean-run tensors)
      ablation/p00000.h5 ...   one immutable shard per prompt (ablation results), optional
      shards.sha256            SHA-256 of every committed file, recorded before its rename
      writer.lock              flock'ed by the one running extraction (holder: pid, host, start)

Every shard is written as ``*.partial`` and renamed when complete, so a killed run never
leaves a half-written file under its final name. Every dataset with data is chunked with
HDF5's Fletcher32 checksum and every file uses the HDF5 1.10 format (checksummed metadata);
strings are fixed-length (the global heap of variable-length strings has no checksum), and
scalars are compact (inside the checksummed object header): a flipped byte anywhere a read
looks raises instead of returning a wrong number (``echowh verify`` finds the rest).

Datasets are named by a typed :class:`Field` (never by parsing strings): each field knows
its HDF5 name, its axes and whether it is an activation (stored in ``--store-dtype``).
Axis symbols: L layers, B = L + 1 residual boundaries, T tokens of the prompt, H query
heads, D d_model, K top-k, KR the residual's top-|value| count, N generated tokens, M ablation modes, U ablation units
(H heads, then the attention block, then the MLP block).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

SCHEMA_VERSION = 3
# 2: ablation shards carry a validation dataset (ablation_clean_is_model)
# 3: Fletcher32 on every dataset, HDF5 1.10 format, fixed-length strings, shards.sha256,
#    writer.lock, a manifest "environments" list (one entry per run, resumes included);
#    ablation shards carry the engine's clean reference (clean_top1_id, clean_target_*);
#    the model file carries final_softcap (model families)
WAREHOUSE_KIND = "echo-warehouse"
MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.h5"
PROMPTS_DIR = "prompts"
ABLATION_DIR = "ablation"
PATCHING_DIR = "patching"  # patching/<a>-<b>/pNNNNN.h5: one shard per (template pair, word)
PARTIAL_SUFFIX = ".partial"
LEDGER_NAME = "shards.sha256"
LOCK_NAME = "writer.lock"

# Environment keys a resume must match (else refused unless --allow-env-change): results
# differ across devices, dtypes and library versions in the last bits.
ENV_MUST_MATCH: tuple[str, ...] = ("device", "dtype", "torch", "transformers")

StoreDtype = Literal["float32", "bfloat16", "float16"]


class Role(enum.IntEnum):
    """What a token position is, stored per position as ``position_role``."""

    FIRST = 0  # position 0 (BOS or <|im_start|>): the attention-sink candidate
    TEMPLATE = 1  # chat template, system prompt and instruction text before the word
    WORD = 2  # tokens of the word itself
    SUFFIX = 3  # tokens after the word, before the last position
    LAST = 4  # the last position: where the answer's first token is predicted


class Mode(enum.IntEnum):
    """Ablation mode, the first axis of every ablation dataset."""

    ZERO = 0
    MEAN = 1
    SINK = 2  # attention to position 0 removed, weights renormalised over the other keys
    SINK_NORENORM = 3  # position 0's weight set to 0, not renormalised (= its value contribution removed)


@dataclass(frozen=True)
class Field:
    """One dataset in a shard: name, axes and meaning."""

    name: str
    axes: tuple[str, ...]
    dtype: str  # numpy dtype of the values handed to the writer ("str" = utf-8 text)
    doc: str
    activation: bool = False  # stored in the run's --store-dtype
    optional: bool = False


class F:
    """Fields of a prompt shard (``prompts/pNNNNN.h5``)."""

    INPUT_IDS = Field("input_ids", ("T",), "int32", "token ids of the prompt")
    TOKEN_TEXT = Field("token_text", ("T",), "str", "each token decoded on its own")
    POSITION_ROLE = Field("position_role", ("T",), "int8", "store.schema.Role per position")
    RESID = Field(
        "resid", ("B", "T", "D"), "float32",
        "residual stream at every layer boundary: [0] = embeddings, [l] = input of block l, "
        "[L] = output of the last block (before the final norm)", activation=True,
    )
    ATTN_OUT = Field("attn_out", ("L", "T", "D"), "float32", "attention block output", activation=True)
    MLP_OUT = Field("mlp_out", ("L", "T", "D"), "float32", "MLP block output", activation=True)
    HEAD_OUT = Field(
        "head_out", ("L", "H", "D"), "float32",
        "per-head output at the last position: the head's slice of the o_proj input times its "
        "slice of W_O (o_proj bias excluded)", activation=True,
    )
    HEAD_OUT_ALL = Field(
        "head_out_all", ("L", "T", "H", "D"), "float32",
        "per-head output at every position (only with --head-out-all-positions)",
        activation=True, optional=True,
    )
    ATTN_PATTERN = Field(
        "attn_pattern", ("L", "H", "T", "T"), "float32",
        "attention weights [layer, head, query position, key position]", activation=True,
    )
    LENS_TOPK_IDS = Field("lens_topk_ids", ("B", "K"), "int32", "logit-lens top-k token ids per boundary (last position)")
    LENS_TOPK_LOGITS = Field("lens_topk_logits", ("B", "K"), "float32", "their logits")
    LENS_TOPK_PROBS = Field("lens_topk_probs", ("B", "K"), "float32", "their softmax probabilities")
    LENS_TARGET_LOGIT = Field("lens_target_logit", ("B",), "float32", "target token logit per boundary")
    LENS_TARGET_PROB = Field("lens_target_prob", ("B",), "float32", "target token probability per boundary")
    LENS_TARGET_RANK = Field("lens_target_rank", ("B",), "int32", "target rank per boundary (0 = top-1)")
    FINAL_LOGITS = Field("final_logits", ("V",), "float32", "the model's logits at the last position")
    FINAL_SCALE = Field(
        "final_scale", (), "float32",
        "1/rms of the last residual at the last position: the frozen final-norm scale of DLA",
    )
    DLA_EMBED = Field("dla_embed", (), "float32", "direct logit attribution of the embedding to the target")
    DLA_HEAD = Field("dla_head", ("L", "H"), "float32", "DLA of every head to the target")
    DLA_ATTN_BIAS = Field("dla_attn_bias", ("L",), "float32", "DLA of the o_proj bias (0 without one)")
    DLA_MLP = Field("dla_mlp", ("L",), "float32", "DLA of every MLP to the target")
    GENERATED_IDS = Field("generated_ids", ("N",), "int32", "greedy continuation token ids")
    # Attention-sink captures (extract.stages.capture.sinks); optional: warehouses from before them lack them.
    VALUE_NORM = Field("value_norm", ("L", "H", "T"), "float32",
                       "||v_j||: norm of the value vector head h reads at position j (its KV group's)",
                       optional=True)
    VALUE_OUT_NORM = Field(
        "value_out_norm", ("L", "H", "T"), "float32",
        "||v_j W_O^h||: what head h writes per unit of attention on key j (sandwich norms: times the "
        "post-attention gain g, without the per-query 1/rms scale)", optional=True,
    )
    KEY_NORM = Field("key_norm", ("L", "H", "T"), "float32",
                     "||k_j|| of head h's KV-group key (after q/k norm and RoPE, before the score scale)",
                     optional=True)
    QUERY_NORM = Field("query_norm", ("L", "H", "T"), "float32",
                       "||q_i|| of head h's query (after q/k norm and RoPE, before the score scale)",
                       optional=True)
    RESID_TOP_VALUES = Field("resid_top_values", ("B", "T", "KR"), "float32",
                             "the residual's KR = 8 largest |values| per boundary and position (signed, largest first)",
                             optional=True)
    RESID_TOP_DIMS = Field("resid_top_dims", ("B", "T", "KR"), "int32", "their dimensions", optional=True)
    RESID_MEDIAN_ABS = Field("resid_median_abs", ("B", "T"), "float32",
                             "median |value| of the residual vector at each boundary and position", optional=True)
    RESID_MEDIAN_ABS_ALL = Field(
        "resid_median_abs_all", ("B",), "float32",
        "median |value| of the boundary's whole hidden state (all positions and dimensions; Sun et al. 2024)",
        optional=True,
    )
    LENS_FIRST_TOPK_IDS = Field("lens_first_topk_ids", ("B", "K"), "int32",
                                "logit-lens top-k token ids per boundary at position 0", optional=True)
    LENS_FIRST_TOPK_LOGITS = Field("lens_first_topk_logits", ("B", "K"), "float32", "their logits", optional=True)
    LENS_FIRST_TOPK_PROBS = Field("lens_first_topk_probs", ("B", "K"), "float32",
                                  "their softmax probabilities", optional=True)
    VALIDATION = Field("validation", ("I",), "compound", "invariant checks of this prompt")

    ALL: tuple[Field, ...] = ()  # filled below


F.ALL = tuple(v for v in vars(F).values() if isinstance(v, Field))

# Attributes every prompt shard carries (name -> meaning).
PROMPT_ATTRS: dict[str, str] = {
    "prompt_index": "index of the prompt in the manifest's prompt list",
    "word": "the word",
    "template_index": "index of the template in the manifest",
    "template": "the template text, with {word}",
    "text": "the full prompt text as the model saw it",
    "fingerprint": "the run fingerprint (must match the manifest's)",
    "n_tokens": "number of prompt tokens T",
    "word_start": "first token position of the word",
    "word_end": "one past its last token position (the word may include the LAST position)",
    "target_id": "target token id: first token of the answer as the model writes it",
    "target_text": "target token text",
    "target_form": "which written form of the word the target comes from (word, ' word', Word, ' Word')",
    "word_multi_token": "the chosen written form splits into several tokens",
    "top1_id": "the model's top-1 token at the last position",
    "generation": "greedy continuation text",
    "echo_first_token": "the greedy first token equals the target token",
    "echo_correct": "the continuation starts with the word (any case; quotes and punctuation aside)",
    "echo_exact": "the continuation is the word and nothing else (any case; quotes and punctuation aside)",
}

# The invariants checked on every prompt of every run (README: "Invariants").
INVARIANTS: dict[str, str] = {
    "logits_from_resid": "model logits == final norm(last residual) @ W_U (full vocabulary)",
    "heads_sum_to_attn": "sum of per-head outputs + o_proj bias == attention output (all layers; every stored position)",
    "resid_chain": "resid[l] + attn_out[l] + mlp_out[l] == resid[l+1] (all layers, positions)",
    "dla_sums_to_logit": "embed + head + bias + MLP DLA terms == target logit (frozen final scale)",
    "lens_last_is_logits": "logit lens at the last boundary == model logits (full vocabulary)",
    "ablation_clean_is_model": "the ablation engine's own forward, removing nothing, == model logits "
                               "(full vocabulary; stored in the ablation shard)",
    "patch_clean_is_model": "the patching engine's clean forwards of both prompts == model logits "
                            "(full vocabulary; stored in the patching shard)",
    "patch_nothing_is_dest": "the batched patching grid, patching nothing, == the destination's model logits",
    "patch_embed_all_is_source": "patching the residual at boundary 0 at every position == the source's "
                                 "model logits (prompts of equal length whose positions all align)",
}
VALIDATION_DTYPE = [
    ("invariant", "S32"),
    ("max_abs_err", "<f8"),
    ("rel_err", "<f8"),  # max_abs_err / max(1, max |reference|)
    ("tolerance", "<f8"),
    ("passed", "?"),
]

# Tolerance on rel_err per compute dtype.
TOLERANCE: dict[str, float] = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}


class M:
    """Fields of the model file (``model.h5``)."""

    UNEMBED_IDS = Field("unembed_ids", ("R",), "int32", "token ids of the stored unembedding rows")
    UNEMBED_ROWS = Field(
        "unembed_rows", ("R", "D"), "float32",
        "W_U rows with the final-norm gain folded in: pre-cap logit = final_scale * resid . row",
    )
    FINAL_NORM_WEIGHT = Field("final_norm_weight", ("D",), "float32",
                              "final RMSNorm gain as applied: w, or 1 + w for gemma families")
    KV_GROUP = Field("kv_group", ("H",), "int32", "KV head read by each query head (GQA)")
    VOCAB_TEXT = Field("vocab_text", ("V",), "str", "every token id decoded on its own")

    ALL: tuple[Field, ...] = ()  # filled below


M.ALL = tuple(v for v in vars(M).values() if isinstance(v, Field))

MODEL_ATTRS: dict[str, str] = {
    "model_type": "config.model_type (llama, qwen2, qwen3, mistral, phi3, gemma2, gemma3_text)",
    "n_layers": "L",
    "n_heads": "H (query heads)",
    "n_kv_heads": "KV heads",
    "head_dim": "head dimension",
    "d_model": "D",
    "vocab_size": "V",
    "norm_eps": "final RMSNorm epsilon",
    "final_softcap": "final-logit soft-cap c (logit = c * tanh(pre / c); DLA sums to the pre-cap "
                     "logit); 0 = none",
    "fingerprint": "the run fingerprint (stamped by the writer)",
}


class A:
    """Fields of an ablation shard (``ablation/pNNNNN.h5``); axes (M, L, U[, K]) or () (clean).

    Every ablation number is relative to ONE clean reference: the ablation engine's own forward
    with nothing removed (the ``clean_*`` fields), never the extraction's HF forward (in
    bfloat16 the two differ, so a unit that changes nothing could look like a flip).
    """

    TARGET_LOGIT = Field("target_logit", ("M", "L", "U"), "float32", "target logit after ablation")
    TARGET_PROB = Field("target_prob", ("M", "L", "U"), "float32", "target probability after ablation")
    TARGET_RANK = Field("target_rank", ("M", "L", "U"), "int32", "target rank after ablation (0 = top-1)")
    LOGIT_DIFF = Field("logit_diff", ("M", "L", "U"), "float32",
                       "clean_target_logit minus ablated target logit")
    TOP1_ID = Field("top1_id", ("M", "L", "U"), "int32", "top-1 token after ablation (argmax: the lowest id on a tie)")
    TOP1_PROB = Field("top1_prob", ("M", "L", "U"), "float32", "its probability")
    KL = Field("kl", ("M", "L", "U"), "float32",
               "KL(clean || ablated) over the full vocabulary, nats (clean = the engine's clean logits)")
    TOPK_IDS = Field("topk_ids", ("M", "L", "U", "K"), "int32", "top-k tokens after ablation")
    TOPK_LOGITS = Field("topk_logits", ("M", "L", "U", "K"), "float32", "their logits")
    CLEAN_TOP1_ID = Field("clean_top1_id", (), "int32",
                          "top-1 token of the engine's clean forward (the reference of every flip)")
    CLEAN_TOP1_PROB = Field("clean_top1_prob", (), "float32", "its probability")
    CLEAN_TARGET_LOGIT = Field("clean_target_logit", (), "float32",
                               "target logit of the engine's clean forward (logit_diff's reference)")
    CLEAN_TARGET_PROB = Field("clean_target_prob", (), "float32", "target probability, clean")
    CLEAN_TARGET_RANK = Field("clean_target_rank", (), "int32", "target rank, clean (0 = top-1)")
    VALIDATION = Field("validation", ("I",), "compound",
                       "invariant checks of the ablation run (ablation_clean_is_model)", optional=True)

    ALL: tuple[Field, ...] = ()  # filled below


A.ALL = tuple(v for v in vars(A).values() if isinstance(v, Field))

ABLATION_ATTRS: dict[str, str] = {
    "prompt_index": "index of the prompt",
    "fingerprint": "the run fingerprint",
    "modes": "ablation modes on axis M, e.g. ['zero', 'mean']",
    "positions": "'all' or 'last': where the unit's output was removed",
    "layers": "the layers on axis L (block indices)",
    "n_heads": "units 0..H-1 are heads; unit H is the attention block, H+1 the MLP block (sink modes: "
               "unit H removes key 0 for every head of the layer, H+1 removes nothing)",
}

# Every shard (and model.h5) also carries ``schema_version``, stamped on commit.


def prompt_shard_name(index: int) -> str:
    """File name of a prompt's shard, the same in prompts/ and ablation/."""
    return f"p{index:05d}.h5"


class PatchKind(enum.IntEnum):
    """What a patch puts from the source run into the destination run (``kind`` of a row)."""

    RESID = 0  # residual stream at boundary ``layer`` (0 = embeddings), one position
    ATTN = 1  # attention block's residual contribution of block ``layer``, one position
    MLP = 2  # MLP block's residual contribution, one position
    HEAD = 3  # one head's o_proj-input slice, one position
    HEAD_ALL = 4  # one head's o_proj-input slice at every aligned position where the prompts differ
    RESID_ALL = 5  # the residual at boundary 0 at every aligned differing position (invariant row)
    NOTHING = 6  # nothing patched: the engine's destination run (invariant row)


class PT:
    """Fields of a patching shard (``patching/<a>-<b>/pNNNNN.h5``); Q = patch rows, R = 2 directions.

    Direction 0 patches template a's prompt (source) into template b's (destination): with the
    default pair, "repeat" into "echo" (denoising the echo run); direction 1 is the reverse.
    Metrics are at the destination's last position. The logit difference LD of a direction is
    logit[ld_tokens[r, 0]] - logit[ld_tokens[r, 1]] (see extract.stages.patching.metrics).
    """

    DIRECTION = Field("direction", ("Q",), "int8", "0: template a into b; 1: b into a")
    KIND = Field("kind", ("Q",), "int8", "store.schema.PatchKind")
    LAYER = Field("layer", ("Q",), "int16", "block index; for RESID/RESID_ALL the residual boundary")
    HEAD = Field("head", ("Q",), "int16", "head for HEAD/HEAD_ALL, else -1")
    DST_POS = Field("dst_pos", ("Q",), "int16", "destination position patched (-1: every aligned one)")
    SRC_POS = Field("src_pos", ("Q",), "int16", "source position read (-1: every aligned one)")
    TARGET_LOGIT = Field("target_logit", ("Q",), "float32", "destination target logit after patching")
    TARGET_PROB = Field("target_prob", ("Q",), "float32", "destination target probability after patching")
    LOGIT_DIFF = Field("logit_diff", ("Q",), "float32", "LD after patching")
    RECOVERY = Field("recovery", ("Q",), "float32",
                     "(LD patched - LD destination) / (LD source - LD destination), clean references")
    KL_SOURCE = Field("kl_source", ("Q",), "float32", "KL(source clean || patched), full vocabulary, nats")
    KL_DEST = Field("kl_dest", ("Q",), "float32", "KL(destination clean || patched), nats")
    TOP1_ID = Field("top1_id", ("Q",), "int32", "top-1 token after patching")
    ATTRIBUTION = Field("attribution", ("Q",), "float32",
                        "attribution patching: grad of LD at the destination . (source - destination)")
    DST_TO_SRC = Field("dst_to_src", ("R", "T"), "int16",
                       "per direction and destination position: the aligned source position, -1 "
                       "unpatchable (no counterpart), -2 past the destination's end")
    LD_TOKENS = Field("ld_tokens", ("R", "2"), "int32", "per direction: LD = logit[tok 0] - logit[tok 1]")
    LD_SOURCE = Field("ld_source", ("R",), "float32", "LD of the source's clean run")
    LD_DEST = Field("ld_dest", ("R",), "float32", "LD of the destination's clean run")
    PROMPTS = Field("prompts", ("R", "2"), "int32", "per direction: (source prompt, destination prompt)")
    VALIDATION = Field("validation", ("I",), "compound", "invariant checks of the patching run")


PATCHING_ATTRS: dict[str, str] = {
    "pair": "the template pair 'a-b'",
    "word": "the word",
    "fingerprint": "the run fingerprint",
    "shared_prefix": "leading tokens identical in both prompts: identical activations, never patched",
    "ld_rule": "per direction: 'top1' (source top-1 minus destination top-1) or 'target' (target "
               "minus the destination's strongest other token, when the top-1s agree)",
    "references": "which clean runs the metrics use",
    "embed_all_check": "why patch_embed_all_is_source was or was not checked",
}
