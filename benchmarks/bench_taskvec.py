"""The batched task-vector interventions (extract.taskvec) against one hooked forward per intervention.

On the embedded SmolLM2, the first ``--vocab`` default words (even indices train, odd held out):
the train vectors are built once (not timed here: the naive way needs them too), then

- ours: ``extract.taskvec.run_rows`` over ``--words`` held-out words and every row of
  ``plan_interventions`` and ``plan_aie`` at the boundaries/blocks ``b % --every == 0`` (the
  engine's clean spines and its validation forward against the plain model included);
- naive: one hooked full HF forward per (row, word) (``logits_to_keep=1``, as a hook-based tool
  would run it), plus one clean forward per (prompt kind, word) for the reference. Its cost does
  not depend on the row, so ``--naive`` random rows are timed and the mean is scaled to the count
  (``--naive 0`` runs every row).

Target: ours >= 10x faster than naive.

Usage: python benchmarks/bench_taskvec.py [--words 2] [--every 3] [--naive 30] [--vocab 12]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from extract.models import Adapter, load_model
from extract.prompts import default_words
from extract.taskvec import (
    build_set,
    build_vectors,
    edit_for,
    function_vectors,
    plan_aie,
    plan_interventions,
    run_rows,
)
from extract.taskvec.interventions import Row
from store.taskvec_schema import Method, Where


def _hook(ad: Adapter, row: Row, edit, start: int):
    """One forward hook applying ``row`` to an unmodified HF forward."""
    if row.method == Method.HEAD_MEAN:
        hd = ad.arch.head_dim
        cols = slice(row.head * hd, (row.head + 1) * hd)

        def pre_o(mod, args):
            x = args[0].clone()
            x[:, -1, cols] = edit.z
            return (x,)

        return ad.o_proj(row.layer).register_forward_pre_hook(pre_o)

    def change(x):
        x = x.clone()
        old = x[:, start:]
        x[:, start:] = old.clone() if row.method == Method.SELF_PATCH else edit.add.expand_as(old) \
            if row.method == Method.TASK_VECTOR else old + edit.add
        return x

    return ad.layers[row.layer].register_forward_pre_hook(
        lambda m, a, kw: ((change(a[0]), *a[1:]), kw) if a else (a, {**kw, "hidden_states": change(kw["hidden_states"])}),
        with_kwargs=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--words", type=int, default=2, help="held-out words to run")
    ap.add_argument("--every", type=int, default=3, help="boundaries/blocks b with b %% every == 0")
    ap.add_argument("--naive", type=int, default=30, help="naive rows timed (0 = all)")
    ap.add_argument("--vocab", type=int, default=12, help="first default words making the split")
    args = ap.parse_args()
    model, tok, _ = load_model("smollm2-135m-instruct", device="cpu", progress=False)
    ad = Adapter(model)
    a = ad.arch
    ps = build_set(tok, default_words()[: args.vocab])
    vec = build_vectors(ad, ps)
    fv = function_vectors(vec, torch.zeros(a.n_layers, a.n_heads))
    held = ps.split.held_out[: args.words]
    rows = [r for r in plan_interventions(a.n_layers) + plan_aie(a.n_layers, a.n_heads) if r.layer % args.every == 0]
    kinds = {r.kind for r in rows}
    n = len(rows) * len(held)
    print(f"SmolLM2, {len(held)} held-out words x {len(rows)} rows = {n} interventions "
          f"(+ {len(kinds) * len(held)} clean references), torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    run_rows(ad, ps, held, rows, vec, fv)
    ours = time.perf_counter() - t0

    rng = random.Random(0)
    pairs = [(r, w) for r in rows for w in held]
    sample = pairs if args.naive == 0 else rng.sample(pairs, min(args.naive, len(pairs)))
    t0 = time.perf_counter()
    with torch.no_grad():
        for row, w in sample:
            p = ps.get(row.kind, w)
            start = p.verb_pos if row.where == Where.FROM_VERB else p.n_tokens - 1
            h = _hook(ad, row, edit_for(row, vec, fv), start)
            try:
                model(input_ids=torch.tensor([p.prompt.input_ids]), logits_to_keep=1)
            finally:
                h.remove()
    per = (time.perf_counter() - t0) / len(sample)
    naive = per * (n + len(kinds) * len(held))
    print(f"ours  {ours:8.1f} s  ({1e3 * ours / n:.1f} ms per intervention)")
    print(f"naive {naive:8.1f} s  ({1e3 * per:.1f} ms per hooked forward, {len(sample)} timed, scaled)")
    print(f"speed-up {naive / ours:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
