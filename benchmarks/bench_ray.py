"""Ray's overhead on one machine, and Parquet export throughput, as ratios.

1. wall time of the study (default: the embedded SmolLM2, 44 words x 2 templates, zero
   ablation over every layer) run locally, on a local Ray cluster with 1 worker and with 2
   workers. Every run uses the same torch thread count per process (--threads; the local run
   and each actor), so 1 worker vs local is Ray's overhead (target <= 10%) and 2 workers vs
   local is the speed-up a second worker buys on this machine. The cluster is started once
   before timing (as a user with a running cluster has it); each run's time includes loading
   the model (the driver's and the actors') and writing every shard.
2. export throughput: `export_parquet` of the local run's warehouse (MB/s of Parquet
   written), against a plain Arrow write (``pyarrow.parquet.write_table``, same zstd) of the
   same view tables already in memory: the export's cost over the bare write.

Usage: python benchmarks/bench_ray.py [--words N] [--threads T] [--ablation zero|none] [--model M]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch

from extract.config import DEFAULT_MODEL, ExtractConfig
from extract.executors.ray_pool import RayConfig, RayExecutor
from extract.pipeline.run import extract
from extract.stages.prompts import default_words
from query import Warehouse
from query.export import export_parquet


def study(args, out: Path) -> ExtractConfig:
    words = tuple(default_words()[: args.words])
    return ExtractConfig(out=out, model=args.model, words=words, progress=False, device="cpu",
                         ablation=() if args.ablation == "none" else (args.ablation,))


def time_runs(args, root: Path) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    out: dict[str, float] = {}
    t = time.perf_counter()
    extract(study(args, root / "local"), log=lambda m: None)
    out["local_s"] = time.perf_counter() - t
    for n in (1, 2):
        t = time.perf_counter()
        extract(study(args, root / f"ray{n}"), RayExecutor(RayConfig(workers=n, cpus_per_worker=args.threads)),
                log=lambda m: None)
        out[f"ray{n}_s"] = time.perf_counter() - t
    return out


def export_throughput(wh: Path, root: Path) -> dict[str, float]:
    s = export_parquet(wh, root / "export", progress=False)
    # the same data, already in memory, written by plain pyarrow
    with Warehouse(wh) as w:
        tables = {v.name: w.sql(f"SELECT * FROM {v.name}").to_arrow() for v in w.views()}
    plain = root / "plain"
    plain.mkdir()
    t = time.perf_counter()
    for name, tbl in tables.items():
        pq.write_table(tbl, plain / f"{name}.parquet", compression="zstd")
    t_plain = time.perf_counter() - t
    plain_bytes = sum(p.stat().st_size for p in plain.glob("*.parquet"))
    return {"export_mb": s.bytes / 2**20, "export_s": s.seconds, "export_mb_s": s.mb_per_s,
            "arrow_mb": plain_bytes / 2**20, "arrow_s": t_plain, "arrow_mb_s": plain_bytes / 2**20 / t_plain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--words", type=int, default=44, help="first N default words (x 2 templates)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (local run and each actor)")
    ap.add_argument("--ablation", default="zero", choices=["zero", "mean", "none"])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        os.environ.setdefault("RAY_worker_niceness", "0")  # as the local run (Ray's default is 15)
        ray.init(num_cpus=max(2, 2 * args.threads), include_dashboard=False, log_to_driver=False)
        try:
            t = time_runs(args, root)
        finally:
            ray.shutdown()
        e = export_throughput(root / "local", root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"args": vars(args), **{k: round(v, 3) for k, v in {**t, **e}.items()}}, indent=2))
    print(f"ray, 1 worker / local:  {t['ray1_s'] / t['local_s']:.3f}x   (target <= 1.10)")
    print(f"ray, 2 workers / local: {t['ray2_s'] / t['local_s']:.3f}x")
    print(f"export {e['export_mb_s']:.1f} MB/s vs plain Arrow write {e['arrow_mb_s']:.1f} MB/s: "
          f"export takes {e['export_s'] / e['arrow_s']:.2f}x the bare write")


if __name__ == "__main__":
    main()
