"""The study at the real model's size: extraction + the zero-ablation grid on Qwen2.5 shapes.

For each shape (default: Qwen2.5-0.5B-Instruct and Qwen2.5-1.5B-Instruct, exact published
configs, seeded random weights from ``extract.models.scale``, the real Qwen tokenizer and chat
template), in a child process of its own (so peak RSS is that shape's):

- the pipeline: ``extract.pipeline.run.extract`` on a few prompts (``--words`` x the "repeat" template)
  with the zero grid on ``--layers`` (default: the last 2, or ``all``) into a temporary warehouse;
  prints per-prompt extraction and ablation time, peak RSS (and peak GPU memory on cuda),
  warehouse bytes per prompt (prompt shards + ablation shards; the grid's part scaled to all
  layers);
- the projection for the 88-prompt study (44 default words x 2 templates, every layer): the
  extraction per prompt x 88, the grid scaled by its FLOP count (``bench_ablation.grid_flops``
  over the 88 real prompts and all layers / over what was measured), plus the load;
- ours / FLOP lower bound: the grid's time / (its FLOPs / this device's measured GEMM throughput
  in the run's dtype);
- ours / naive: the grid's time vs one hooked full forward per (prompt, layer, unit), timed on
  ``--naive-units`` pairs per prompt and scaled to the measured grid.

``--device cuda --dtype bfloat16`` runs the same on a GPU (batch and chunk sizes come from the
device: ``extract.models.sizing``). On a CPU, float32 (the tool's default; its throughput is measured in
float32 too).

Usage: python benchmarks/bench_scale.py [--models qwen2.5-1.5b-instruct] [--words cat,dog]
       [--layers 26,27|all] [--device cpu|cuda] [--dtype float32|bfloat16] [--naive-units 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ablation import grid_flops, matmul_gflops, naive  # noqa: E402

from extract.config import DEFAULT_TEMPLATES, ExtractConfig  # noqa: E402
from extract.models.loading import Adapter, cache_root, load_model  # noqa: E402
from extract.models.scale import SCALE_MODELS, build_scale_model  # noqa: E402
from extract.models.sizing import sizes  # noqa: E402
from extract.pipeline.run import extract  # noqa: E402
from extract.stages.prompts import build_prompts, default_words  # noqa: E402

TEMPLATE = DEFAULT_TEMPLATES[0]
STUDY_PROMPTS = 88


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.h5"))


def measure(name: str, words: list[str], layers: list[int] | None, device: str, dtype: str,
            naive_units: int) -> dict:
    """One shape, in this process: the pipeline, then the naive loop and the throughput."""
    folder = build_scale_model(name, cache_root() / "scale" / f"{name}-seed0", progress=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w"
        cfg = ExtractConfig(out=out, model=str(folder), dtype=dtype, device=device,
                            store_dtype="bfloat16" if dtype == "bfloat16" else "float32",
                            words=tuple(words), templates=(TEMPLATE,), ablation=("zero",),
                            ablate_layers=tuple(layers) if layers is not None else None, progress=False)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        s = extract(cfg, log=lambda m: None)
        if s.failed:
            raise SystemExit(f"{name}: invariants failed: {s.failed}")
        n = s.n_prompts
        t = s.timings
        prompt_bytes = _dir_bytes(out / "prompts") / n
        abl_bytes = _dir_bytes(out / "ablation") / n
        model_bytes = (out / "model.h5").stat().st_size
    peak_gpu = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    model, tok, _ = load_model(str(folder), dtype=dtype, device=device, progress=False)
    ad = Adapter(model)
    L = ad.arch.n_layers
    lay = list(range(L)) if layers is None else layers
    prompts = build_prompts(tok, words, (TEMPLATE,))
    study = build_prompts(tok, default_words(), DEFAULT_TEMPLATES)
    assert len(study) == STUDY_PROMPTS
    f_meas = grid_flops(ad, prompts, "all", lay)
    f_study = grid_flops(ad, study, "all", None)
    gf = matmul_gflops(ad)
    t_naive, n_fwd = naive(ad, prompts, False, naive_units, lay)
    sz = sizes(ad)
    return {
        "model": name, "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "n_layers": L, "units": ad.arch.n_heads + 2, "layers": lay, "prompts": n, "words": words,
        "tokens": [p.n_tokens for p in prompts],
        "load_s": t["load_s"], "extract_s_per_prompt": t["extract_s"] / n,
        "ablation_s": t["ablation_s"], "ablation_s_per_prompt_layer": t["ablation_s"] / n / len(lay),
        "peak_rss_gib": rss / 2**30, "peak_gpu_gib": peak_gpu / 2**30,
        "prompt_bytes": prompt_bytes, "ablation_bytes_per_layer": abl_bytes / len(lay),
        "model_file_bytes": model_bytes,
        "gflops": gf, "grid_tflop": f_meas / 1e12, "bound_s": f_meas / (gf * 1e9),
        "naive_s": t_naive, "naive_forwards_timed": n_fwd,
        "study_grid_tflop": f_study / 1e12,
        "proj_extract_s": t["extract_s"] / n * STUDY_PROMPTS,
        "proj_ablation_s": t["ablation_s"] * f_study / f_meas,
        "proj_bytes": STUDY_PROMPTS * (prompt_bytes + abl_bytes / len(lay) * L) + model_bytes,
        "sizes": {"rows_per_pass": sz.rows_per_pass, "wave_prompts": sz.wave_prompts,
                  "extract_batch": sz.extract_batch, "source": sz.source},
    }


def report(r: dict) -> None:
    gib = 2**30
    print(f"\n== {r['model']} ({r['n_layers']} layers x {r['units']} units) on {r['device']}"
          f"{' (' + r['gpu'] + ')' if r['gpu'] else ''}, {r['dtype']}, {r['threads']} threads; "
          f"{r['prompts']} prompts ({','.join(r['words'])}; {r['tokens']} tokens), ablated layers "
          f"{r['layers'] if len(r['layers']) < r['n_layers'] else 'all'}; sizes {r['sizes']}")
    print(f"load {r['load_s']:.1f} s | extraction {r['extract_s_per_prompt']:.2f} s/prompt | zero grid "
          f"{r['ablation_s']:.1f} s ({r['ablation_s_per_prompt_layer']:.2f} s per prompt and layer)")
    print(f"peak RSS {r['peak_rss_gib']:.2f} GiB" + (f" | peak GPU {r['peak_gpu_gib']:.2f} GiB" if r['device'] == 'cuda' else ""))
    print(f"warehouse per prompt: {r['prompt_bytes'] / 1e6:.2f} MB shard + {r['ablation_bytes_per_layer'] / 1e3:.1f} kB "
          f"grid per layer; model.h5 {r['model_file_bytes'] / 1e6:.1f} MB once")
    print(f"grid: ours {r['ablation_s']:.1f} s | bound {r['bound_s']:.2f} s ({r['grid_tflop']:.2f} TFLOP at "
          f"{r['gflops']:.0f} GFLOP/s) -> ours/bound {r['ablation_s'] / r['bound_s']:.2f}x | naive "
          f"{r['naive_s']:.1f} s ({r['naive_forwards_timed']} hooked forwards timed, scaled) -> speed-up "
          f"{r['naive_s'] / r['ablation_s']:.1f}x")
    total = r["load_s"] + r["proj_extract_s"] + r["proj_ablation_s"]
    print(f"projection, 88-prompt study with the full grid ({r['study_grid_tflop']:.1f} TFLOP): extraction "
          f"{r['proj_extract_s'] / 60:.1f} min + grid {r['proj_ablation_s'] / 60:.1f} min + load "
          f"{r['load_s'] / 60:.1f} min = {total / 60:.1f} min ({total / 3600:.2f} h); warehouse "
          f"{r['proj_bytes'] / gib:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(SCALE_MODELS),
                    help=f"comma-separated shapes from {', '.join(SCALE_MODELS)}")
    ap.add_argument("--words", default="cat,dog", help="words of the measured prompts")
    ap.add_argument("--layers", default="last2",
                    help="ablated layers: last2 (default), all, or 0-based numbers like 26,27")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--naive-units", type=int, default=4,
                    help="(layer, unit) pairs per prompt the naive loop is timed on; 0 = all")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: measure one shape, print JSON
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    words = args.words.split(",")
    if args.one:
        n_layers = json.loads(Path(build_scale_model(args.one, cache_root() / "scale" / f"{args.one}-seed0")
                                   / "config.json").read_text())["num_hidden_layers"]
        layers = (None if args.layers == "all" else [n_layers - 2, n_layers - 1] if args.layers == "last2"
                  else [int(x) for x in args.layers.split(",")])
        r = measure(args.one, words, layers, args.device, dtype, args.naive_units)
        print("RESULT " + json.dumps(r))
        return
    results = []
    for name in args.models.split(","):
        if name not in SCALE_MODELS:
            raise SystemExit(f"unknown shape {name!r}; choose from {', '.join(SCALE_MODELS)}")
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", name, "--words", args.words, "--layers", args.layers,
               "--device", args.device, "--dtype", dtype, "--naive-units", str(args.naive_units)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"{name}: the measuring child failed (exit {proc.returncode})")
        r = json.loads(lines[-1][len("RESULT "):])
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        report(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
