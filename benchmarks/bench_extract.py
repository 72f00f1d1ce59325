"""Extraction speed and memory on the embedded model, as ratios against baselines.

1. time: `echowh extract` (no ablation) over the default 44 words x 2 templates, divided by
   the bare `model(input_ids)` forward over the same prompts and batches, in this process.
   Target: at most 1.5x.
2. memory: peak RSS of an extraction of 44 prompts vs 440 prompts (each in a fresh child
   process). Target: within 10% (shards stream to disk; nothing grows with the prompt count).

Usage: python benchmarks/bench_extract.py [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from extract.config import ExtractConfig
from extract.models.sizing import sizes
from extract.pipeline.run import extract, load
from extract.stages.capture.stage import batches

TEMPLATES_10 = tuple(
    f"{verb} the following word: {{word}}"
    for verb in ("repeat", "echo", "say", "write", "print", "type", "copy", "output", "return", "spell")
)


def time_ratio(repeats: int = 2) -> dict[str, float]:
    cfg = ExtractConfig(ablation=(), progress=False)
    loaded = load(cfg)
    adapter, prompts = loaded.adapter, loaded.prompts
    groups = batches(prompts, cfg.batch_size or sizes(adapter).extract_batch)
    model = adapter.model
    best_bare = float("inf")
    best_ext = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            for b in groups:
                model(input_ids=torch.tensor([p.input_ids for p in b]))
        best_bare = min(best_bare, time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as d:
            s = extract(ExtractConfig(out=Path(d) / "w", ablation=(), progress=False), log=lambda m: None)
            best_ext = min(best_ext, s.timings["extract_s"])
    return {"prompts": len(prompts), "bare_forward_s": best_bare, "extract_s": best_ext,
            "ratio": best_ext / best_bare}


def child(n_templates: int, out: str) -> None:
    """Run one extraction and print this process's peak RSS (MiB) as JSON."""
    cfg = ExtractConfig(out=Path(out), ablation=(), progress=False,
                        templates=TEMPLATES_10[:n_templates] if n_templates > 1 else TEMPLATES_10[:1])
    s = extract(cfg, log=lambda m: None)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"prompts": s.n_prompts, "peak_rss_mib": rss}))


def memory_ratio() -> dict[str, float]:
    res = {}
    for n in (1, 10):
        with tempfile.TemporaryDirectory() as d:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--out", str(Path(d) / "w")],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]
            res[n] = json.loads(out)
    return {"prompts_small": res[1]["prompts"], "rss_small_mib": res[1]["peak_rss_mib"],
            "prompts_large": res[10]["prompts"], "rss_large_mib": res[10]["peak_rss_mib"],
            "ratio": res[10]["peak_rss_mib"] / res[1]["peak_rss_mib"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", type=int)
    ap.add_argument("--out")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.out)
        return
    t = time_ratio()
    print(f"time: {t['prompts']} prompts, bare forward {t['bare_forward_s']:.2f}s, "
          f"extraction {t['extract_s']:.2f}s -> ratio {t['ratio']:.2f}x (target <= 1.5x)")
    if not args.skip_memory:
        m = memory_ratio()
        print(f"memory: peak RSS {m['rss_small_mib']:.0f} MiB for {m['prompts_small']} prompts, "
              f"{m['rss_large_mib']:.0f} MiB for {m['prompts_large']} prompts -> ratio "
              f"{m['ratio']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
