"""The patching grid of extract.stages.patching.metrics on the embedded model: vs hooked forwards and the FLOP bound.

For one word pair ("cat" under the first two default templates, both directions by default) and
every patch of extract.stages.patching.grid.plan (residual per boundary and position, attention and MLP
blocks per layer and position, heads at all positions and per position), in one process:

- ours: ``extract.stages.patching.grid.run_patches`` (the batched grid; the two clean records and the
  attribution backward are timed apart);
- naive: one hooked full HF forward per patch (what common tooling does), the source's
  activations captured once per hook point (one source forward per distinct point, shared by
  every patch there). Its cost does not depend on the patch, so the mean capture and the mean
  patched forward are timed on ``--naive`` random patches and scaled to the grid's counts
  (``--naive 0`` runs every patch);
- bound: the FLOPs the grid needs -- per patch, every block from its own on at the positions from
  its own on (projections, MLP, attention against the earlier keys), plus the unembedding at the
  last position -- divided by this machine's measured float32 matmul throughput on the model's
  largest product (the MLP's up projection at the grid's row count).

Targets: ours >= 10x faster than naive; ours <= 2x the bound.

Usage: python benchmarks/bench_patching.py [--word cat] [--naive 40] [--directions 0,1] [--every 1]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from extract.models.loading import Adapter, load_model
from extract.stages.patching.grid import Patch, plan, record, run_patches
from extract.stages.patching.pairs import align, build_pairs
from extract.stages.prompts import build_prompts
from store.schema import PatchKind as K

TEMPLATES = ("repeat the following word: {word}", "echo the following word: {word}")


def _point(ad: Adapter, pt: Patch):
    if pt.kind in (K.RESID, K.RESID_ALL):
        return (ad.final_norm if pt.layer == ad.arch.n_layers else ad.layers[pt.layer]), "pre"
    if pt.kind in (K.HEAD, K.HEAD_ALL):
        return ad.o_proj(pt.layer), "pre_o"
    if pt.kind == K.ATTN:
        mod, tup = ad.attn_point(pt.layer)
        return mod, "post_tuple" if tup else "post"
    return ad.mlp_point(pt.layer), "post"


def _hook(ad: Adapter, pt: Patch, fn):
    mod, how = _point(ad, pt)
    if how == "pre":
        return mod.register_forward_pre_hook(
            lambda m, a, kw: ((fn(a[0]), *a[1:]), kw) if a else (a, {**kw, "hidden_states": fn(kw["hidden_states"])}),
            with_kwargs=True)
    if how == "pre_o":
        return mod.register_forward_pre_hook(lambda m, a: (fn(a[0]),))
    if how == "post_tuple":
        return mod.register_forward_hook(lambda m, a, out: (fn(out[0]), *out[1:]))
    return mod.register_forward_hook(lambda m, a, out: fn(out))


def _key(ad: Adapter, pt: Patch) -> tuple:
    mod, how = _point(ad, pt)
    return how, pt.layer, id(mod)


def _forward(ad: Adapter, ids, pt: Patch | None = None, fn=None) -> float:
    """Seconds of one full HF forward of ``ids`` (last-position logits), with ``fn`` hooked at
    ``pt``'s point if given (the hook's registration and removal included)."""
    t0 = time.perf_counter()
    h = _hook(ad, pt, fn) if fn is not None else None
    ad.model(torch.tensor([ids]), logits_to_keep=1)
    if h is not None:
        h.remove()
    return time.perf_counter() - t0


@torch.no_grad()
def naive(ad: Adapter, src_ids, dst_ids, pts: list[Patch]) -> tuple[float, float]:
    """Mean seconds of (one source capture at a hook point, one hooked patched forward)."""
    hd = ad.arch.head_dim
    cache: dict[tuple, torch.Tensor] = {}
    t_cap = t_fwd = 0.0
    for pt in pts:
        if pt.kind == K.NOTHING:
            t_fwd += _forward(ad, dst_ids)
            continue
        key = _key(ad, pt)
        if key not in cache:
            got: dict[str, torch.Tensor] = {}

            def read(x, got=got):
                got["x"] = x[0].clone()
                return x

            t_cap += _forward(ad, src_ids, pt, read)
            cache[key] = got["x"]
        s = cache[key]
        sl = slice(pt.head * hd, (pt.head + 1) * hd) if pt.head >= 0 else slice(None)

        def write(x, pt=pt, s=s, sl=sl):
            x = x.clone()
            for t, j in zip(pt.dst, pt.src, strict=True):
                x[0, t, sl] = s[j, sl]
            return x

        t_fwd += _forward(ad, dst_ids, pt, write)
    return t_cap / max(len(cache), 1), t_fwd / len(pts)


def bound_flops(ad: Adapter, pts: list[Patch], T: int) -> float:
    """FLOPs the grid cannot avoid (module docstring)."""
    a = ad.arch
    D, H, KV, hd = a.d_model, a.n_heads, a.n_kv_heads, a.head_dim
    ff = ad.layers[0].mlp.up_proj.out_features if hasattr(ad.layers[0].mlp, "up_proj") else 4 * D
    proj = 2 * D * (H * hd + 2 * KV * hd) + 2 * H * hd * D + 2 * 3 * D * ff  # per position per block
    total = 0.0
    for pt in pts:
        p = pt.start
        for _m in range(pt.start_layer, a.n_layers):
            for t in range(p, T):
                total += proj + 4 * H * hd * (t + 1)  # scores and weighted values against t+1 keys
        total += 2 * D * a.vocab_size  # unembedding at the last position
    return total


def matmul_flops_per_s(D: int, ff: int, rows: int) -> float:
    x, w = torch.randn(rows, D), torch.randn(D, ff)
    for _ in range(3):
        x @ w
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        x @ w
        n += 1
    return 2 * rows * D * ff * n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--word", default="cat")
    ap.add_argument("--naive", type=int, default=40, help="patches the naive loop is timed on (0 = all)")
    ap.add_argument("--directions", default="0,1")
    ap.add_argument("--every", type=int, default=1,
                    help="time every N-th patch of the plan only (1 = the whole grid; larger is quicker and "
                         "conservative for ours, whose batches get smaller)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, _ = load_model(args.model, device="cpu", progress=False)
    ad = Adapter(model)
    prompts = build_prompts(tok, [args.word], TEMPLATES)
    pr = build_pairs(prompts, [(0, 1)])[0]
    rope = ad.rope(max(pr.a.n_tokens, pr.b.n_tokens))
    rng = random.Random(0)
    a = ad.arch
    ff = ad.layers[0].mlp.up_proj.out_features
    speed = matmul_flops_per_s(a.d_model, ff, 2048)
    for r in (int(x) for x in args.directions.split(",")):
        s, d = pr.direction(r)
        al = align(d, s)
        pts = plan(a.n_layers, a.n_heads, al.dst_to_src, al.shared_prefix, d.input_ids, s.input_ids)[:: args.every]
        t0 = time.perf_counter()
        src, _ = record(ad, s.input_ids, rope)
        dst, _ = record(ad, d.input_ids, rope)
        t_rec = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_patches(ad, dst, src, pts, rope)
        t_grid = time.perf_counter() - t0
        t0 = time.perf_counter()
        record(ad, d.input_ids, rope, grad=True, ld=lambda lg: lg[0] - lg[1])
        t_attr = time.perf_counter() - t0
        sample = pts if args.naive <= 0 or args.naive >= len(pts) else rng.sample(pts, args.naive)
        per_cap, per_fwd = naive(ad, s.input_ids, d.input_ids, sample)
        n_points = len({_key(ad, pt) for pt in pts if pt.kind != K.NOTHING})
        t_naive = per_cap * n_points + per_fwd * len(pts)  # each hook point captured once, every patch run
        t_bound = bound_flops(ad, pts, d.n_tokens) / speed
        print(f"direction {r}: {len(pts)} patches, T={d.n_tokens}, shared prefix {al.shared_prefix}")
        print(f"  ours: grid {t_grid:.2f}s (+ clean records {t_rec:.2f}s, attribution backward {t_attr:.2f}s)")
        print(f"  naive: {per_fwd * 1e3:.0f} ms per hooked forward, {per_cap * 1e3:.0f} ms per capture at {n_points} points "
              f"({len(sample)} patches timed, scaled to {len(pts)}): {t_naive:.2f}s "
              f"-> speed-up {t_naive / t_grid:.1f}x (target >= 10x)")
        print(f"  FLOP bound at {speed / 1e9:.1f} GFLOP/s: {t_bound:.2f}s -> ours / bound {t_grid / t_bound:.2f}x "
              f"(target <= 2x)")


if __name__ == "__main__":
    main()
