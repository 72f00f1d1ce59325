"""A schema-complete warehouse written through the store's writer, no model (fast, seeded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from store import A, F, M, WarehouseWriter, validation_array
from store.schema import ABLATION_DIR

L, H, D, V, K, T = 2, 3, 4, 11, 3, 5


def build(root: Path, words: tuple[str, ...] = ("cat", "dog"), fingerprint: str = "fp-a",
          seed: int = 0, ablation: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    cfg = {"store_dtype": "float32", "top_k": K, "max_new_tokens": 4, "head_out_all_positions": False,
           "ablation": ["zero"] if ablation else [], "ablate_positions": "all", "ablate_layers": None}
    manifest = {"fingerprint": fingerprint, "fingerprint_parts": {"words": list(words)}, "config": cfg,
                "status": "complete", "model": {"n_layers": L, "n_heads": H, "d_model": D, "vocab_size": V},
                "prompts": [{"index": i, "word": w, "template_index": 0, "n_tokens": T}
                            for i, w in enumerate(words)]}
    with WarehouseWriter.create(root, manifest, resume=False) as w:
        with w.model_writer() as m:
            m.put(M.UNEMBED_IDS, np.arange(2))
            m.put(M.UNEMBED_ROWS, rng.normal(size=(2, D)))
            m.put(M.FINAL_NORM_WEIGHT, np.ones(D))
            m.put(M.KV_GROUP, [0, 0, 1])
            m.put(M.VOCAB_TEXT, [f"t{i}" for i in range(V)])
            m.attrs({"model_type": "llama", "n_layers": L, "n_heads": H, "n_kv_heads": 2, "head_dim": 2,
                     "d_model": D, "vocab_size": V, "norm_eps": 1e-6})
        for i, word in enumerate(words):
            with w.shard_writer(i) as s:
                s.put(F.INPUT_IDS, rng.integers(V, size=T))
                s.put(F.TOKEN_TEXT, [f"t{j}" for j in range(T)])
                s.put(F.POSITION_ROLE, [0, 1, 2, 3, 4])
                for fld, shape in ((F.RESID, (L + 1, T, D)), (F.ATTN_OUT, (L, T, D)), (F.MLP_OUT, (L, T, D)),
                                   (F.HEAD_OUT, (L, H, D)), (F.ATTN_PATTERN, (L, H, T, T)),
                                   (F.LENS_TOPK_LOGITS, (L + 1, K)), (F.LENS_TOPK_PROBS, (L + 1, K)),
                                   (F.LENS_TARGET_LOGIT, (L + 1,)), (F.LENS_TARGET_PROB, (L + 1,)),
                                   (F.FINAL_LOGITS, (V,)), (F.DLA_HEAD, (L, H)), (F.DLA_ATTN_BIAS, (L,)),
                                   (F.DLA_MLP, (L,))):
                    s.put(fld, rng.normal(size=shape))
                s.put(F.LENS_TOPK_IDS, rng.integers(V, size=(L + 1, K)))
                s.put(F.LENS_TARGET_RANK, rng.integers(V, size=L + 1))
                s.put(F.FINAL_SCALE, 0.5)
                s.put(F.DLA_EMBED, 0.1)
                s.put(F.GENERATED_IDS, [1, 2])
                s.put(F.VALIDATION, validation_array([("resid_chain", 1e-7, 1e-7, 1e-4, True)]))
                s.attrs({"word": word, "template_index": 0, "template": "say {word}", "text": f"say {word}",
                         "n_tokens": T, "word_start": 2, "word_end": 3, "target_id": 1, "target_text": "t1",
                         "target_form": "word", "word_multi_token": False, "top1_id": 1, "generation": word,
                         "echo_first_token": True, "echo_correct": True, "echo_exact": True})
            if not ablation:
                continue
            with w.shard_writer(i, ABLATION_DIR) as s:
                shape = (1, L, H + 2)
                for fld in (A.TARGET_LOGIT, A.TARGET_PROB, A.LOGIT_DIFF, A.TOP1_PROB, A.KL):
                    s.put(fld, rng.normal(size=shape))
                for fld in (A.TARGET_RANK, A.TOP1_ID):
                    s.put(fld, rng.integers(V, size=shape))
                s.put(A.TOPK_IDS, rng.integers(V, size=(*shape, K)))
                s.put(A.TOPK_LOGITS, rng.normal(size=(*shape, K)))
                s.put(A.VALIDATION, validation_array([("ablation_clean_is_model", 1e-7, 1e-7, 1e-4, True)]))
                s.attrs({"modes": ["zero"], "positions": "all", "layers": np.arange(L), "n_heads": H})
        w.write_manifest()
    return root
