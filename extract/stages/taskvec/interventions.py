"""The interventions of the study on held-out words, batched (docs/specs/taskvec.md, "Interventions").

A plan is a list of ``Row`` (method, destination kind, boundary/block, head, k, c, positions);
``run_rows`` builds each row's ``engine.Edit`` from the train-built vectors, groups rows by
(destination kind, positions) and prompts by length, and runs every group once through
extract.stages.taskvec.engine. Per row and word: the metrics of the spec at the last position, relative
to the clean reference of the same batch (the engine's spine); per word and kind the clean
reference itself; per word the stored invariants.

Choice where the spec is open: a row's target is chosen by the echo rule on ITS destination
prompt's clean logits (e.g. the shuffled prompt's for AIE, the zero-shot prompt's for a task
vector patched into it), not on the source prompt's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from extract.models.families import Adapter
from extract.stages.prompts import choose_target
from extract.stages.taskvec.engine import Edit, hf_last_logits, prefix_kv, run_group
from extract.stages.taskvec.prompts import PromptSet, TVPrompt
from extract.stages.taskvec.vectors import FunctionVectors, Vectors
from store.schema import TOLERANCE
from store.taskvec_schema import COEFFICIENTS, FV_KS, TQ, Kind, Method, Where


@dataclass(frozen=True)
class Row:
    """One intervention (the same on every held-out word)."""

    method: Method
    kind: Kind  # destination prompt
    layer: int
    where: Where = Where.LAST
    source: int = -1  # TASK_VECTOR: the Kind the vector was built from
    head: int = -1
    k: int = 0
    coef: float = 0.0


def plan_aie(n_layers: int, n_heads: int) -> list[Row]:
    """Every head's mean z-slice at the last position of the shuffled prompt."""
    return [Row(Method.HEAD_MEAN, Kind.SHUFFLED, layer, head=h)
            for layer in range(n_layers) for h in range(n_heads)]


def plan_interventions(n_layers: int, ks: tuple[int, ...] = FV_KS,
                       coefs: tuple[float, ...] = COEFFICIENTS) -> list[Row]:
    """Self-patches, task vectors, function vectors and steering at every boundary 0..L-1."""
    out: list[Row] = []
    for b in range(n_layers):
        for kind in (Kind.ZERO_SHOT, Kind.NEUTRAL, Kind.REPEAT, Kind.ECHO):
            out.append(Row(Method.SELF_PATCH, kind, b))
        out.append(Row(Method.TASK_VECTOR, Kind.ZERO_SHOT, b, source=Kind.DEMO))
        out.append(Row(Method.TASK_VECTOR, Kind.NEUTRAL, b, source=Kind.REPEAT))
        for kind in (Kind.ZERO_SHOT, Kind.NEUTRAL):
            out += [Row(Method.FUNCTION_VECTOR, kind, b, k=k) for k in ks]
        for where in Where:
            for kind in (Kind.ECHO, Kind.REPEAT):
                out += [Row(Method.STEER, kind, b, where, coef=c) for c in coefs]
            if where == Where.FROM_VERB:  # the self-patch of the from-verb positions
                out += [Row(Method.SELF_PATCH, kind, b, where) for kind in (Kind.ECHO, Kind.REPEAT)]
    return out


CLEAN_ONLY = (Kind.DEMO,)  # kinds run for their clean reference only (the in-context baseline)


def edit_for(row: Row, vec: Vectors, fv: FunctionVectors | None) -> Edit:
    """The engine edit of a row, from the train-built vectors."""
    if row.method == Method.SELF_PATCH:
        return Edit(row.layer, scale=0.0, own=True)
    if row.method == Method.TASK_VECTOR:
        return Edit(row.layer, scale=0.0, add=vec.task_vector[Kind(row.source)][row.layer])
    if row.method == Method.FUNCTION_VECTOR:
        assert fv is not None, "function-vector rows need the AIE table first"
        return Edit(row.layer, add=fv.vector[row.k])
    if row.method == Method.STEER:
        sign = 1.0 if row.kind == Kind.ECHO else -1.0
        return Edit(row.layer, add=(sign * row.coef) * vec.steer[row.layer])
    assert row.method == Method.HEAD_MEAN
    return Edit(row.layer, head=row.head, z=vec.head_mean_z[row.layer, row.head])


