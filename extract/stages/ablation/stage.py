"""The ablation stage: the layers x units grid (zero, mean, sink, sink_norenorm) per prompt group.

A job is one group of ``grid_groups`` (prompts of one template sharing a prefix), cut from the
whole prompt set, so a resumed or distributed run composes every group as the first run did.
Each prompt of the group without an ablation shard gets ``ablation/pNNNNN.h5`` (store.schema.A,
axes (M, L', U[, K])): the grid's numbers relative to the engine's clean reference, and
invariant 6's first half (the engine's own forward with nothing removed == the model's stored
logits). Mean ablation needs the means of every prompt: computed once per process, before the
first group (extract.stages.ablation.means), identical wherever it runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from extract.stages.ablation.grid import GridSpec, grid_groups, iter_grid
from extract.stages.ablation.means import Means, compute_means
from extract.stages.ablation.metrics import clean_reference, summarise
from extract.stages.base import Job, Loaded, PlanInput, Shard, Tick
from extract.stages.capture.engine import invariant_errors
from extract.stages.prompts import Prompt
from store.schema import ABLATION_DIR, A, F
from store.warehouse import validation_array


def grid_layers(layers: tuple[int, ...] | None, n_layers: int) -> tuple[int, ...]:
    """The ablated layers, sorted (None: every layer)."""
    return tuple(range(n_layers)) if layers is None else tuple(sorted(set(layers)))


class AblationStage:
    """The ablation grid as a stage (module docstring)."""

    name = "ablation"
    unit = "prompt-layer"
    count = "prompts"

    def __init__(self) -> None:
        self._means: Means | None = None  # per process: every prompt's means, computed once

    def plan(self, inp: PlanInput) -> list[Job]:
        cfg = inp.cfg
        n_layers = len(grid_layers(cfg.ablate_layers, inp.arch.n_layers))
        if not cfg.ablation or not n_layers:
            return []
        done = inp.done(ABLATION_DIR)
        jobs = []
        for g in grid_groups(inp.prompts):
            todo = tuple(p.index for p in g if p.index not in done)
            if todo:
                jobs.append(Job(self.name, tuple(p.index for p in g), todo, len(g) * n_layers))
        return jobs

    def means(self, model: Loaded) -> Means | None:
        if "mean" in model.cfg.ablation and self._means is None:
            self._means = compute_means(model.adapter, model.prompts, model.cfg.progress)
        return self._means

    def run(self, job: Job, model: Loaded, tick: Tick) -> list[Shard]:
        cfg = model.cfg
        spec = GridSpec(tuple(cfg.ablation), cfg.ablate_positions,
                        grid_layers(cfg.ablate_layers, model.adapter.arch.n_layers))
        with model.reader() as stored:
            targets = {i: int(stored.prompt_attrs(i)["target_id"]) for i in job.todo}
            refs = {i: stored.read(F.FINAL_LOGITS, i) for i in job.todo}
        return ablate_group(model, job, spec, self.means(model), targets, refs.__getitem__, tick)


def ablate_group(model: Loaded, job: Job, spec: GridSpec, means: Means | None, targets: dict[int, int],
                 reference: Callable[[int], np.ndarray] | None, tick: Tick) -> list[Shard]:
    """Run the grid for the group ``job.members``; a shard for each prompt of ``job.todo``.

    ``reference`` (prompt index -> the model's stored logits at the last position) adds the
    ablation_clean_is_model check; every number is relative to the engine's clean reference.
    """
    ad, top_k, tol = model.adapter, model.cfg.top_k, model.tolerance
    a = ad.arch
    U = a.n_heads + 2
    M, Lp = len(spec.modes), len(spec.layers)
    todo = set(job.todo)
    missing = [i for i in todo if i not in targets]
    assert not missing, f"no target token for prompts {missing[:5]}"
    acc: dict[int, dict] = {}
    out: list[Shard] = []

    def sink(p: Prompt, li: int, logits: torch.Tensor, clean: torch.Tensor) -> None:
        assert logits.dim() == 2 and logits.shape[0] == M * U, logits.shape  # (C, V)
        if p.index not in todo:
            return  # rerun only as a member of its group; its shard exists
        stats = summarise(logits, clean, targets[p.index], top_k)
        st = acc.setdefault(p.index, {})
        if A.CLEAN_TOP1_ID not in st:
            st.update(clean_reference(clean, targets[p.index]))
        if reference is not None and A.VALIDATION not in st:
            ref = torch.from_numpy(np.asarray(reference(p.index), np.float32)).to(clean.device)  # (V,)
            ((err, rel),) = invariant_errors(clean.float()[None], ref[None])
            st[A.VALIDATION] = validation_array([("ablation_clean_is_model", err, rel, tol, rel <= tol)])
        for f, v in stats.items():
            arr = st.setdefault(f, np.zeros((M, Lp, U, *v.shape[1:]), dtype=np.dtype(f.dtype)))
            arr[:, li] = v.cpu().numpy().reshape(M, U, *v.shape[1:])

    def finish(p: Prompt) -> None:
        if p.index in todo:
            out.append(Shard(ABLATION_DIR, p.index, acc.pop(p.index), {
                "prompt_index": p.index, "fingerprint": model.fingerprint, "modes": list(spec.modes),
                "positions": spec.positions, "layers": np.array(spec.layers, np.int32),
                "n_heads": a.n_heads}))

    members = list(job.members)
    iter_grid(ad, model.prompts, spec, means, sink=sink, done=finish, tick=tick,
              all_prompts=model.prompts, skip=lambda g: [p.index for p in g] != members)
    assert {s.index for s in out} == todo, (sorted(todo), [s.index for s in out])
    return out
