"""A hand-made warehouse with planted findings, written through the store writer (no model).

8 prompts = 4 words x 2 templates; L = 4 blocks, H = 6 heads, D = 8, T = 6 tokens, top-k 3.
Planted, so the report's findings have known numbers:
- emergence layer 2 for prompts 0-5, layer 3 for prompt 6, never for prompt 7 (its top-1 is
  another token: template 1 echoes 3 of 4 words);
- head L2H4 has the largest zero-ablation effect (1.0) for prompts 0-6 and the smallest (0.0)
  for prompt 7, so it is in the top 3 by ablation at layer 2 for 7 of 8 prompts; ablating it
  flips the answer of prompts 0 and 1;
- head L2H4 puts 0.9 of its last-position attention on position 0 in every prompt;
- head L3H1 has the largest DLA (0.5) everywhere.
The other values are seeded noise, smaller than every planted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store import A, F, M, WarehouseWriter, validation_array
from store.schema import ABLATION_DIR

L, H, D, T, K = 4, 6, 8, 6, 3
VOCAB = ["<s>", "repeat", "echo", ":", "cat", "dog", "sun", "tree", "请", " X", "Y", "Z"]  # " X": a space
WORD_ID = {"cat": 4, "dog": 5, "sun": 6, "tree": 7}
TEMPLATES = ["repeat the following word: {word}", "echo the following word: {word}"]
PROMPTS = [(w, t) for t in range(2) for w in WORD_ID]  # template 0 first: prompts 0-3, 4-7
EMERGENCE = [2, 2, 2, 2, 2, 2, 3, None]
SINK = (2, 4)  # (layer, head) with the big ablation effect and 0.9 attention on position 0
TOP_DLA = (3, 1)
FLIPPED = {0: 9, 1: 9}  # prompt -> top-1 id after ablating SINK (" X", whose space must show)


def _ranks(e: int | None) -> list[int]:
    """Target rank per boundary (layers -1..L-1) for an emergence layer (None: never)."""
    if e is None:
        return [3] * L + [1]  # the final top-1 is another token
    return [0 if layer >= e else 3 for layer in range(-1, L)]


def build(root: Path, *, ablation: bool = True) -> Path:
    rng = np.random.default_rng(1)
    manifest = {
        "fingerprint": "planted", "fingerprint_parts": {}, "status": "complete",
        "model": {"model": "hand-made", "n_layers": L, "n_heads": H, "n_kv_heads": 2, "d_model": D,
                  "dtype": "float32"},
        "config": {"store_dtype": "float32", "chat_template": True,
                   "ablation": ["zero"] if ablation else [], "ablate_positions": "all"},
        "templates": TEMPLATES, "timings": {"total_s": 1.0},
        "prompts": [{"index": i, "word": w, "template_index": t} for i, (w, t) in enumerate(PROMPTS)],
    }
    w = WarehouseWriter.create(root, manifest, resume=False)
    with w.model_writer() as m:
        m.put(M.VOCAB_TEXT, VOCAB)
        m.put(M.KV_GROUP, np.arange(H) // 3)
        m.attrs({"model_type": "llama", "n_layers": L, "n_heads": H, "n_kv_heads": 2, "head_dim": 2,
                 "d_model": D, "vocab_size": len(VOCAB), "norm_eps": 1e-6, "final_softcap": 0.0})
    bos = rng.normal(size=(L + 1, D)).astype(np.float32)
    causal = np.tril(np.ones((T, T), dtype=np.float32))
    for i, (word, t) in enumerate(PROMPTS):
        tid = WORD_ID[word]
        top1 = tid if EMERGENCE[i] is not None else 9
        ranks = _ranks(EMERGENCE[i])
        resid = rng.normal(size=(L + 1, T, D)).astype(np.float32)
        resid[:, 0] = bos
        attn = rng.random((L, H, T, T)).astype(np.float32) * causal + 0.01 * causal
        attn /= attn.sum(-1, keepdims=True)
        rest = attn[SINK[0], SINK[1], :, 1:]
        attn[SINK[0], SINK[1], :, 1:] = 0.1 * rest / np.maximum(rest.sum(-1, keepdims=True), 1e-9)
        attn[SINK[0], SINK[1], :, 0] = 0.9
        attn[SINK[0], SINK[1], 0, 0] = 1.0
        dla = rng.uniform(-0.05, 0.05, size=(L, H)).astype(np.float32)
        dla[TOP_DLA] = 0.5
        lens_ids = np.array([[tid, 8, 10] if r == 0 else [8, 10, 11] for r in ranks], dtype=np.int32)
        ids = [0, 1 + t, 3, tid, 3, 3]
        with w.shard_writer(i) as s:
            s.put(F.INPUT_IDS, ids)
            s.put(F.TOKEN_TEXT, [VOCAB[x] for x in ids])
            s.put(F.POSITION_ROLE, [0, 1, 1, 2, 3, 4])
            s.put(F.RESID, resid)
            s.put(F.ATTN_OUT, rng.normal(size=(L, T, D)))
            s.put(F.MLP_OUT, rng.normal(size=(L, T, D)))
            s.put(F.HEAD_OUT, rng.normal(size=(L, H, D)))
            s.put(F.ATTN_PATTERN, attn)
            s.put(F.LENS_TOPK_IDS, lens_ids)
            s.put(F.LENS_TOPK_LOGITS, np.tile([3.0, 2.0, 1.0], (L + 1, 1)))
            s.put(F.LENS_TOPK_PROBS, np.tile([0.6, 0.2, 0.1], (L + 1, 1)))
            s.put(F.LENS_TARGET_LOGIT, np.arange(L + 1, dtype=np.float32))
            s.put(F.LENS_TARGET_PROB, [0.6 if r == 0 else 0.05 for r in ranks])
            s.put(F.LENS_TARGET_RANK, ranks)
            logits = np.zeros(len(VOCAB), dtype=np.float32)
            logits[top1] = 5.0
            s.put(F.FINAL_LOGITS, logits)
            s.put(F.FINAL_SCALE, 0.5)
            s.put(F.DLA_EMBED, 0.0)
            s.put(F.DLA_HEAD, dla)
            s.put(F.DLA_ATTN_BIAS, np.zeros(L))
            s.put(F.DLA_MLP, np.ones(L))
            s.put(F.GENERATED_IDS, [top1])
            s.put(F.VALIDATION, validation_array([("resid_chain", 1e-7, 1e-7, 1e-4, True),
                                                  ("logits_from_resid", 2e-7, 2e-7, 1e-4, True)]))
            s.attrs({
                "prompt_index": i, "word": word, "template_index": t, "template": TEMPLATES[t],
                "text": TEMPLATES[t].format(word=word), "fingerprint": "planted", "n_tokens": T,
                "target_id": tid, "target_text": word, "target_form": "word", "word_multi_token": False,
                "top1_id": top1, "generation": VOCAB[top1], "echo_first_token": top1 == tid,
                "echo_correct": top1 == tid, "echo_exact": top1 == tid,
            })
        if not ablation:
            continue
        diff = rng.uniform(0.05, 0.1, size=(1, L, H + 2)).astype(np.float32)
        diff[0, SINK[0], SINK[1]] = 1.0 if i < 7 else 0.0
        new_top1 = np.full(diff.shape, top1, dtype=np.int32)
        if i in FLIPPED:
            new_top1[0, SINK[0], SINK[1]] = FLIPPED[i]
        with w.shard_writer(i, ABLATION_DIR) as s:
            s.put(A.TARGET_LOGIT, 5.0 - diff)
            s.put(A.TARGET_PROB, np.full(diff.shape, 0.5))
            s.put(A.TARGET_RANK, (new_top1 != tid).astype(np.int32))
            s.put(A.LOGIT_DIFF, diff)
            s.put(A.TOP1_ID, new_top1)
            s.put(A.TOP1_PROB, np.full(diff.shape, 0.4))
            s.put(A.KL, diff * 0.1)
            s.put(A.TOPK_IDS, np.stack([new_top1] * K, axis=-1))
            s.put(A.TOPK_LOGITS, np.zeros((*diff.shape, K)))
            s.put(A.CLEAN_TOP1_ID, top1)  # the engine's clean reference
            s.put(A.CLEAN_TOP1_PROB, 0.4)
            s.put(A.CLEAN_TARGET_LOGIT, 5.0)
            s.put(A.CLEAN_TARGET_PROB, 0.5)
            s.put(A.CLEAN_TARGET_RANK, int(top1 != tid))
            s.attrs({"prompt_index": i, "fingerprint": "planted", "modes": ["zero"], "positions": "all",
                     "layers": np.arange(L), "n_heads": H})
    w.write_manifest()
    return root


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("planted") / "warehouse")


@pytest.fixture(scope="session")
def planted_no_ablation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("planted_bare") / "warehouse", ablation=False)
