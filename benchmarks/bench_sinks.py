"""Cost of the attention-sink captures and of the sink-removal ablation, as ratios.

0. compute overhead (default, quick, robust to a loaded machine): over the default 88 prompts'
   extraction batches, capture + derive with the sink captures against the same without them,
   alternating per batch, best of ``--repeats`` per batch. The denominator leaves out the
   shard writes and the greedy continuation, so this ratio bounds the whole extraction's.
1. extraction overhead (``--full``): `extract` (no ablation) on the default 44 words x 2 templates with the
   sink captures (extract.stages.capture.sinks: norms from projection hooks, residual top values and medians,
   lens at position 0) against the same run with them switched off in this process, runs
   interleaved, best of ``--repeats``. Target: at most 1.10x (issue 10).
2. ablation: the grid time of ``--ablation zero,sink,sink_norenorm`` against ``zero`` alone on
   ``--layers`` (all positions): the sink modes add two modes' rows, plus two extra runs of the
   attention core at the ablated layer.

Usage: python benchmarks/bench_sinks.py [--repeats 3] [--full [--layers 14-17]]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import extract.stages.capture.engine as capture_mod
import extract.stages.capture.stage as run_mod
from extract.config import ExtractConfig
from extract.pipeline.run import extract


@contextmanager
def captures_off():
    """The extraction exactly as before the sink captures: no hooks, no derived arrays."""
    hooks, add = capture_mod.sink_hooks, run_mod.add_sink_arrays

    def no_hooks(adapter, store):
        store["sink"] = {}
        return []

    capture_mod.sink_hooks = no_hooks
    run_mod.add_sink_arrays = lambda *a, **k: None
    try:
        yield
    finally:
        capture_mod.sink_hooks, run_mod.add_sink_arrays = hooks, add


def _extract_s(**kw) -> dict:
    with tempfile.TemporaryDirectory() as d:
        s = extract(ExtractConfig(out=Path(d) / "w", progress=False, **kw), log=lambda m: None)
        assert not s.failed, s.validation
        return s.timings


def extraction_overhead(repeats: int) -> dict:
    best = {"off": float("inf"), "on": float("inf")}
    _extract_s(ablation=())  # warm-up: model conversion cache, allocator, BLAS threads
    for _ in range(repeats):
        with captures_off():
            best["off"] = min(best["off"], _extract_s(ablation=())["extract_s"])
        best["on"] = min(best["on"], _extract_s(ablation=())["extract_s"])
    return {"extract_s_without": best["off"], "extract_s_with": best["on"], "ratio": best["on"] / best["off"]}


def compute_overhead(repeats: int) -> dict:
    import time

    import torch

    from extract.models.sizing import sizes
    from extract.pipeline.run import load
    from extract.stages.capture.engine import capture, derive
    from extract.stages.capture.stage import batches

    cfg = ExtractConfig(ablation=(), progress=False)
    loaded = load(cfg)
    adapter, prompts = loaded.adapter, loaded.prompts
    t = {"off": 0.0, "on": 0.0}
    for b in batches(prompts, cfg.batch_size or sizes(adapter).extract_batch):  # the extraction's own batches
        ids = torch.tensor([p.input_ids for p in b])
        tgt = [p.input_ids[-1] for p in b]
        best = {"off": float("inf"), "on": float("inf")}
        for _ in range(repeats):
            for variant in ("off", "on"):
                t0 = time.perf_counter()
                if variant == "off":
                    with captures_off():
                        cap = capture(adapter, ids)
                        derive(adapter, cap, tgt, cfg.top_k, False)
                else:
                    cap = capture(adapter, ids)
                    d = derive(adapter, cap, tgt, cfg.top_k, False)
                    run_mod.add_sink_arrays(adapter, cap, d, cfg.top_k)
                best[variant] = min(best[variant], time.perf_counter() - t0)
                del cap
        t["off"] += best["off"]
        t["on"] += best["on"]
    return {"prompts": len(prompts), "capture_derive_s_without": round(t["off"], 3),
            "capture_derive_s_with": round(t["on"], 3), "ratio": round(t["on"] / t["off"], 4)}


def ablation_cost(layers: tuple[int, ...]) -> dict:
    z = _extract_s(ablation=("zero",), ablate_layers=layers)
    s = _extract_s(ablation=("zero", "sink", "sink_norenorm"), ablate_layers=layers)
    return {"layers": list(layers), "grid_s_zero": z["ablation_s"], "grid_s_zero_sink_norenorm": s["ablation_s"],
            "ratio": s["ablation_s"] / z["ablation_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each variant (best is kept)")
    ap.add_argument("--layers", default="14-17", help="layers of the ablation comparison, lo-hi")
    ap.add_argument("--full", action="store_true",
                    help="also whole extractions with and without the captures, and the sink grid's cost")
    args = ap.parse_args()
    out = {"compute": compute_overhead(args.repeats)}
    print(json.dumps(out, indent=2), flush=True)
    if args.full:
        out["extraction"] = extraction_overhead(args.repeats)
        print(json.dumps(out, indent=2), flush=True)
        lo, hi = (int(x) for x in args.layers.split("-"))
        out["ablation"] = ablation_cost(tuple(range(lo, hi + 1)))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
