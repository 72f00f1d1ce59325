"""The whole study in order, and its summaries: the public entry a pipeline stage calls.

``run_study``: prompt set -> train vectors -> AIE rows on held-out words -> FV_k -> every other
intervention on held-out words -> accuracy per (method, kind, boundary, k/c, positions), clean
baselines per kind, cosines. Each phase is also callable on its own (``build_vectors``,
``run_rows`` with ``plan_aie`` / ``plan_interventions``, ``aie_table``, ``function_vectors``), so a
stage can write and resume per held-out word (store.taskvec_schema's layout).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from extract.families import Adapter
from extract.taskvec.interventions import Row, WordResult, plan_aie, plan_interventions, run_rows
from extract.taskvec.prompts import N_DEMOS, PromptSet, build_set
from extract.taskvec.vectors import (
    FunctionVectors,
    Vectors,
    build_vectors,
    cosines,
    function_vectors,
)
from store.taskvec_schema import COEFFICIENTS, FV_KS, Kind, Method


def aie_table(results: dict[str, WordResult], n_layers: int, n_heads: int) -> torch.Tensor:
    """(L, H) AIE: mean over words of P(target | head mean) - P(target | shuffled), clean."""
    per_word = []
    for r in results.values():
        base = r.clean[Kind.SHUFFLED][1]
        eff = np.zeros((n_layers, n_heads), np.float64)
        for q, row in enumerate(r.rows):
            assert row.method == Method.HEAD_MEAN
            eff[row.layer, row.head] = float(r.target_prob[q]) - base
        per_word.append(eff)
    return torch.tensor(np.mean(per_word, 0), dtype=torch.float32)


@dataclass(frozen=True)
class Accuracy:
    """Echo accuracy of one (row) over the held-out words, and its mean target probability."""

    row: Row
    n_words: int
    accuracy: float
    mean_target_prob: float


def accuracy(results: dict[str, WordResult]) -> list[Accuracy]:
    """Per row: mean echo-correct top-1 over the words (every word runs every row)."""
    acc: dict[Row, list[tuple[bool, float]]] = defaultdict(list)
    for r in results.values():
        for q, row in enumerate(r.rows):
            acc[row].append((bool(r.echo_correct[q]), float(r.target_prob[q])))
    return [Accuracy(row, len(v), float(np.mean([e for e, _ in v])), float(np.mean([p for _, p in v])))
            for row, v in acc.items()]


def baselines(results: dict[str, WordResult]) -> dict[Kind, float]:
    """Clean echo accuracy per prompt kind over the words."""
    out: dict[Kind, list[bool]] = defaultdict(list)
    for r in results.values():
        for k, ref in r.clean.items():
            out[k].append(ref[4])
    return {k: float(np.mean(v)) for k, v in sorted(out.items())}


@dataclass
class StudyResult:
    prompts: PromptSet
    vectors: Vectors
    fv: FunctionVectors
    aie_rows: dict[str, WordResult]
    rows: dict[str, WordResult]
    accuracy: list[Accuracy]
    baselines: dict[Kind, float]
    cosine: np.ndarray  # (CV, B)
    seconds: dict[str, float]


def run_study(ad: Adapter, tok, words: list[str], *, chat: bool = True, system_prompt: str | None = None,
              n_demos: int = N_DEMOS, ks: tuple[int, ...] = FV_KS,
              coefs: tuple[float, ...] = COEFFICIENTS, log=lambda msg: None) -> StudyResult:
    """Every phase on ``words`` (even indices train, odd held out)."""
    a = ad.arch
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    ps = build_set(tok, words, n_demos=n_demos, chat=chat, system_prompt=system_prompt)
    held = ps.split.held_out
    vec = build_vectors(ad, ps)
    t["vectors"] = time.perf_counter() - t0
    log(f"vectors from {len(ps.split.train)} train words: {t['vectors']:.1f} s")
    t0 = time.perf_counter()
    aie_res = run_rows(ad, ps, held, plan_aie(a.n_layers, a.n_heads), vec)
    fv = function_vectors(vec, aie_table(aie_res, a.n_layers, a.n_heads), ks)
    t["aie"] = time.perf_counter() - t0
    log(f"AIE on {len(held)} held-out words: {t['aie']:.1f} s")
    t0 = time.perf_counter()
    rows = run_rows(ad, ps, held, plan_interventions(a.n_layers, ks, coefs), vec, fv, clean_kinds=(Kind.DEMO,))
    t["interventions"] = time.perf_counter() - t0
    log(f"interventions: {t['interventions']:.1f} s")
    for w in held:  # the shuffled baseline lives with the AIE rows
        rows[w].clean[Kind.SHUFFLED] = aie_res[w].clean[Kind.SHUFFLED]
    return StudyResult(ps, vec, fv, aie_res, rows, accuracy(rows), baselines(rows), cosines(vec, fv), t)
