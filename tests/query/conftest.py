"""A small warehouse built by hand (store writers, known values) for the query tests.

4 prompts = 2 words (cat, dog) x 2 templates; L = 3 blocks, H = 3 heads, D = 4, T = 5
tokens (roles first, template, word, suffix, last), top-k K = 3, vocabulary of 10 tokens.
Values that analyses rank or count are chosen by hand (see the tables below); vectors are
seeded random so cosine tests compare against numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from store import A, F, M, WarehouseWriter, validation_array
from store.schema import ABLATION_DIR

L, H, D, T, K = 3, 3, 4, 5, 3
VOCAB = ["<s>", "repeat", "echo", ":", "cat", "dog", "X", "请", " cat", "Y"]
WORDS = {"cat": 4, "dog": 5}
TEMPLATES = ["repeat the following word: {word}", "echo the following word: {word}"]
# prompt -> (word, template_index)
PROMPTS = [("cat", 0), ("cat", 1), ("dog", 0), ("dog", 1)]
# the model's top-1 at the last position and its continuation
TOP1 = [4, 4, 5, 6]
GENERATION = ["cat", "cat", "dog", "X"]
# target rank per boundary (B = L + 1 = 4 -> layers -1, 0, 1, 2)
RANKS = [[3, 1, 0, 0], [2, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 2]]
EMERGENCE = [1, 2, -1, None]  # by hand from RANKS
# token shown one layer before the answer when not the target: "请" (id 7)
# DLA per prompt [layer][head]
DLA_HEAD = [
    [[0.1, 0.2, 0.3], [0.5, -0.2, 0.1], [0.0, 0.4, 0.3]],
    [[0.2, 0.1, 0.0], [0.3, 0.2, 0.1], [0.05, 0.6, -0.1]],
    [[0.9, 0.8, 0.7], [0.1, 0.3, 0.2], [0.2, 0.1, 0.0]],
    [[0.0, 0.1, 0.2], [0.3, 0.0, -0.3], [0.1, 0.2, 0.3]],
]
# ablation logit_diff per prompt [mode][layer][unit] (units: 3 heads, attn, mlp)
LOGIT_DIFF = [
    [[[0.5, 0.1, 0.2, 0.9, 1.0], [0.3, 0.2, 0.1, 0.8, 0.7], [0.1, 0.2, 0.3, 0.4, 0.5]],
     [[0.2, 0.1, 0.0, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4, 0.5], [0.3, 0.2, 0.1, 0.0, 0.1]]],
    [[[0.2, 0.3, 0.1, 0.5, 0.6], [0.1, 0.5, 0.2, 0.6, 0.7], [0.9, 0.1, 0.4, 1.2, 0.8]],
     [[0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5], [0.3, 0.1, 0.2, 0.6, 0.7]]],
    [[[0.4, 0.3, 0.2, 0.5, 0.6], [0.2, 0.1, 0.3, 0.4, 0.5], [0.1, 0.3, 0.2, 0.4, 0.5]],
     [[0.1, 0.1, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2], [0.3, 0.3, 0.3, 0.3, 0.3]]],
    [[[0.3, 0.2, 0.1, 0.4, 0.5], [0.1, 0.4, 0.2, 0.3, 0.6], [0.2, 0.1, 0.3, 0.4, 0.5]],
     [[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.2, 0.4, 0.5]]],
]
# ablation top-1 changes: (prompt, mode, layer, unit) -> new top-1 id; the rest keep TOP1
FLIPS = {(0, 0, 0, 4): 6, (1, 0, 2, 0): 3, (3, 1, 1, 1): 9}


def _topk(rank: int, target: int) -> list[int]:
    """Top-3 ids with the target at ``rank`` (if < 3); the others fixed distractors."""
    others = [i for i in (7, 6, 9, 3) if i != target]
    ids = others[:K]
    if rank < K:
        ids = [*others[:rank], target, *others[rank:K - 1]]
    return ids


def _attention(rng: np.random.Generator) -> np.ndarray:
    a = rng.random((L, H, T, T)).astype(np.float32) + 0.01
    a *= np.tril(np.ones((T, T), dtype=np.float32))
    return (a / a.sum(-1, keepdims=True)).astype(np.float32)


def build(root: Path, *, ablation: bool = True, store_dtype: str = "float32",
          head_out_all: bool = False) -> dict[str, Any]:
    """Write the warehouse under ``root``; return every array written (for expected values).

    ``head_out_all``: also per-head outputs at every position (L, T, H, D), equal to
    ``head_out`` at the last position.
    """
    rng = np.random.default_rng(0)
    rng_all = np.random.default_rng(1)  # its own stream: the other values do not depend on it
    manifest = {
        "fingerprint": "test", "fingerprint_parts": {}, "model": {"id": "hand-made"},
        "config": {"store_dtype": store_dtype, "ablation": ["zero", "mean"] if ablation else []},
        "status": "complete", "templates": TEMPLATES, "words": list(WORDS),
        "prompts": [{"index": i, "word": w, "template_index": t} for i, (w, t) in enumerate(PROMPTS)],
    }
    w = WarehouseWriter.create(root, manifest, resume=False)
    with w.model_writer() as m:
        m.put(M.VOCAB_TEXT, VOCAB)
        m.put(M.KV_GROUP, np.array([0, 0, 1]))
        m.attrs({"model_type": "llama", "n_layers": L, "n_heads": H, "n_kv_heads": 2, "head_dim": 2,
                 "d_model": D, "vocab_size": len(VOCAB), "norm_eps": 1e-6, "final_softcap": 0.0})
    bos = rng.normal(size=(L + 1, D)).astype(np.float32)
    data: dict[str, Any] = {"resid": [], "attn": [], "head_out": [], "head_out_all": [], "bos": bos}
    for i, (word, t) in enumerate(PROMPTS):
        tid = WORDS[word]
        resid = rng.normal(size=(L + 1, T, D)).astype(np.float32)
        resid[:, 0] = bos  # position 0 sees only itself: identical across prompts ...
        if i == 3:
            resid[2, 0] = -bos[2]  # ... except one hand-made outlier at boundary 2
        attn = _attention(rng)
        head_out = rng.normal(size=(L, H, D)).astype(np.float32)
        data["resid"].append(resid)
        data["attn"].append(attn)
        data["head_out"].append(head_out)
        lens_ids = np.array([_topk(r, tid) for r in RANKS[i]], dtype=np.int32)
        with w.shard_writer(i) as s:
            s.put(F.INPUT_IDS, [0, 1 + t, tid, 3, 3])
            s.put(F.TOKEN_TEXT, [VOCAB[x] for x in [0, 1 + t, tid, 3, 3]])
            s.put(F.POSITION_ROLE, [0, 1, 2, 3, 4])
            s.put(F.RESID, resid)
            s.put(F.ATTN_OUT, rng.normal(size=(L, T, D)))
            s.put(F.MLP_OUT, rng.normal(size=(L, T, D)))
            s.put(F.HEAD_OUT, head_out)
            if head_out_all:
                every = rng_all.normal(size=(L, T, H, D)).astype(np.float32)
                every[:, T - 1] = head_out
                s.put(F.HEAD_OUT_ALL, every)
                data["head_out_all"].append(every)
            s.put(F.ATTN_PATTERN, attn)
            s.put(F.LENS_TOPK_IDS, lens_ids)
            s.put(F.LENS_TOPK_LOGITS, np.tile([3.0, 2.0, 1.0], (L + 1, 1)))
            s.put(F.LENS_TOPK_PROBS, np.tile([0.5, 0.3, 0.1], (L + 1, 1)))
            s.put(F.LENS_TARGET_LOGIT, np.arange(L + 1) + 0.5)
            s.put(F.LENS_TARGET_PROB, np.linspace(0.1, 0.7, L + 1))
            s.put(F.LENS_TARGET_RANK, RANKS[i])
            logits = np.zeros(len(VOCAB), dtype=np.float32)
            logits[tid] = 7.0 + i
            s.put(F.FINAL_LOGITS, logits)
            s.put(F.FINAL_SCALE, 0.25)
            s.put(F.DLA_EMBED, 0.01 * i)
            s.put(F.DLA_HEAD, DLA_HEAD[i])
            s.put(F.DLA_ATTN_BIAS, np.zeros(L))
            s.put(F.DLA_MLP, [1.0, 2.0, 3.0])
            gen_ids = [4] if GENERATION[i] == "cat" else [5] if GENERATION[i] == "dog" else [6]
            s.put(F.GENERATED_IDS, gen_ids)
            s.put(F.VALIDATION, validation_array([("resid_chain", 1e-6, 1e-6, 1e-4, True),
                                                  ("logits_from_resid", 0.1 * i, 0.1 * i, 1e-4, i == 0)]))
            s.attrs({
                "prompt_index": i, "word": word, "template_index": t, "template": TEMPLATES[t],
                "text": TEMPLATES[t].format(word=word), "fingerprint": "test", "n_tokens": T,
                "target_id": tid, "target_text": VOCAB[tid], "target_form": "word",
                "word_multi_token": False, "top1_id": TOP1[i], "generation": GENERATION[i],
                "echo_first_token": TOP1[i] == tid, "echo_correct": GENERATION[i] == word,
                "echo_exact": GENERATION[i] == word,
            })
        if not ablation:
            continue
        diff = np.array(LOGIT_DIFF[i], dtype=np.float32)
        top1 = np.full(diff.shape, TOP1[i], dtype=np.int32)
        for (p, mo, la, u), new in FLIPS.items():
            if p == i:
                top1[mo, la, u] = new
        with w.shard_writer(i, ABLATION_DIR) as s:
            s.put(A.TARGET_LOGIT, 7.0 + i - diff)
            s.put(A.TARGET_PROB, np.full(diff.shape, 0.5))
            s.put(A.TARGET_RANK, (top1 != tid).astype(np.int32))
            s.put(A.LOGIT_DIFF, diff)
            s.put(A.TOP1_ID, top1)
            s.put(A.TOP1_PROB, np.full(diff.shape, 0.4))
            s.put(A.KL, diff * 0.1)
            s.put(A.TOPK_IDS, np.stack([top1, top1, top1], axis=-1))
            s.put(A.TOPK_LOGITS, np.zeros((*diff.shape, 3)))
            s.put(A.CLEAN_TOP1_ID, TOP1[i])  # the engine's clean reference
            s.put(A.CLEAN_TOP1_PROB, 0.4)
            s.put(A.CLEAN_TARGET_LOGIT, 7.0 + i)
            s.put(A.CLEAN_TARGET_PROB, 0.5)
            s.put(A.CLEAN_TARGET_RANK, int(TOP1[i] != tid))
            s.attrs({"prompt_index": i, "fingerprint": "test", "modes": ["zero", "mean"],
                     "positions": "all", "layers": np.arange(L), "n_heads": H})
    w.write_manifest()
    return data


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("wh") / "warehouse"
    return root, build(root)


@pytest.fixture(scope="session")
def wh_path(built: tuple[Path, dict[str, Any]]) -> Path:
    return built[0]


@pytest.fixture(scope="session")
def arrays(built: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    return built[1]


@pytest.fixture()
def wh(wh_path: Path):
    from query import Warehouse

    with Warehouse(wh_path) as w:
        yield w


@pytest.fixture(scope="session")
def wh_no_ablation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wh_noabl") / "warehouse"
    build(root, ablation=False)
    return root


@pytest.fixture(scope="session")
def built_all(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The same warehouse with head_out_all stored too (every heavy view has rows)."""
    root = tmp_path_factory.mktemp("wh_all") / "warehouse"
    return root, build(root, head_out_all=True)
