"""Edge scores per pair: EAP, EAP-IG on inputs, EAP-IG on activations; metrics ``ld`` and ``kl``.

score(u -> d) = sum_t (a_u(corrupted)[t] - a_u(clean)[t]) . g_d[t]   (the spec's definitions)

- ``eap``: g_d = dM/d(input_d) in the clean forward.
- ``eap_ig_inputs``: g_d = mean over k = 1..m of dM/d(input_d) in the forward whose input node
  is e_clean + (1 - k/m)(e_corr - e_clean) (written so that k = m is e_clean exactly; the same
  point as the spec's e_corr + (k/m)(e_clean - e_corr)). m = 1 is ``eap``.
- ``eap_ig_activations``: per group (input; a layer's heads; a layer's MLP), g_d^G = mean over
  k of dM/d(input_d) with G's outputs set to a_clean + (1 - k/m)(a_corr - a_clean). The forward
  of a group starts at the group (the clean run is unchanged before it: its residual, plus the
  set outputs minus the clean ones); the input group's forwards are ``eap_ig_inputs``'.

Batching: every forward+backward runs the rows (metric, pair, step) of pairs of equal length
together -- one backward per step set, both metrics at once. Answer tokens (spec, "Metrics"):
t_clean = clean top-1, t_corr = corrupted top-1 if they differ, else the clean run's strongest
other token (rule 'top1' / 'other').
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from extract.models.families import Adapter
from extract.stages.circuits import engine
from extract.stages.circuits.graph import Graph, graph_of
from extract.stages.circuits.pairs import CircuitPair
from store.circuits_schema import METHODS, METRICS


@dataclass
class Answers:
    """Per pair: the metric's fixed references from the two clean runs."""

    t_clean: torch.Tensor  # (N,) long
    t_corr: torch.Tensor  # (N,) long
    rule: tuple[str, ...]  # per pair: 'top1' | 'other'
    logp_clean: torch.Tensor  # (N, V) float64 log-softmax of the clean run


def answers(clean: torch.Tensor, corr: torch.Tensor) -> Answers:
    """From clean and corrupted last-position logits (N, V)."""
    tc, tx = clean.argmax(-1), corr.argmax(-1)
    other = clean.clone()
    other[torch.arange(len(tc)), tc] = float("-inf")
    same = tc == tx
    tx = torch.where(same, other.argmax(-1), tx)
    return Answers(tc, tx, tuple("other" if s else "top1" for s in same.tolist()),
                   torch.log_softmax(clean.double(), -1))


def metric_values(logits: torch.Tensor, ans: Answers, rows: torch.Tensor) -> torch.Tensor:
    """(B, V) logits of rows whose pair is ``rows`` (B,) -> (2, B) float64: ld and kl."""
    lg = logits.double()
    b = torch.arange(len(rows), device=lg.device)
    ld = lg[b, ans.t_clean[rows]] - lg[b, ans.t_corr[rows]]
    lp = ans.logp_clean[rows]
    kl = (lp.exp() * (lp - torch.log_softmax(lg, -1))).sum(-1)
    return torch.stack([ld, kl])


@dataclass
class PairScores:
    """One pair's scores and references (axes: method Me, metric Mt, edge E in graph order)."""

    pair: CircuitPair
    scores: np.ndarray  # (Me, Mt, E) float64
    t_clean: int
    t_corr: int
    rule: str
    metric_clean: np.ndarray  # (Mt,) M of the clean run (kl: 0)
    metric_corr: np.ndarray  # (Mt,) M of the corrupted run
    steps: int
    # invariants, each max |error| / max(1, max |reference|):
    node_sum_err: float  # sum_u eap(u -> d) vs node-level attribution patching of d
    ig1_err: float  # eap_ig_* with m = 1 vs eap (NaN when not checked)
    model_err: float  # the engine's clean/corrupted logits vs the model's own forward


@dataclass
class _Batch:
    """Clean and corrupted records of N pairs of equal length."""

    clean: engine.Run
    corr: engine.Run
    ans: Answers


def _record(ad: Adapter, g: Graph, pairs: Sequence[CircuitPair], rope) -> _Batch:
    dev = ad.lm_head.weight.device
    ids = torch.tensor([p.clean.input_ids for p in pairs] + [p.corrupted.input_ids for p in pairs], device=dev)
    with torch.no_grad():
        run = engine.forward(ad, g, engine.embed(ad, ids), rope, record=True)
    N = len(pairs)

    def part(sl: slice) -> engine.Run:
        return engine.Run(run.logits[sl], [], run.up[sl], run.resid_in[sl], run.resid_mid[sl], run.resid_out[sl])

    clean, corr = part(slice(0, N)), part(slice(N, 2 * N))
    return _Batch(clean, corr, answers(clean.logits, corr.logits))