@dataclass
class Check:
    """One stored invariant: the worst error over what it covers."""

    invariant: str
    max_abs_err: float = 0.0
    rel_err: float = 0.0

    def update(self, got: torch.Tensor, ref: torch.Tensor) -> None:
        err = float((got.double() - ref.double()).abs().max())
        self.max_abs_err = max(self.max_abs_err, err)
        self.rel_err = max(self.rel_err, err / max(1.0, float(ref.abs().max())))

    def row(self, dtype: str) -> tuple[str, float, float, float, bool]:
        tol = TOLERANCE[dtype]
        return (self.invariant, self.max_abs_err, self.rel_err, tol, self.rel_err <= tol)


@dataclass
class WordResult:
    """Every row's metrics on one held-out word, its clean references and its invariants."""

    word: str
    word_index: int
    rows: list[Row]
    target_prob: np.ndarray  # (Q,)
    target_rank: np.ndarray
    echo_correct: np.ndarray
    kl: np.ndarray
    top1_id: np.ndarray
    clean: dict[Kind, tuple[int, float, int, int, bool]] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)

    def arrays(self, dtype: str = "float32") -> dict:
        """The shard's datasets keyed by store.taskvec_schema.TQ fields (validation: tuples)."""
        kinds = sorted(self.clean)
        col = list(zip(*[self.clean[k] for k in kinds], strict=True))
        r = self.rows
        return {
            TQ.METHOD: np.array([x.method for x in r], np.int8), TQ.KIND: np.array([x.kind for x in r], np.int8),
            TQ.SOURCE: np.array([x.source for x in r], np.int8), TQ.LAYER: np.array([x.layer for x in r], np.int16),
            TQ.HEAD: np.array([x.head for x in r], np.int16), TQ.K: np.array([x.k for x in r], np.int16),
            TQ.COEF: np.array([x.coef for x in r], np.float32), TQ.WHERE: np.array([x.where for x in r], np.int8),
            TQ.TARGET_PROB: self.target_prob, TQ.TARGET_RANK: self.target_rank,
            TQ.ECHO_CORRECT: self.echo_correct, TQ.KL: self.kl, TQ.TOP1_ID: self.top1_id,
            TQ.CLEAN_KIND: np.array(kinds, np.int8), TQ.CLEAN_TARGET_ID: np.array(col[0], np.int32),
            TQ.CLEAN_TARGET_PROB: np.array(col[1], np.float32), TQ.CLEAN_TARGET_RANK: np.array(col[2], np.int32),
            TQ.CLEAN_TOP1_ID: np.array(col[3], np.int32), TQ.CLEAN_ECHO_CORRECT: np.array(col[4], bool),
            TQ.VALIDATION: [c.row(dtype) for c in self.checks.values()],
        }


def _new_result(ps: PromptSet, word: str, rows: list[Row]) -> WordResult:
    """Zeroed metrics; the invariants the rows exercise (clean == model always)."""
    Q = len(rows)
    names = ["taskvec_clean_is_model"]
    if any(r.method == Method.SELF_PATCH for r in rows):
        names.append("taskvec_self_patch_is_clean")
    if any(r.method == Method.STEER and r.coef == 0.0 for r in rows):
        names.append("taskvec_c0_is_clean")
    return WordResult(word, ps.split.words.index(word), rows, np.zeros(Q, np.float32), np.zeros(Q, np.int32),
                      np.zeros(Q, bool), np.zeros(Q, np.float32), np.zeros(Q, np.int32),
                      checks={n: Check(n) for n in names})


