"""Circuits and their faithfulness (spec, "Circuits and faithfulness").

Evaluating a circuit C on a pair runs the clean input with every downstream input reading
input_d = (its value in this forward) - sum_{u: (u->d) not in C} (a_u(this forward) - r_u), r the
replacement: the corrupted run's outputs (``patch``), one mean vector per node over the study's
clean prompts and positions (``mean``, ``node_means``), or 0 (``zero``). One engine forward
(extract.stages.circuits.engine, ``Patch``) runs one batch row per circuit.

- Sizes: x in SIZES, n = round(x * n_edges) (Python's round: half to even), at least 1 for
  x > 0; x = 0 is the empty circuit. Selection ``abs``: top edges by |score|; ``signed``: by
  -score * sign(M(clean) - M(corrupted)), M(corrupted) being the empty circuit's M under a mean or
  zero replacement (the normalisation's); ties by edge index (stable sort). A circuit built
  from a metric's scores is evaluated with that metric.
- f(C) = (M(C) - M_ref) / (M(clean) - M_ref), M_ref = M(corrupted) for ``patch`` and M(empty
  circuit) under ``mean``/``zero``. The stored f at x = 0 and x = 1 are the computed ones
  (the invariants f = 0 and f = 1, recorded in ``PairCircuits.invariants``).
- CPR = trapezoid of f over x (0 included), CMD = trapezoid of |1 - f|.
- Exact single-edge effects, M(all edges but e) - M(clean) with ``patch``, for a deterministic
  sample: per input kind (q/k/v/mlp/logits) the ``n_top`` edges of largest |eap ld score| and
  ``n_random`` more drawn from the rest by numpy's default_rng(seed); Spearman rank correlation
  (average ranks) of each method's scores with them, per kind (NaN under 3 edges or constant).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from extract.models.families import Adapter
from extract.stages.circuits import engine
from extract.stages.circuits.graph import Graph, InputKind, graph_of
from extract.stages.circuits.pairs import CircuitPair
from extract.stages.circuits.scores import PairScores, answers, metric_values
from extract.stages.prompts import Prompt
from store.circuits_schema import METHODS, METRICS, SELECTIONS, SIZES

REPLACEMENTS = ("patch", "mean", "zero")


def circuit_size(x: float, n_edges: int) -> int:
    return 0 if x == 0 else max(1, round(x * n_edges))


def select(scores: np.ndarray, n: int, selection: str, sign: float) -> np.ndarray:
    """Edge indices of the top-n circuit: (E,) scores -> (n,) indices, ties by edge index."""
    key = np.abs(scores) if selection == "abs" else -scores * sign
    return np.argsort(-key, kind="stable")[:n]


def trapezoid(x: Sequence[float], y: np.ndarray) -> np.ndarray:
    """Trapezoid integral over the last axis of y."""
    x = np.asarray(x, np.float64)
    return ((y[..., 1:] + y[..., :-1]) * np.diff(x) / 2).sum(-1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation with average ranks for ties; NaN under 3 values or a constant side."""
    if len(a) < 3:
        return float("nan")

    def rank(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def edge_sample(g: Graph, eap_ld: np.ndarray, n_top: int = 10, n_random: int = 10, seed: int = 0) -> np.ndarray:
    """Sorted edge indices of the deterministic sample (module docstring)."""
    rng = np.random.default_rng(seed)
    kind = g.edge_kind
    out = []
    for k in InputKind:
        idx = np.nonzero(kind == k)[0]
        top = idx[np.argsort(-np.abs(eap_ld[idx]), kind="stable")[:n_top]]
        rest = np.setdiff1d(idx, top)
        out += [top, rng.choice(rest, size=min(n_random, len(rest)), replace=False)]
    return np.sort(np.concatenate(out))


@dataclass
class PairCircuits:
    """One pair's circuits. Axes: Me methods, Mt metrics, Sel selections, R replacements, X sizes."""

    pair: CircuitPair
    replacements: tuple[str, ...]
    n_edges: np.ndarray  # (X,) edges in the circuit of each size
    metric: np.ndarray  # (Me, Mt, Sel, R, X) M(C)
    faithfulness: np.ndarray  # (Me, Mt, Sel, R, X)
    cpr: np.ndarray  # (Me, Mt, Sel, R)
    cmd: np.ndarray  # (Me, Mt, Sel, R)
    metric_clean: np.ndarray  # (Mt,)
    metric_ref: np.ndarray  # (Mt, R) the normaliser's M_ref
    sample_edges: np.ndarray  # (Es,) edge indices
    sample_effect: np.ndarray  # (Mt, Es) exact M(all but e) - M(clean)
    spearman: np.ndarray  # (Me, Mt, K) per InputKind
    full_err: np.ndarray  # (R, Mt) |M(all edges) - M(clean)|
    empty_err: np.ndarray  # (Mt,) |M(no edges) - M(corrupted)| with patch


def node_means(ad: Adapter, prompts: Sequence[Prompt]) -> torch.Tensor:
    """(U, D) mean of every node's output over the prompts' clean runs and all positions."""
    g = graph_of(ad.arch)
    dev = ad.lm_head.weight.device
    total, n = None, 0
    by_len: dict[int, list[Prompt]] = {}
    for p in prompts:
        by_len.setdefault(p.n_tokens, []).append(p)
    rope = ad.rope(max(by_len))
    with torch.no_grad():
        for group in by_len.values():
            ids = torch.tensor([p.input_ids for p in group], device=dev)
            run = engine.forward(ad, g, engine.embed(ad, ids), rope, record=True)
            s = run.up.sum((0, 2))  # (U, D)
            total = s if total is None else total + s
            n += ids.numel()
    return total / n


def _run_rows(ad: Adapter, g: Graph, h0: torch.Tensor, repl: torch.Tensor, outside: list[np.ndarray],
              rope, ans, row_batch: int) -> np.ndarray:
    """M of each circuit row (outside masks (U, Dn) bool) -> (Mt, rows) float64."""
    out = [np.zeros((len(METRICS), 0))]
    for j in range(0, len(outside), row_batch):
        chunk = outside[j : j + row_batch]
        mask = torch.as_tensor(np.stack(chunk), dtype=h0.dtype, device=h0.device).transpose(1, 2)  # (B, Dn, U)
        h = h0.expand(len(chunk), -1, -1)
        with torch.no_grad():
            run = engine.forward(ad, g, h, rope, patch=engine.Patch(mask, repl))
        out.append(metric_values(run.logits, ans, torch.zeros(len(chunk), dtype=torch.long)).cpu().numpy())
    return np.concatenate(out, 1)


def evaluate_pair(ad: Adapter, ps: PairScores, *, replacements: Sequence[str] = ("patch",),
                  means: torch.Tensor | None = None, n_top: int = 10, n_random: int = 10, seed: int = 0,
                  row_batch: int = 16) -> PairCircuits:
    """Every circuit of one pair (module docstring)."""
    g = graph_of(ad.arch)
    dev = ad.lm_head.weight.device
    p = ps.pair
    rope = ad.rope(p.n_tokens)
    ids = torch.tensor([p.clean.input_ids, p.corrupted.input_ids], device=dev)
    with torch.no_grad():
        rec = engine.forward(ad, g, engine.embed(ad, ids), rope, record=True)
    ans = answers(rec.logits[:1], rec.logits[1:])
    assert (int(ans.t_clean[0]), int(ans.t_corr[0])) == (ps.t_clean, ps.t_corr), "scores are of another model"
    mc = metric_values(rec.logits[:1], ans, torch.zeros(1, dtype=torch.long))[:, 0].cpu().numpy()  # (Mt,)
    mx = metric_values(rec.logits[1:], ans, torch.zeros(1, dtype=torch.long))[:, 0].cpu().numpy()
    E, X = g.n_edges, len(SIZES)
    sizes = np.array([circuit_size(x, E) for x in SIZES])
    Me, Mt, S, R = len(METHODS), len(METRICS), len(SELECTIONS), len(replacements)
    metric = np.zeros((Me, Mt, S, R, X))
    m_ref = np.zeros((Mt, R))
    full_err = np.zeros((R, Mt))
    empty_err = np.zeros(Mt)
    h0 = rec.up[:1, 0]  # (1, T, D) the clean input node
    none, everything = g.exists.copy(), np.zeros_like(g.exists)
    for ri, rep in enumerate(replacements):
        repl = _replacement(rep, rec.up[1:], means, p.n_tokens)
        ends = _run_rows(ad, g, h0, repl, [none, everything], rope, ans, row_batch)  # (Mt, 2)
        base = mx if rep == "patch" else ends[:, 0]  # the normalisation's M(corrupted)
        rows, where = [], []
        for mi in range(Me):
            for ki in range(Mt):
                sign = float(np.sign(mc[ki] - base[ki]))
                for si, sel in enumerate(SELECTIONS):
                    for xi, n in enumerate(sizes[1:-1], 1):
                        inside = np.zeros(E, bool)
                        inside[select(ps.scores[mi, ki], int(n), sel, sign)] = True
                        rows.append(g.exists & ~g.matrix(inside))
                        where.append((mi, ki, si, xi))
        vals = np.concatenate([ends, _run_rows(ad, g, h0, repl, rows, rope, ans, row_batch)], 1)  # (Mt, rows)
        metric[:, :, :, ri, 0] = vals[:, 0][None, :, None]
        metric[:, :, :, ri, -1] = vals[:, 1][None, :, None]
        for (mi, ki, si, xi), j in zip(where, range(2, vals.shape[1]), strict=True):
            metric[mi, ki, si, ri, xi] = vals[ki, j]
        m_ref[:, ri] = mx if rep == "patch" else vals[:, 0]
        full_err[ri] = np.abs(vals[:, 1] - mc)
        if rep == "patch":
            empty_err = np.abs(vals[:, 0] - mx)
    faith = (metric - m_ref[None, :, None, :, None]) / (mc[None, :, None, None, None] - m_ref[None, :, None, :, None])
    sample = edge_sample(g, ps.scores[0, 0], n_top, n_random, seed)
    repl = _replacement("patch", rec.up[1:], means, p.n_tokens)
    rows = []
    for e in sample:
        one = np.zeros(E, bool)
        one[e] = True
        rows.append(g.matrix(one))
    effect = _run_rows(ad, g, h0, repl, rows, rope, ans, row_batch) - mc[:, None]  # (Mt, Es)
    kinds = g.edge_kind[sample]
    rho = np.full((Me, Mt, len(InputKind)), np.nan)
    for mi in range(Me):
        for ki in range(Mt):
            for k in InputKind:
                sel = kinds == k
                rho[mi, ki, k] = spearman(ps.scores[mi, ki, sample[sel]], effect[ki, sel])
    return PairCircuits(p, tuple(replacements), sizes, metric, faith, trapezoid(SIZES, faith),
                        trapezoid(SIZES, np.abs(1 - faith)), mc, m_ref, sample, effect, rho, full_err, empty_err)


def _replacement(rep: str, corr_up: torch.Tensor, means: torch.Tensor | None, T: int) -> torch.Tensor:
    """(1, U, T, D) replacement outputs."""
    if rep == "patch":
        return corr_up
    if rep == "zero":
        return torch.zeros_like(corr_up)
    if rep == "mean":
        if means is None:
            raise ValueError("mean replacement needs node means (extract.stages.circuits.faithfulness.node_means)")
        return means.to(corr_up)[None, :, None, :].expand_as(corr_up)
    raise ValueError(f"replacement must be one of {REPLACEMENTS}, not {rep!r}")


def evaluate_circuits(ad: Adapter, scores: Sequence[PairScores], **kw) -> list[PairCircuits]:
    """``evaluate_pair`` for every pair's scores, in order (keyword options as there)."""
    engine.check_model(ad)
    return [evaluate_pair(ad, ps, **kw) for ps in scores]
