"""The circuits stage: one stage per pair kind (``template``, ``word``), jobs = pairs of equal length.

``circuits/<kind>/pNNNNN.h5`` (store.circuits_schema.CI; NNNNN = the clean prompt): one pair's
edge scores (extract.stages.circuits.scores), circuits and faithfulness
(extract.stages.circuits.faithfulness) and its invariant rows; ``circuits/graph.h5`` (CG) once,
by the first kind's stage. Pairs come from extract.stages.circuits.pairs over the whole prompt
set (template pairs: templates 0 and 1, both directions); pairs that cannot be built are
recorded in the manifest (``circuits.<kind>.skipped``) with the pairs that are.

Jobs: the pairs of one kind and one token length, ``PAIR_BATCH`` at a time in prompt order
(``score_pairs`` runs them as one batch); a pair whose shard is on disk is not written again,
and a job none of whose shards is missing is not run. A resumed job recomputes its whole
batch (BLAS results depend on the batch's shape), so a resumed warehouse is bit-identical to a
straight run.
"""

from __future__ import annotations

from typing import Any

import torch

from extract.stages.base import Job, Loaded, PlanInput, Shard, Tick
from extract.stages.circuits.faithfulness import evaluate_circuits, node_means
from extract.stages.circuits.graph import graph_of
from extract.stages.circuits.pairs import CircuitPair, PairSet, build
from extract.stages.circuits.scores import score_pairs
from extract.stages.circuits.shard import graph_data, to_shard
from store.circuits_schema import CIRCUITS_DIR, GRAPH_FILE, SELECTIONS, SIZES

PAIR_BATCH = 2  # pairs of equal length per score_pairs batch (rows per forward: 2 x batch x steps);
# 4 pairs of SmolLM2 took up to 9 GB on a CPU
GRAPH = -1  # Job.members of the graph file's job
N_SAMPLE = 5 * 20  # single edges whose exact effect is computed per pair (10 top + 10 random per input kind)


def kind_folder(kind: str) -> str:
    return f"{CIRCUITS_DIR}/{kind}"


def pair_set(kind: str, prompts) -> PairSet:
    """The pairs of one kind over the whole prompt set (templates 0 and 1 for ``template``)."""
    return build(kind, prompts)


class CircuitsStage:
    """Edge attribution, circuits and faithfulness for the pairs of one kind (module docstring)."""

    unit = "pass"
    count = "pairs"

    def __init__(self, kind: str, writes_graph: bool = False) -> None:
        self.kind = kind
        self.name = f"circuits_{kind}"
        self.writes_graph = writes_graph
        self._means: torch.Tensor | None = None  # per process: node means for the ``mean`` replacement

    def record(self, model: Loaded) -> dict[str, Any]:
        """The manifest's ``circuits.<kind>``: every pair (clean, corrupted, direction) and every
        skipped one with its reason; verify expects one shard per pair."""
        ps = pair_set(self.kind, model.prompts)
        return {"circuits": {self.kind: {
            "pairs": [[p.clean.index, p.corrupted.index, p.direction] for p in ps.pairs],
            "skipped": [{"clean": s.clean, "corrupted": s.corrupted, "reason": s.reason} for s in ps.skipped]}}}

    @staticmethod
    def passes(cfg, n_layers: int) -> int:
        """Forward+backward passes per pair (progress units): eap, each IG method's steps, the
        m = 1 check, and the circuit forwards."""
        m = cfg.circuit_steps
        grad = 1 + (m + 1) * ("eap_ig_inputs" in cfg.circuit_methods) \
            + (m + 1) * (1 + 2 * n_layers) * ("eap_ig_activations" in cfg.circuit_methods)
        circuits = len(cfg.circuit_replacements) * (2 + 3 * 2 * len(SELECTIONS) * (len(SIZES) - 2))
        return grad + circuits + N_SAMPLE

    def plan(self, inp: PlanInput) -> list[Job]:
        if self.kind not in inp.cfg.circuits:
            return []
        jobs: list[Job] = []
        if self.writes_graph and not (inp.cfg.out / CIRCUITS_DIR / GRAPH_FILE).exists():
            jobs.append(Job(self.name, (GRAPH,), (GRAPH,), 0))
        done = inp.done(kind_folder(self.kind))
        per_pair = self.passes(inp.cfg, inp.arch.n_layers)
        by_len: dict[int, list[int]] = {}
        for p in pair_set(self.kind, inp.prompts).pairs:
            by_len.setdefault(p.n_tokens, []).append(p.key)
        for keys in by_len.values():
            for j in range(0, len(keys), PAIR_BATCH):
                members = tuple(keys[j : j + PAIR_BATCH])
                todo = tuple(k for k in members if k not in done)
                if todo:
                    jobs.append(Job(self.name, members, todo, per_pair * len(members)))
        return jobs

    def run(self, job: Job, model: Loaded, tick: Tick) -> list[Shard]:
        cfg, ad = model.cfg, model.adapter
        if job.members == (GRAPH,):
            g = graph_of(ad.arch)
            return [Shard(CIRCUITS_DIR, GRAPH, dict(graph_data(g).items()),
                          {"n_layers": g.n_layers, "n_heads": g.n_heads, "n_kv_heads": g.n_kv_heads,
                           "n_edges": g.n_edges, "fingerprint": model.fingerprint}, name=GRAPH_FILE)]
        by_key = {p.key: p for p in pair_set(self.kind, model.prompts).pairs}
        pairs: list[CircuitPair] = [by_key[k] for k in job.members]
        scores = score_pairs(ad, pairs, steps=cfg.circuit_steps, batch=len(pairs), methods=cfg.circuit_methods)
        tick(job.work // 2)
        means = self.means(model) if "mean" in cfg.circuit_replacements else None
        todo = [s for s in scores if s.pair.key in job.todo]
        circuits = evaluate_circuits(ad, todo, replacements=cfg.circuit_replacements, means=means)
        tick(job.work - job.work // 2)
        n_edges = graph_of(ad.arch).n_edges
        out = []
        for ps, pc in zip(todo, circuits, strict=True):
            cs = to_shard(ps, pc, model.tolerance, model.fingerprint)
            cs.check(n_edges)
            out.append(Shard(kind_folder(self.kind), ps.pair.key, dict(cs.items()), cs.attrs))
        return out

    def means(self, model: Loaded) -> torch.Tensor:
        """(U, D) node means over every clean prompt of the run (computed once per process)."""
        if self._means is None:
            self._means = node_means(model.adapter, model.prompts)
        return self._means


def circuit_stages(cfg) -> list[CircuitsStage]:
    """One stage per asked kind, in the config's order; the first writes the graph file."""
    return [CircuitsStage(k, writes_graph=i == 0) for i, k in enumerate(cfg.circuits)]
