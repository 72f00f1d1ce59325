"""Time every named analysis on a warehouse, and the bytes a one-layer query saves.

    python benchmarks/bench_query.py -w out/warehouse            # the default extraction
    python benchmarks/bench_query.py --synthetic /tmp/synth_wh   # no extraction at hand:
        # writes a random warehouse of the default run's shape first (SmolLM2-135M:
        # 30 layers, 9 heads, d_model 576, 44 words x 2 templates, ~45 tokens per prompt)

Each analysis runs on a freshly opened warehouse (cold: its views are read from HDF5 inside
the timing) and again on the same one (warm). Target: cold under 1 s with --threads 2, and a
one-layer query reading at most 1/4 of the bytes of an all-layer one. Prints, never asserts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from query import Warehouse, list_analyses  # noqa: E402
from store import A, F, M, WarehouseWriter, validation_array  # noqa: E402
from store.schema import ABLATION_DIR  # noqa: E402


def write_synthetic(root: Path, n_words: int = 44, n_templates: int = 2, n_layers: int = 30,
                    n_heads: int = 9, d_model: int = 576, n_tokens: int = 45, k: int = 10,
                    vocab: int = 49152, ablation_layers: int = 30) -> None:
    """A random warehouse with the default run's shapes (values are noise, shapes are real)."""
    rng = np.random.default_rng(0)
    L, H, D, T, B = n_layers, n_heads, d_model, n_tokens, n_layers + 1
    prompts = [(f"w{i}", t) for i in range(n_words) for t in range(n_templates)]
    manifest = {"fingerprint": "synthetic", "fingerprint_parts": {}, "model": {"id": "synthetic"},
                "config": {"store_dtype": "float32", "ablation": ["zero", "mean"]}, "status": "complete",
                "prompts": [{"index": i, "word": w, "template_index": t} for i, (w, t) in enumerate(prompts)]}
    w = WarehouseWriter.create(root, manifest, resume=False)
    with w.model_writer() as m:
        m.put(M.VOCAB_TEXT, [f"t{i}" for i in range(vocab)])
        m.put(M.KV_GROUP, np.arange(H) // 3)
        m.attrs({"model_type": "llama", "n_layers": L, "n_heads": H, "n_kv_heads": 3, "head_dim": 64,
                 "d_model": D, "vocab_size": vocab, "norm_eps": 1e-5, "final_softcap": 0.0})
    roles = np.array([0] + [1] * (T - 4) + [2, 3, 4], dtype=np.int8)
    bos = rng.normal(size=(B, D)).astype(np.float32)
    causal = np.tril(np.ones((T, T), dtype=np.float32))
    for i, (word, t) in enumerate(prompts):
        resid = rng.normal(size=(B, T, D)).astype(np.float32)
        resid[:, 0] = bos
        attn = rng.random((L, H, T, T), dtype=np.float32) * causal
        attn /= attn.sum(-1, keepdims=True)
        ranks = np.where(np.arange(B) >= rng.integers(18, 28), 0, rng.integers(1, 50, B)).astype(np.int32)
        tid = int(rng.integers(vocab))
        with w.shard_writer(i) as s:
            s.put(F.INPUT_IDS, rng.integers(vocab, size=T))
            s.put(F.TOKEN_TEXT, [f"tok{j}" for j in range(T)])
            s.put(F.POSITION_ROLE, roles)
            s.put(F.RESID, resid)
            s.put(F.ATTN_OUT, rng.normal(size=(L, T, D)).astype(np.float32))
            s.put(F.MLP_OUT, rng.normal(size=(L, T, D)).astype(np.float32))
            s.put(F.HEAD_OUT, rng.normal(size=(L, H, D)).astype(np.float32))
            s.put(F.ATTN_PATTERN, attn)
            s.put(F.LENS_TOPK_IDS, rng.integers(vocab, size=(B, k)))
            s.put(F.LENS_TOPK_LOGITS, rng.normal(size=(B, k)))
            s.put(F.LENS_TOPK_PROBS, rng.random((B, k)))
            s.put(F.LENS_TARGET_LOGIT, rng.normal(size=B))
            s.put(F.LENS_TARGET_PROB, rng.random(B))
            s.put(F.LENS_TARGET_RANK, ranks)
            s.put(F.FINAL_LOGITS, rng.normal(size=vocab))
            s.put(F.FINAL_SCALE, 0.1)
            s.put(F.DLA_EMBED, 0.0)
            s.put(F.DLA_HEAD, rng.normal(size=(L, H)))
            s.put(F.DLA_ATTN_BIAS, np.zeros(L))
            s.put(F.DLA_MLP, rng.normal(size=L))
            s.put(F.GENERATED_IDS, rng.integers(vocab, size=8))
            s.put(F.VALIDATION, validation_array([("resid_chain", 1e-6, 1e-6, 1e-4, True)]))
            s.attrs({"prompt_index": i, "word": word, "template_index": t, "template": "{word}",
                     "text": word, "fingerprint": "synthetic", "n_tokens": T, "target_id": tid,
                     "target_text": word, "target_form": "word", "word_multi_token": False,
                     "top1_id": tid, "generation": word, "echo_first_token": True, "echo_correct": True,
                     "echo_exact": True})
        shape = (2, ablation_layers, H + 2)
        with w.shard_writer(i, ABLATION_DIR) as s:
            for fld in (A.TARGET_LOGIT, A.TARGET_PROB, A.LOGIT_DIFF, A.TOP1_PROB, A.KL):
                s.put(fld, rng.normal(size=shape))
            s.put(A.TARGET_RANK, rng.integers(3, size=shape))
            s.put(A.TOP1_ID, np.where(rng.random(shape) < 0.05, tid + 1, tid))
            s.put(A.TOPK_IDS, rng.integers(vocab, size=(*shape, k)))
            s.put(A.TOPK_LOGITS, rng.normal(size=(*shape, k)))
            s.put(A.CLEAN_TOP1_ID, tid)  # the engine's clean reference
            s.put(A.CLEAN_TOP1_PROB, 0.5)
            s.put(A.CLEAN_TARGET_LOGIT, 1.0)
            s.put(A.CLEAN_TARGET_PROB, 0.5)
            s.put(A.CLEAN_TARGET_RANK, 0)
            s.attrs({"prompt_index": i, "fingerprint": "synthetic", "modes": ["zero", "mean"],
                     "positions": "all", "layers": np.arange(ablation_layers), "n_heads": H})
    w.write_manifest()


def _timed(path: Path, threads: int, fn) -> tuple[float, int, object]:
    with Warehouse(path, threads=threads) as wh:
        t0 = time.perf_counter()
        out = fn(wh)
        return time.perf_counter() - t0, wh.bytes_read, out


@click.command()
@click.option("-w", "--warehouse", type=click.Path(path_type=Path, file_okay=False), default=Path("out/warehouse"),
              show_default=True, help="Warehouse to time.")
@click.option("--synthetic", type=click.Path(path_type=Path, file_okay=False),
              help="Write a random warehouse of the default run's shape here first, and time it.")
@click.option("--threads", type=int, default=2, show_default=True, help="DuckDB threads (the target is 2 cores).")
@click.option("--repeat", type=int, default=3, show_default=True, help="Runs per analysis (the best is shown).")
def main(warehouse: Path, synthetic: Path | None, threads: int, repeat: int) -> None:
    if synthetic is not None:
        if not (synthetic / "manifest.json").exists():
            t0 = time.perf_counter()
            write_synthetic(synthetic)
            click.echo(f"wrote synthetic warehouse {synthetic} in {time.perf_counter() - t0:.1f} s")
        warehouse = synthetic
    t0 = time.perf_counter()
    with Warehouse(warehouse, threads=threads) as wh:
        n = wh.sql("SELECT count(*) AS n FROM prompts")["n"][0]
    click.echo(f"warehouse {warehouse}: {n} prompts; open + prompts view {time.perf_counter() - t0:.3f} s; "
               f"threads={threads}")
    click.echo(f"{'analysis':<26}{'cold s':>9}{'warm s':>9}{'rows':>8}{'MB read':>9}")
    worst = 0.0
    for a in list_analyses():
        cold = min(_timed(warehouse, threads, lambda wh, a=a: wh.run_analysis(a.name))[0] for _ in range(repeat))
        with Warehouse(warehouse, threads=threads) as wh:
            df = wh.run_analysis(a.name)
            mb = wh.bytes_read / 1e6
            t0 = time.perf_counter()
            wh.run_analysis(a.name)
            warm = time.perf_counter() - t0
        worst = max(worst, cold)
        flag = "" if cold < 1.0 else "  > 1 s"
        click.echo(f"{a.name:<26}{cold:>9.3f}{warm:>9.3f}{df.height:>8}{mb:>9.1f}{flag}")
    click.echo(f"slowest analysis (cold): {worst:.3f} s (target < 1 s)")
    for view, cols in (("resid", "prompt, vec"), ("attention", "prompt, weight"), ("head_out", "prompt, vec")):
        t_all, b_all, _ = _timed(warehouse, threads, lambda wh, v=view, c=cols: wh.sql(f"SELECT {c} FROM {v}"))
        t_one, b_one, _ = _timed(warehouse, threads,
                                 lambda wh, v=view, c=cols: wh.sql(f"SELECT {c} FROM {v} WHERE layer = 3"))
        ratio = b_one / b_all if b_all else float("nan")
        click.echo(f"{view}: all layers {b_all / 1e6:.1f} MB in {t_all:.3f} s; layer = 3 {b_one / 1e6:.2f} MB "
                   f"in {t_one:.3f} s; bytes ratio {ratio:.4f} (target <= 0.25)")


if __name__ == "__main__":
    main()
