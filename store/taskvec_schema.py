"""Schema of the task-vector study (issue 18; every number defined in docs/specs/taskvec.md).

Proposed layout inside a warehouse::

    W/taskvec/vectors.h5            the split, every vector built from TRAIN words (TV, SV, head
                                    means), the AIE table and FV_k, the cosines (class TV)
    W/taskvec/aie/wNNNNN.h5         per HELD-OUT word: the AIE rows (one per head) on its
                                    shuffled prompt (class TQ, method HEAD_MEAN)
    W/taskvec/interventions/wNNNNN.h5
                                    per HELD-OUT word: every other intervention row (task vector,
                                    function vector, steering, self-patch) and the clean
                                    reference of each prompt kind (class TQ)

NNNNN is the word's index in the study's word list (so a shard names its word without a
lookup). One shard per held-out word is the resumable unit: the AIE set must be complete before
FV_k (the top-k heads by AIE over all held-out words) exists, so a run writes aie/ first, then
vectors.h5, then interventions/. Every shard carries a ``validation`` array (store.schema's
VALIDATION_DTYPE) of the invariants in ``TV_INVARIANTS``.

Axis symbols: B = L + 1 residual boundaries (b = 0 embeddings, b = l input of block l, b = L
output of the last block, before the final norm), L layers, H query heads, D d_model, hd head
dim, W words of the list, S source kinds of a task vector (0 demo, 1 repeat), KF function-vector
sizes (k in 5, 10, 20), CV compared vectors (``Compared``), Q intervention rows, P prompt kinds
of a word (``Kind``), I invariants.
"""

from __future__ import annotations

import enum

from store.schema import Field

TASKVEC_DIR = "taskvec"
VECTORS_FILE = "vectors.h5"
AIE_SET = "aie"
INTERVENTIONS_SET = "interventions"


def word_shard_name(index: int) -> str:
    """File name of a held-out word's shard: the word's index in the study's word list."""
    return f"w{index:05d}.h5"


class Kind(enum.IntEnum):
    """A prompt kind of the study (extract.stages.taskvec.prompts)."""

    DEMO = 0  # n demonstrations "w -> w", then "x ->"
    ZERO_SHOT = 1  # "x ->"
    SHUFFLED = 2  # demonstrations with labels rotated by one
    REPEAT = 3  # "repeat the following word: x"
    ECHO = 4  # "echo the following word: x"
    NEUTRAL = 5  # "the following word: x"


class Method(enum.IntEnum):
    """What an intervention row does (``method`` of a row)."""

    SELF_PATCH = 0  # resid[b] at the positions set to the prompt's own value (invariant row)
    TASK_VECTOR = 1  # resid[b] at the last position set to TV_S[b]
    FUNCTION_VECTOR = 2  # FV_k added to resid[b] at the last position
    STEER = 3  # c * SV[b] added (echo prompts), -c * SV[b] (repeat prompts)
    HEAD_MEAN = 4  # head (l, h)'s o_proj-input slice at the last position set to its train mean


class Where(enum.IntEnum):
    """Positions an intervention writes."""

    LAST = 0  # the last prompt token only
    FROM_VERB = 1  # every position from the verb's first token on


class Compared(enum.IntEnum):
    """Vectors whose cosine with SV[b] is stored (axis CV of ``cosine``)."""

    TV_DEMO = 0  # TV_demo[b]
    TV_REPEAT = 1  # TV_repeat[b]
    FV_5 = 2  # FV_5 (one vector, the same at every b)
    FV_10 = 3
    FV_20 = 4
    MEAN_REPEAT_VS_ECHO = 5  # cos(mean resid_repeat[b], mean resid_echo[b]): the study's cosine


FV_KS = (5, 10, 20)
COEFFICIENTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


class TV:
    """Fields of ``taskvec/vectors.h5`` (train-built vectors; AIE over held-out words)."""

    WORDS = Field("words", ("W",), "str", "the study's word list, in order")
    HELD_OUT = Field("held_out", ("W",), "bool", "False: train (even index), True: held out (odd index)")
    TASK_VECTOR = Field("task_vector", ("S", "B", "D"), "float32",
                        "TV_S[b]: mean over train words of resid[b] at the last position of S(x); "
                        "S = 0 demo, 1 repeat", activation=True)
    STEER_VECTOR = Field("steer_vector", ("B", "D"), "float32",
                         "SV[b]: mean over train words of resid[b](repeat(x)) - resid[b](echo(x)), last position",
                         activation=True)
    MEAN_ECHO = Field("mean_echo", ("B", "D"), "float32",
                      "mean over train words of resid[b] at the last position of echo(x)", activation=True)
    HEAD_MEAN_OUT = Field("head_mean_out", ("L", "H", "D"), "float32",
                          "mean over train words of each head's output at the last position of demo(x) "
                          "(gemma: with that forward's frozen post-norm gain)", activation=True)
    HEAD_MEAN_Z = Field("head_mean_z", ("L", "H", "hd"), "float32",
                        "z-bar: the same mean of the head's o_proj-input slice", activation=True)
    AIE = Field("aie", ("L", "H"), "float32",
                "average indirect effect: mean over held-out words of P(target | shuffled, head slice "
                "= z-bar at the last position) - P(target | shuffled)")
    FV_K = Field("fv_k", ("KF",), "int32", "k of each function vector (5, 10, 20)")
    FV_HEADS = Field("fv_heads", ("KF", "KMAX"), "int32",
                     "flat head index l * H + h of the top-k heads by AIE, best first; -1 pads")
    FUNCTION_VECTOR = Field("function_vector", ("KF", "D"), "float32",
                            "FV_k: sum of the top-k heads' mean outputs", activation=True)
    COSINE = Field("cosine", ("CV", "B"), "float32",
                   "cosine with SV[b] of each store.taskvec_schema.Compared vector per boundary")
    VALIDATION = Field("validation", ("I",), "compound", "invariant checks of the train forwards")


