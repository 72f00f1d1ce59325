"""The ablation grid on the embedded model: ours vs the naive loop, and vs the FLOP bound.

For a few prompts (default: 2 words x 2 templates) and every layer and unit (9 heads + the
attention block + the MLP block of SmolLM2-135M), in one process:

- naive: one hooked full forward per (prompt, layer, unit), as common tooling does;
- ours: extract.ablate (clean residual reused, units batched, template prefix shared,
  clean KV cache reused for last-position ablation);
- bound: the FLOPs the grid needs (only the blocks after the ablated one, only the positions
  that change, the shared prefix once per template) / this machine's measured matmul
  throughput on a large float32 product.

Prints ratios. Targets: ours >= 5x faster than naive for all-position ablation, >= 50x for
last-position, and within 3x of the FLOP bound.

Usage: python benchmarks/bench_ablation.py [--words cat,dog] [--repeat 1]
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch

from extract.ablate import GridSpec, ablate_group, clean_run, prompt_groups, shared_prefix
from extract.models import Adapter, load_model
from extract.prompts import build_prompts

TEMPLATES = ("repeat the following word: {word}", "echo the following word: {word}")


@contextmanager
def zero_one_unit(adapter: Adapter, layer: int, unit: int, T: int, last_only: bool):
    a = adapter.arch
    H, hd = a.n_heads, a.head_dim
    sel = slice(T - 1, T) if last_only else slice(0, T)
    lay = adapter.layers[layer]
    if unit < H:
        def pre(mod, args):
            x = args[0].clone()
            x[:, sel, unit * hd:(unit + 1) * hd] = 0
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
def naive(adapter: Adapter, prompts, last_only: bool) -> float:
    a = adapter.arch
    t = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p.input_ids])
        for layer in range(a.n_layers):
            for unit in range(a.n_heads + 2):
                with zero_one_unit(adapter, layer, unit, p.n_tokens, last_only):
                    adapter.model(ids, logits_to_keep=1)
    return time.perf_counter() - t


def ours(adapter: Adapter, prompts, positions: str) -> float:
    spec = GridSpec(("zero",), positions, tuple(range(adapter.arch.n_layers)))
    t = time.perf_counter()
    for g in prompt_groups(prompts, 16):
        clean = clean_run(adapter, torch.tensor([p.input_ids for p in g]))
        ablate_group(adapter, g, clean, spec, None)
    return time.perf_counter() - t


def grid_flops(adapter: Adapter, prompts, positions: str) -> float:
    """Dense FLOPs the grid needs: blocks after the ablated one, changed positions only."""
    a = adapter.arch
    cfg = adapter.model.config
    D, I, V = a.d_model, cfg.intermediate_size, a.vocab_size
    qo = 2 * D * a.n_heads * a.head_dim
    kv = 2 * D * a.n_kv_heads * a.head_dim
    per_token_block = 2 * (qo + kv + 3 * D * I)  # multiply-adds x 2

    def attn(ctx: int) -> int:
        return 4 * a.n_heads * a.head_dim * ctx

    U = a.n_heads + 2
    total = 0.0
    for g in prompt_groups(prompts, 16):
        T = g[0].n_tokens
        P = shared_prefix(g) if positions == "all" else T - 1
        for layer in range(a.n_layers):
            blocks = a.n_layers - layer
            if positions == "all":
                total += U * blocks * sum(per_token_block + attn(i + 1) for i in range(P))
            run = range(P, T)
            total += len(g) * U * blocks * sum(per_token_block + attn(i + 1) for i in run)
            total += len(g) * U * 2 * D * V  # unembedding of the last position
    return total


def matmul_throughput(repeat: int = 20) -> float:
    """FLOP/s of a large float32 matmul on this machine (a generous bound for our shapes)."""
    x = torch.randn(2048, 576)
    w = torch.randn(576, 1536)
    for _ in range(3):
        x @ w
    t = time.perf_counter()
    for _ in range(repeat):
        x @ w
    dt = time.perf_counter() - t
    return repeat * 2 * 2048 * 576 * 1536 / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--words", default="cat,dog")
    ap.add_argument("--positions", default="all,last", help="all, last or all,last")
    args = ap.parse_args()
    model, tok, _ = load_model("smollm2-135m-instruct", progress=False)
    adapter = Adapter(model)
    prompts = build_prompts(tok, args.words.split(","), TEMPLATES)
    a = adapter.arch
    print(f"grid: {len(prompts)} prompts x {a.n_layers} layers x {a.n_heads + 2} units "
          f"({a.n_heads} heads + attention block + MLP block), zero ablation")
    peak = matmul_throughput()
    print(f"matmul throughput (2048x576 @ 576x1536, float32): {peak / 1e9:.1f} GFLOP/s")
    targets = {"all": 5.0, "last": 50.0}
    for positions in args.positions.split(","):
        t_ours = ours(adapter, prompts, positions)
        t_naive = naive(adapter, prompts, positions == "last")
        bound = grid_flops(adapter, prompts, positions) / peak
        print(f"{positions:>4}-position: naive {t_naive:7.2f}s  ours {t_ours:6.2f}s  -> "
              f"{t_naive / t_ours:6.1f}x faster (target >= {targets[positions]:g}x); "
              f"FLOP bound {bound:6.3f}s -> ours / bound {t_ours / bound:5.2f} (target <= 3)",
              flush=True)


if __name__ == "__main__":
    main()
