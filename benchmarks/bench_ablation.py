"""The zero-ablation grid of extract.stages.ablation.metrics on the embedded model: vs the naive loop and the FLOP bound.

For a few prompts (default: 4 words x the "repeat" template) and every layer and unit (9 heads,
the attention block and the MLP block of SmolLM2-135M), in one process:

- ours: ``extract.stages.ablation.stage`` (every group of the plan, shards written) into a temporary warehouse (numbers + shards), for
  all-position and for last-position ablation;
- naive: one hooked full HF forward per (prompt, layer, unit), all-position logits as common
  tooling returns them, plus the same summary numbers. Its cost does not depend on the layer or
  unit, so by default it is timed on ``--naive-units`` (layer, unit) pairs per prompt and
  scaled to the grid (``--naive-units 0`` runs it in full);
- bound: the FLOPs the grid needs (clean run with the shared prefix once; per ablated layer
  only the blocks from it on, the shared prefix once per template, at the last block only
  keys/values except at the last position, unembedding at the last position) divided by this
  machine's measured float32 matmul throughput on the model's largest product.

Targets: ours >= 5x faster than naive (all positions), >= 50x (last position), <= 3x the bound.

Usage: python benchmarks/bench_ablation.py [--words cat,dog,house,tree] [--naive-units 33]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from extract.config import ExtractConfig
from extract.models.loading import Adapter, load_model
from extract.stages.ablation.grid import GridSpec, shared_prefix
from extract.stages.ablation.metrics import summarise
from extract.stages.ablation.stage import AblationStage, ablate_group
from extract.stages.base import Loaded, PlanInput, write_shard
from extract.stages.prompts import Prompt, build_prompts
from store.warehouse import WarehouseWriter

TEMPLATE = "repeat the following word: {word}"


@contextmanager
def zero_one_unit(ad: Adapter, layer: int, unit: int, T: int, last_only: bool):
    """What common tooling does: a hook removing one unit from an unmodified forward."""
    H, hd = ad.arch.n_heads, ad.arch.head_dim
    sel = slice(T - 1, T) if last_only else slice(0, T)
    lay = ad.layers[layer]
    if unit < H:
        def pre(mod, args):
            x = args[0].clone()
            x[:, sel, unit * hd : (unit + 1) * hd] = 0
            return (x,)
        h = lay.self_attn.o_proj.register_forward_pre_hook(pre)
    elif unit == H:
        def post(mod, args, out):
            o = out[0].clone()
            o[:, sel] = 0
            return (o, *out[1:])
        h = lay.self_attn.register_forward_hook(post)
    else:
        def post_mlp(mod, args, out):
            o = out.clone()
            o[:, sel] = 0
            return o
        h = lay.mlp.register_forward_hook(post_mlp)
    try:
        yield
    finally:
        h.remove()


@torch.no_grad()
def naive(ad: Adapter, prompts: list[Prompt], last_only: bool, n_units: int,
          layers: Sequence[int] | None = None) -> tuple[float, int]:
    """Seconds for the naive grid over ``layers`` (default all; measured, or scaled from n_units
    pairs per prompt)."""
    U = ad.arch.n_heads + 2
    layers = list(range(ad.arch.n_layers)) if layers is None else list(layers)
    pairs = [(li, u) for li in layers for u in range(U)]
    n_grid = len(pairs)
    if n_units:
        pairs = random.Random(0).sample(pairs, min(n_units, len(pairs)))
    dev = ad.lm_head.weight.device
    _sync(dev)
    t0 = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p.input_ids], device=dev)
        clean = ad.model(ids).logits[0, -1].float()
        for li, u in pairs:
            with zero_one_unit(ad, li, u, p.n_tokens, last_only):
                logits = ad.model(ids).logits[0, -1:].float()
            summarise(logits, clean, p.candidates[0][1], 10)
    _sync(dev)
    dt = time.perf_counter() - t0
    return dt * n_grid / len(pairs), len(pairs) * len(prompts)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def ours(ad: Adapter, prompts: list[Prompt], positions: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        w = WarehouseWriter(Path(d))
        targets = {p.index: p.candidates[0][1] for p in prompts}
        cfg = ExtractConfig(out=Path(d), ablation=("zero",), ablate_positions=positions, top_k=10, progress=False)
        model = Loaded(cfg, ad, None, prompts, "bench")
        stage = AblationStage()
        t0 = time.perf_counter()
        spec = GridSpec(cfg.ablation, positions, tuple(range(ad.arch.n_layers)))
        for job in stage.plan(PlanInput(cfg, prompts, ad.arch, 32, w.done)):
            for shard in ablate_group(model, job, spec, None, targets, None, lambda n: None):
                write_shard(w, shard)
        return time.perf_counter() - t0


def matmul_gflops(ad: Adapter, n: int = 2048, reps: int = 20) -> float:
    """Measured GEMM throughput on the model's biggest per-layer product, on the model's device
    and in its dtype (float32 on the CPU)."""
    inter = ad.model.config.intermediate_size
    dev, dt = ad.lm_head.weight.device, ad.lm_head.weight.dtype
    a = torch.randn(n, ad.arch.d_model, device=dev, dtype=dt)
    b = torch.randn(inter, ad.arch.d_model, device=dev, dtype=dt)
    for _ in range(3):
        a @ b.T
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b.T
    _sync(dev)
    return 2 * n * ad.arch.d_model * inter * reps / (time.perf_counter() - t0) / 1e9


def grid_flops(ad: Adapter, prompts: list[Prompt], positions: str,
               layers: Sequence[int] | None = None) -> float:
    """FLOPs the zero grid over ``layers`` (default all) needs (see module docstring), matmuls only.

    Prompts of several templates: the clean prefix and the ablated prefix count once per template."""
    by_tpl: dict[int, list[Prompt]] = {}
    for p in prompts:
        by_tpl.setdefault(p.template_index, []).append(p)
    if len(by_tpl) > 1:
        return sum(grid_flops(ad, g, positions, layers) for g in by_tpl.values())
    a = ad.arch
    D, H, KV, hd, L, V = a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, a.n_layers, a.vocab_size
    inter = ad.model.config.intermediate_size
    U = H + 2
    f_kv = 2 * D * 2 * KV * hd
    f_q = 2 * D * H * hd
    f_o = 2 * H * hd * D
    f_mlp = 2 * 3 * D * inter

    def f_att(ctx: int) -> int:
        return 2 * 2 * H * hd * ctx

    def full(ctx: int) -> int:
        return f_kv + f_q + f_att(ctx) + f_o + f_mlp

    P = shared_prefix(prompts)
    total = 0
    # the clean run: prefix once, then each prompt's own positions
    total += sum(L * full(i + 1) for i in range(P))
    total += sum(L * full(i + 1) for p in prompts for i in range(P, p.n_tokens)) + len(prompts) * 2 * D * V
    for la in range(L) if layers is None else layers:
        if positions == "last":
            for p in prompts:
                T = p.n_tokens
                per = f_o + f_mlp + sum(full(T) for _ in range(la + 1, L))
                total += U * (per + 2 * D * V)
            continue
        rows_pre = range(P)
        for i in rows_pre:  # ablated prefix, once per template, per unit
            total += U * (f_o + f_mlp + sum(full(i + 1) for _ in range(la + 1, L - 1)) + (f_kv if la < L - 1 else 0))
        for p in prompts:
            T = p.n_tokens
            for i in range(P, T):
                last = i == T - 1
                tail = full(i + 1) if last else f_kv
                per = f_o + f_mlp + sum(full(i + 1) for _ in range(la + 1, L - 1)) + (tail if la < L - 1 else 0)
                total += U * per
            total += U * 2 * D * V
    return float(total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", default="cat,dog,house,tree")
    ap.add_argument("--naive-units", type=int, default=33,
                    help="(layer, unit) pairs per prompt the naive loop is timed on; 0 = all")
    args = ap.parse_args()
    model, tok, _ = load_model("smollm2-135m-instruct", device="cpu", progress=False)
    ad = Adapter(model)
    prompts = build_prompts(tok, args.words.split(","), (TEMPLATE,))
    L, U = ad.arch.n_layers, ad.arch.n_heads + 2
    gf = matmul_gflops(ad)
    print(f"SmolLM2-135M, {len(prompts)} prompts ({args.words}), {L} layers x {U} units, "
          f"{torch.get_num_threads()} threads; matmul throughput {gf:.0f} GFLOP/s")
    ok = True
    for positions, target in (("all", 5.0), ("last", 50.0)):
        t_ours = ours(ad, prompts, positions)
        t_naive, n_fwd = naive(ad, prompts, positions == "last", args.naive_units)
        flops = grid_flops(ad, prompts, positions)
        bound = flops / (gf * 1e9)
        speed = t_naive / t_ours
        vs_bound = t_ours / bound
        ok &= speed >= target and vs_bound <= 3.0
        print(f"[{positions:>4}] ours {t_ours:7.2f} s | naive {t_naive:8.1f} s ({n_fwd} hooked forwards timed"
              f"{', scaled to the grid' if args.naive_units else ''}) | speed-up {speed:6.1f}x (target >= {target:.0f}x)"
              f" | bound {bound:6.2f} s ({flops / 1e12:.2f} TFLOP), ours/bound {vs_bound:4.2f}x (target <= 3x)")
    print("PASS" if ok else "FAIL: a target was missed")


if __name__ == "__main__":
    main()