def _metrics(res: WordResult, p: TVPrompt, qs: list[int], logits: torch.Tensor, spine: torch.Tensor) -> None:
    """Fill rows ``qs`` of ``res`` from their logits (n, V) against the clean spine (V,)."""
    _, tid, _ = choose_target(p.prompt, spine)
    lp = torch.log_softmax(logits.double(), -1)  # (n, V) float64: KL sums V terms (1e-6 noise in float32)
    lp0 = torch.log_softmax(spine.double(), -1)  # (V,)
    top1 = logits.argmax(-1)  # (n,) first maximal index
    cands = torch.tensor(p.candidate_ids, device=logits.device)
    res.target_prob[qs] = lp[:, tid].exp().cpu().numpy()
    res.target_rank[qs] = (logits > logits[:, tid : tid + 1]).sum(-1).cpu().numpy()
    res.echo_correct[qs] = torch.isin(top1, cands).cpu().numpy()
    res.kl[qs] = (lp0.exp() * (lp0 - lp)).sum(-1).cpu().numpy()
    res.top1_id[qs] = top1.cpu().numpy()
    for j, q in enumerate(qs):
        r = res.rows[q]
        if r.method == Method.SELF_PATCH:
            res.checks["taskvec_self_patch_is_clean"].update(logits[j], spine)
        elif r.method == Method.STEER and r.coef == 0.0:
            res.checks["taskvec_c0_is_clean"].update(logits[j], spine)


def _clean_ref(p: TVPrompt, clean: torch.Tensor) -> tuple[int, float, int, int, bool]:
    """(target id, prob, rank, top-1 id, echo-correct) of a clean run."""
    _, tid, _ = choose_target(p.prompt, clean)
    top1 = int(clean.argmax())
    prob = float(torch.softmax(clean, -1)[tid])
    return tid, prob, int((clean > clean[tid]).sum()), top1, top1 in p.candidate_ids


def run_rows(ad: Adapter, ps: PromptSet, words: tuple[str, ...], rows: list[Row], vec: Vectors,
             fv: FunctionVectors | None = None, clean_kinds: tuple[Kind, ...] = (),
             tick=lambda n: None) -> dict[str, WordResult]:
    """Every row on every word (held-out only: asserted), batched per (kind, length, positions).

    Per (kind, length) group: one clean prefix (keys and values of positions < T - 1) shared by
    the last-position and from-verb runs, and one plain HF forward (the clean_is_model check)."""
    leaked = set(words) & set(vec.built_from)
    assert not leaked, f"vectors built from {sorted(leaked)} must not be evaluated on them"
    dev = ad.lm_head.weight.device
    res = {w: _new_result(ps, w, rows) for w in words}
    by_kind: dict[Kind, dict[Where, list[int]]] = defaultdict(dict)
    for q, r in enumerate(rows):
        by_kind[r.kind].setdefault(r.where, []).append(q)
    for k in clean_kinds:
        by_kind[k].setdefault(Where.LAST, [])
    rope = ad.rope(max(p.n_tokens for p in ps.prompts.values()))
    for kind, wheres in sorted(by_kind.items()):
        groups: dict[int, list[TVPrompt]] = defaultdict(list)
        for p in ps.of(kind, words):
            groups[p.n_tokens].append(p)
        for T, group in sorted(groups.items()):
            ids = torch.tensor([p.prompt.input_ids for p in group], device=dev)
            prefix = prefix_kv(ad, ids, T - 1, rope)  # shared by every start of this group
            model = hf_last_logits(ad, ids)
            for where, qs in sorted(wheres.items()):
                start = T - 1 if where == Where.LAST else group[0].verb_pos
                if where == Where.FROM_VERB:
                    assert start >= 0 and all(p.verb_pos == start for p in group), \
                        f"{kind.name} prompts of {T} tokens need one verb position to steer from"
                edits = [edit_for(rows[q], vec, fv) for q in qs]

                def sink(g, idx, logits, spine, group=group, qs=qs):
                    _metrics(res[group[g].word], group[g], [qs[i] for i in idx], logits, spine)

                clean = run_group(ad, ids, start, edits, rope, sink, prefix=prefix)
                for g, p in enumerate(group):
                    res[p.word].checks["taskvec_clean_is_model"].update(clean[g], model[g])
                    if where == Where.LAST or kind not in res[p.word].clean:  # LAST's spine preferred
                        res[p.word].clean[kind] = _clean_ref(p, clean[g])
                tick(len(group) * max(1, len(edits)))
    return res