def _grads(ad: Adapter, g: Graph, bt: _Batch, rope, h: torch.Tensor, start: int, m: int) -> torch.Tensor:
    """Mean over steps of dM/d(every input) -> (Mt, N, Dn, T, D).

    h (Mt * N * m, T, D): the start residual of every row, rows ordered (metric, pair, step)."""
    N = bt.clean.logits.shape[0]
    B, T, D = h.shape
    assert len(METRICS) * N * m == B
    pair_of = torch.arange(N, device=h.device).repeat_interleave(m).repeat(len(METRICS))  # (B,)
    with torch.enable_grad():
        run = engine.forward(ad, g, h.detach(), rope, start=start, grad=True)
        mv = metric_values(run.logits, bt.ans, pair_of)  # (Mt, B)
        which = torch.arange(len(METRICS), device=h.device).repeat_interleave(N * m)  # (B,)
        total = mv.gather(0, which[None]).sum()
        gs = torch.autograd.grad(total, run.copies)
    got = torch.cat(gs, 1)  # (B, n, T, D): the inputs from the start stage on, graph order
    got = got.view(len(METRICS), N, m, -1, T, D).mean(2)
    full = h.new_zeros(len(METRICS), N, g.n_down, T, D)
    full[:, :, g.n_down - got.shape[2] :] = got
    return full


def _steps(a_clean: torch.Tensor, a_corr: torch.Tensor, m: int) -> torch.Tensor:
    """(N, ...) -> (Mt * N * m, ...): a_clean + (1 - k/m)(a_corr - a_clean), rows (metric, pair, k)."""
    alpha = torch.tensor([1 - k / m for k in range(1, m + 1)], dtype=a_clean.dtype, device=a_clean.device)
    shape = (1, -1) + (1,) * (a_clean.dim() - 1)
    x = a_clean[:, None] + alpha.view(shape) * (a_corr - a_clean)[:, None]  # (N, m, ...)
    return x.flatten(0, 1).repeat(len(METRICS), *([1] * (a_clean.dim() - 1)))


def _repeat(x: torch.Tensor, m: int) -> torch.Tensor:
    """(N, ...) -> (Mt * N * m, ...) rows (metric, pair, step), each the pair's x."""
    return x.repeat_interleave(m, 0).repeat(len(METRICS), *([1] * (x.dim() - 1)))


def _edge_scores(delta: torch.Tensor, grads: torch.Tensor, g: Graph, rows: np.ndarray | None = None) -> torch.Tensor:
    """delta (U', T, D) of upstream rows ``rows`` (all if None), grads (Mt, Dn, T, D) -> (Mt, U', Dn)."""
    s = torch.einsum("utd,mntd->mun", delta.to(grads.dtype), grads)
    ex = torch.as_tensor(g.exists if rows is None else g.exists[rows], device=s.device)
    return s * ex


def _group_start(g: Graph, bt: _Batch, grp: str, lay: int, m: int) -> tuple[torch.Tensor, int, np.ndarray]:
    """IG-activations group (``a`` heads or ``m`` MLP of layer lay): start residual rows, start
    stage, upstream indices."""
    if grp == "a":
        idx = np.array([g.up_head(lay, h) for h in range(g.n_heads)])
        base, stage = bt.clean.resid_mid[:, lay], 2 * lay + 2
    else:
        idx = np.array([g.up_mlp(lay)])
        base = bt.clean.resid_in[:, lay + 1] if lay + 1 < g.n_layers else bt.clean.resid_out
        stage = 2 * lay + 3
    ac, ax = bt.clean.up[:, idx], bt.corr.up[:, idx]  # (N, n, T, D)
    h = _repeat(base, m) + (_steps(ac, ax, m) - _repeat(ac, m)).sum(1)  # (Mt*N*m, T, D)
    return h, stage, idx


def _method_scores(ad: Adapter, g: Graph, bt: _Batch, rope, m: int, methods: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Me, Mt, N, U, Dn) float64 score matrices (methods not asked for: 0), and eap's grads."""
    N = bt.clean.logits.shape[0]
    e_clean, e_corr = bt.clean.up[:, 0], bt.corr.up[:, 0]  # (N, T, D)
    delta = bt.corr.up - bt.clean.up  # (N, U, T, D)
    out = torch.zeros(len(METHODS), len(METRICS), N, g.n_up, g.n_down, dtype=torch.float64)
    g_eap = _grads(ad, g, bt, rope, _steps(e_clean, e_corr, 1), 1, 1)  # (Mt, N, Dn, T, D)
    for n in range(N):
        out[0, :, n] = _edge_scores(delta[n], g_eap[:, n], g).double().cpu()
    if "eap_ig_inputs" in methods or "eap_ig_activations" in methods:
        g_in = _grads(ad, g, bt, rope, _steps(e_clean, e_corr, m), 1, m)
        for n in range(N):
            out[1, :, n] = _edge_scores(delta[n], g_in[:, n], g).double().cpu()
            out[2, :, n, 0] = out[1, :, n, 0]  # the input group's forwards are IG-inputs'
    if "eap_ig_activations" in methods:
        for lay in range(g.n_layers):
            for grp in ("a", "m"):
                h, stage, idx = _group_start(g, bt, grp, lay, m)
                gg = _grads(ad, g, bt, rope, h, stage, m)
                for n in range(N):
                    out[2, :, n, idx] = _edge_scores(delta[n, idx], gg[:, n], g, idx).double().cpu()
    if "eap_ig_inputs" not in methods:
        out[1] = 0
    return out, g_eap


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max()) / max(1.0, float(ref.double().abs().max()))