class TQ:
    """Fields of a held-out word's shard (``taskvec/aie/`` and ``taskvec/interventions/``).

    Q rows, one per intervention; metrics at the last position of the destination prompt, from
    the final logits (soft-capped where the model caps). The target of a row is chosen by the
    echo rule on its destination's CLEAN logits (the ``clean_*`` fields of that kind).
    """

    METHOD = Field("method", ("Q",), "int8", "store.taskvec_schema.Method")
    KIND = Field("kind", ("Q",), "int8", "destination prompt kind (store.taskvec_schema.Kind)")
    SOURCE = Field("source", ("Q",), "int8", "task vectors: the source Kind of TV; else -1")
    LAYER = Field("layer", ("Q",), "int16", "boundary b (residual methods) or block l (HEAD_MEAN)")
    HEAD = Field("head", ("Q",), "int16", "HEAD_MEAN: the head; else -1")
    K = Field("k", ("Q",), "int16", "FUNCTION_VECTOR: k; else 0")
    COEF = Field("coef", ("Q",), "float32", "STEER: c >= 0 (the sign is the direction: -c on repeat); else 0")
    WHERE = Field("where", ("Q",), "int8", "store.taskvec_schema.Where")
    TARGET_PROB = Field("target_prob", ("Q",), "float32", "P(target) after the intervention")
    TARGET_RANK = Field("target_rank", ("Q",), "int32", "target rank after it (0 = top-1; strictly greater logits)")
    ECHO_CORRECT = Field("echo_correct", ("Q",), "bool", "the intervened argmax is a first token of x, ' x', X or ' X'")
    KL = Field("kl", ("Q",), "float32", "KL(clean || intervened) over the vocabulary, nats")
    TOP1_ID = Field("top1_id", ("Q",), "int32", "the intervened argmax (lowest id on a tie)")
    CLEAN_KIND = Field("clean_kind", ("P",), "int8", "the prompt kinds of this word with a clean reference")
    CLEAN_TARGET_ID = Field("clean_target_id", ("P",), "int32", "target token (echo rule on the clean logits)")
    CLEAN_TARGET_PROB = Field("clean_target_prob", ("P",), "float32", "its clean probability")
    CLEAN_TARGET_RANK = Field("clean_target_rank", ("P",), "int32", "its clean rank")
    CLEAN_TOP1_ID = Field("clean_top1_id", ("P",), "int32", "clean argmax")
    CLEAN_ECHO_CORRECT = Field("clean_echo_correct", ("P",), "bool", "clean argmax is echo-correct")
    VALIDATION = Field("validation", ("I",), "compound", "invariant checks of this word's runs")


# attributes every file carries (besides the warehouse's fingerprint and schema version)
TV_ATTRS = ("n_demos", "chat", "fv_ks", "coefficients")
TVW_ATTRS = ("word", "word_index", "set")

TQ_ROW_FIELDS = (TQ.METHOD, TQ.KIND, TQ.SOURCE, TQ.LAYER, TQ.HEAD, TQ.K, TQ.COEF, TQ.WHERE)
TQ_METRIC_FIELDS = (TQ.TARGET_PROB, TQ.TARGET_RANK, TQ.ECHO_CORRECT, TQ.KL, TQ.TOP1_ID)
TQ_CLEAN_FIELDS = (TQ.CLEAN_KIND, TQ.CLEAN_TARGET_ID, TQ.CLEAN_TARGET_PROB, TQ.CLEAN_TARGET_RANK,
                   TQ.CLEAN_TOP1_ID, TQ.CLEAN_ECHO_CORRECT)

TV_INVARIANTS: dict[str, str] = {
    "taskvec_clean_is_model": "the engine's clean reference of every prompt == the model's plain HF forward "
                              "(last-position logits, full vocabulary)",
    "taskvec_self_patch_is_clean": "setting resid[b] to the prompt's own value == the clean reference (every b)",
    "taskvec_c0_is_clean": "steering with c = 0 == the clean reference (every b, both position modes)",
    "taskvec_capture_is_model": "the train forwards' captured logits == the model's (vectors.h5)",
}
