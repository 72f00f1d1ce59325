"""The circuits engine (extract.stages.circuits) on one pair: vs one hooked HF forward(+backward) per step.

For one word pair (``--word`` and its partner under the first template, raw prompts), in one process:

- EAP-IG scores: ours = ``score_pairs`` (rows (metric, step) batched, one backward per step set;
  IG on inputs, and on activations, m = ``--steps``), against the naive loop -- one hooked HF
  forward + backward per step (and per group for activations), hooks giving every downstream
  input its own copy (tests/extract/hooked_circuits.py, the tests' reference), and against
  the floor of any hook-based tool: one plain HF forward + backward per step.
- The faithfulness sweep: ours = ``evaluate_pair`` (one batch row per circuit size) against one
  hooked forward per circuit (the reference's ``circuit_logits``).

Naive costs are timed on ``--naive`` steps / circuits and scaled to the full counts. FLOPs are
counted by torch.utils.flop_counter (matmuls) with ``--flops`` (the counter slows every op, so
time without it). No asserts: it prints. Run with OMP_NUM_THREADS=1 on a shared machine
(small matmuls are ~30x slower when threads are oversubscribed).

Usage: python benchmarks/bench_circuits.py [--model smollm2-135m-instruct] [--word cat] [--steps 5] [--naive 3] [--flops]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from extract.models.families import Adapter
from extract.models.loading import load_model, resolve_model
from extract.stages.circuits.faithfulness import SIZES, evaluate_pair, select
from extract.stages.circuits.graph import graph_of
from extract.stages.circuits.pairs import word_pairs
from extract.stages.circuits.scores import METHODS, METRICS, score_pairs
from extract.stages.prompts import build_prompts
from tests.extract import hooked_circuits as hc

WORDS = ("cat", "dog", "house", "tree", "water", "music", "bread", "ocean")


FLOPS = False  # --flops: count matmul FLOPs (torch.utils.flop_counter), which slows every op


def timed(fn):
    """(seconds, matmul FLOPs or NaN, result) of one call."""
    if not FLOPS:
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, float("nan"), out
    fc = FlopCounterMode(display=False)
    t = time.perf_counter()
    with fc:
        out = fn()
    return time.perf_counter() - t, fc.get_total_flops(), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--word", default="cat")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--naive", type=int, default=3, help="naive steps / circuits timed, then scaled")
    ap.add_argument("--flops", action="store_true", help="count FLOPs (times then include the counter's overhead)")
    args = ap.parse_args()
    global FLOPS
    FLOPS = args.flops
    torch.set_grad_enabled(False)
    path, _ = resolve_model(args.model, progress=False)
    model, tok, _ = load_model(path, device="cpu", progress=False)
    ad = Adapter(model)
    g = graph_of(ad.arch)
    words = [args.word] + [w for w in WORDS if w != args.word]
    prompts = build_prompts(tok, words, ("repeat the following word: {word}",), chat=False)
    pair = word_pairs(prompts[:]).pairs[0]
    T, m, L = pair.n_tokens, args.steps, ad.arch.n_layers
    print(f"model {args.model}: L={L} H={ad.arch.n_heads} KV={ad.arch.n_kv_heads}, {g.n_edges} edges; "
          f"pair {pair.clean.word!r} -> {pair.corrupted.word!r}, T={T}, m={m}")

    s_eap, f_eap, _ = timed(lambda: score_pairs(ad, [pair], steps=1, methods=("eap",), check=False))
    s_in, f_in, _ = timed(lambda: score_pairs(ad, [pair], steps=m, methods=("eap", "eap_ig_inputs"), check=False))
    s_all, f_all, ps = timed(lambda: score_pairs(ad, [pair], steps=m, methods=METHODS, check=False))
    ps = ps[0]
    hk = hc.Hooked(model)
    clean = list(pair.clean.input_ids)
    lp = torch.log_softmax(torch.zeros(ad.arch.vocab_size, dtype=torch.float64), -1)

    def M(lg):
        return hc.metric(lg, "ld", (ps.t_clean, ps.t_corr), lp)

    n = args.naive
    with torch.enable_grad():
        s_hook, f_hook, _ = timed(lambda: [hc.grads(hk, clean, M) for _ in range(n)])

        def plain():
            for _ in range(n):
                e = model.model.embed_tokens(torch.tensor([clean])).detach().requires_grad_(True)
                M(model(inputs_embeds=e, logits_to_keep=1).logits[0, -1]).backward()

        s_plain, f_plain, _ = timed(plain)
    per_hook, per_plain = s_hook / n, s_plain / n
    fh, fp = f_hook / n, f_plain / n
    # naive step counts per metric: eap 1; IG inputs m; IG activations m per group (2L, the input
    # group's forwards are IG-inputs'); both metrics
    counts = {"eap": 1, "eap_ig_inputs": m, "all three": 1 + m + 2 * L * m}
    ours = {"eap": (s_eap, f_eap), "eap_ig_inputs": (s_in, f_in), "all three": (s_all, f_all)}
    print("\nscores (both metrics)      ours s   naive-hooked s  plain-fwd+bwd s  | FLOP ratio naive/ours  plain/ours")
    for k, c in counts.items():
        so, fo = ours[k]
        c2 = 2 * c
        print(f"  {k:<22} {so:8.2f} {c2 * per_hook:14.2f} {c2 * per_plain:15.2f}   | "
              f"{c2 * fh / fo:10.2f} {c2 * fp / fo:10.2f}")

    s_f, f_f, pc = timed(lambda: evaluate_pair(ad, ps, n_top=0, n_random=0))
    rows = 2 + len(METHODS) * len(METRICS) * 2 * (len(SIZES) - 2)
    ox = hk.run(torch.tensor([list(pair.corrupted.input_ids)]), lambda d, o: 0)[1][0]
    cuts = [int(x) for x in pc.n_edges[1:-1][:n]]

    def naive_circuits():
        for k in cuts:
            inside = np.zeros(g.n_edges, bool)
            inside[select(ps.scores[0, 0], k, "abs", 1.0)] = True
            hc.circuit_logits(hk, clean, ox, torch.as_tensor(g.matrix(inside)))

    s_nc, f_nc, _ = timed(naive_circuits)
    print(f"\nfaithfulness sweep: {rows} circuits (+ per-kind edge sample off); ours {s_f:.2f} s, "
          f"naive {rows * s_nc / len(cuts):.2f} s (one hooked forward per circuit, {s_nc / len(cuts):.3f} s each); "
          f"FLOP ratio naive/ours {rows * f_nc / len(cuts) / f_f:.2f}")
    print(f"CPR (eap_ig_inputs, ld, abs, patch) {pc.cpr[1, 0, 0, 0]:.3f}; CMD {pc.cmd[1, 0, 0, 0]:.3f}; "
          f"f by size {np.round(pc.faithfulness[1, 0, 0, 0], 3).tolist()}")
    print(f"metrics {METRICS}; invariants: full {pc.full_err.max():.2e}, empty {pc.empty_err.max():.2e}")


if __name__ == "__main__":
    main()