def _scores_batch(ad: Adapter, g: Graph, pairs: Sequence[CircuitPair], rope, m: int,
                  methods: Sequence[str], check: bool) -> list[PairScores]:
    bt = _record(ad, g, pairs, rope)
    N = len(pairs)
    out, g_eap = _method_scores(ad, g, bt, rope, m, methods)
    ig1 = _method_scores(ad, g, bt, rope, 1, methods)[0] if check else None
    with torch.no_grad():
        dev = ad.lm_head.weight.device
        ids = torch.tensor([p.clean.input_ids for p in pairs] + [p.corrupted.input_ids for p in pairs], device=dev)
        model = ad.model(input_ids=ids, logits_to_keep=1).logits[:, -1]
    mc = metric_values(bt.clean.logits, bt.ans, torch.arange(N))  # (Mt, N)
    mx = metric_values(bt.corr.logits, bt.ans, torch.arange(N))
    res = []
    for n, p in enumerate(pairs):
        sc = out[:, :, n][:, :, g.edge_up, g.edge_down].numpy()  # (Me, Mt, E)
        ig1_err = float("nan")
        if ig1 is not None:
            asked = [i for i, name in enumerate(METHODS) if name in methods and i > 0]
            ig1_err = max((_rel(ig1[i, :, n], out[0, :, n]) for i in asked), default=0.0)
        engine_lg = torch.stack([bt.clean.logits[n], bt.corr.logits[n]])
        res.append(PairScores(p, sc, int(bt.ans.t_clean[n]), int(bt.ans.t_corr[n]), bt.ans.rule[n],
                              mc[:, n].cpu().numpy(), mx[:, n].cpu().numpy(), m,
                              _node_sum_err(g, bt, n, out[0, :, n], g_eap[:, n]), ig1_err,
                              _rel(engine_lg, model[[n, N + n]])))
    return res


def _node_sum_err(g: Graph, bt: _Batch, n: int, eap: torch.Tensor, grads: torch.Tensor) -> float:
    """Invariant: sum_u eap(u -> d) == (input_d(corr) - input_d(clean)) . g_d, every d and metric.

    eap (Mt, U, Dn); grads (Mt, Dn, T, D). Relative to max(1, max |reference|)."""
    L = g.n_layers
    reads = []  # the residual difference each input reads, in graph order
    for lay in range(L):
        d_in = bt.corr.resid_in[n, lay] - bt.clean.resid_in[n, lay]
        reads += [d_in] * g.n_attn_inputs + [bt.corr.resid_mid[n, lay] - bt.clean.resid_mid[n, lay]]
    reads.append(bt.corr.resid_out[n] - bt.clean.resid_out[n])
    ref = torch.einsum("ntd,mntd->mn", torch.stack(reads).to(grads.dtype), grads).double().cpu()  # (Mt, Dn)
    got = eap.sum(1)
    return float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def score_pairs(ad: Adapter, pairs: Sequence[CircuitPair], *, steps: int = 5, batch: int = 1,
                methods: Sequence[str] = METHODS, check: bool = True) -> list[PairScores]:
    """Scores of every pair (in the given order), pairs of equal length ``batch`` at a time
    (rows per forward: 2 metrics x batch x steps).

    Methods not asked for are left 0 (``eap`` always runs: the invariants need it). ``check``
    also runs the IG methods with m = 1 (invariant ig_one_step_is_eap; ~1/m more work)."""
    engine.check_model(ad)
    bad = set(methods) - set(METHODS)
    if bad:
        raise ValueError(f"unknown methods {sorted(bad)}; choose from {METHODS}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    g = graph_of(ad.arch)
    if not pairs:
        return []
    rope = ad.rope(max(p.n_tokens for p in pairs))
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(pairs):
        by_len.setdefault(p.n_tokens, []).append(i)
    out: list[PairScores | None] = [None] * len(pairs)
    for idx in by_len.values():
        for j in range(0, len(idx), batch):
            chunk = idx[j : j + batch]
            for i, r in zip(chunk, _scores_batch(ad, g, [pairs[i] for i in chunk], rope, steps, methods, check), strict=True):
                out[i] = r
    return out  # type: ignore[return-value]
