"""The task-vector study as three stages, in store.taskvec_schema's write order.

- ``taskvec_aie``: per held-out word, every head's AIE row on its shuffled prompt
  (``taskvec/aie/wNNNNN.h5``, NNNNN = the word's index in the word list);
- ``taskvec_vectors``: once, after every AIE shard: the train-built vectors, the AIE table over
  all held-out words (read back from the AIE shards), FV_k and the cosines (``taskvec/vectors.h5``);
- ``taskvec_interventions``: per held-out word, every other intervention with its clean references
  (``taskvec/interventions/wNNNNN.h5``), the function vectors rebuilt from the stored AIE table.

The train vectors (TV, SV, head means) are recomputed by each process that needs them (a few
forwards per train word; cached per process) rather than read back, so a bfloat16/float16
store never rounds a vector that an intervention uses. Jobs are ``WORD_BATCH`` held-out words in
list order (``run_rows`` batches them by prompt length); a resumed job recomputes its whole
batch and writes only its missing shards, so a resumed warehouse is bit-identical to a straight
run. The manifest records the split and the prompt set (``taskvec``: PromptSet.record()).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from extract.stages.base import Job, Loaded, PlanInput, Shard, Tick
from extract.stages.taskvec.interventions import WordResult, plan_aie, plan_interventions, run_rows
from extract.stages.taskvec.prompts import PromptSet, build_set
from extract.stages.taskvec.vectors import Vectors, build_vectors, function_vectors, vector_arrays
from store.schema import Field
from store.taskvec_schema import (
    AIE_SET,
    FV_KS,
    INTERVENTIONS_SET,
    TASKVEC_DIR,
    TQ,
    TV,
    VECTORS_FILE,
    Kind,
    Where,
    word_shard_name,
)
from store.warehouse import validation_array

WORD_BATCH = 8  # held-out words per job
VECTORS = -1  # Job.members of the vectors file's job
AIE_DIR = f"{TASKVEC_DIR}/{AIE_SET}"
INTERVENTIONS_DIR = f"{TASKVEC_DIR}/{INTERVENTIONS_SET}"


def prompt_set(model: Loaded) -> PromptSet:
    cfg = model.cfg
    return build_set(model.tok, list(model.words), n_demos=cfg.tv_demos, chat=cfg.chat_template,
                     system_prompt=cfg.system_prompt)


def held_out(words: list[str] | tuple[str, ...]) -> list[int]:
    """List indices of the held-out words (odd indices: store.taskvec_schema, the spec's split)."""
    return list(range(1, len(words), 2))


def done_words(root: Path, folder: str) -> set[int]:
    """Word indices whose ``wNNNNN.h5`` in ``folder`` is complete (``*.partial`` never)."""
    return {int(p.stem[1:]) for p in (Path(root) / folder).glob("w*.h5") if p.stem[1:].isdigit()}


def intervention_rows(model: Loaded):
    """plan_interventions with the config's coefficients; from-verb steering (and its self-patch)
    only at boundaries b % tv_steer_stride == 0."""
    cfg, L = model.cfg, model.adapter.arch.n_layers
    return [r for r in plan_interventions(L, FV_KS, tuple(cfg.tv_coefficients))
            if r.where != Where.FROM_VERB or r.layer % cfg.tv_steer_stride == 0]


@dataclass
class Study:
    """What the three stages share in one process: the prompt set and the train vectors."""

    fingerprint: str | None = None
    ps: PromptSet | None = None
    vec: Vectors | None = None

    def get(self, model: Loaded) -> tuple[PromptSet, Vectors]:
        if self.fingerprint != model.fingerprint or self.ps is None or self.vec is None:
            self.ps = prompt_set(model)
            self.vec = build_vectors(model.adapter, self.ps)
            self.fingerprint = model.fingerprint
        return self.ps, self.vec


def word_shard(folder: str, res: WordResult, model: Loaded) -> Shard:
    arrays: dict[Field, Any] = res.arrays(model.cfg.dtype)
    arrays[TQ.VALIDATION] = validation_array(arrays[TQ.VALIDATION])
    attrs = {"word": res.word, "word_index": res.word_index, "set": folder.rsplit("/", 1)[-1],
             "fingerprint": model.fingerprint}  # store.taskvec_schema.TVW_ATTRS, as shard.write_word
    return Shard(folder, res.word_index, arrays, attrs, name=word_shard_name(res.word_index))


class _WordStage:
    """A per-held-out-word phase (AIE or interventions)."""

    unit = "run"
    count = "words"
    name = ""
    folder = ""

    def __init__(self, study: Study) -> None:
        self.study = study

    def plan(self, inp: PlanInput) -> list[Job]:
        if not inp.cfg.task_vectors:
            return []
        done = done_words(inp.cfg.out, self.folder)
        idx = held_out(_words(inp))
        jobs = []
        for j in range(0, len(idx), WORD_BATCH):
            members = tuple(idx[j : j + WORD_BATCH])
            todo = tuple(i for i in members if i not in done)
            if todo:
                jobs.append(Job(self.name, members, todo, len(members)))
        return jobs

    def run(self, job: Job, model: Loaded, tick: Tick) -> list[Shard]:
        ps, vec = self.study.get(model)
        words = tuple(model.words[i] for i in job.members)
        res = self.compute(model, ps, vec, words)
        tick(job.work)
        return [word_shard(self.folder, res[model.words[i]], model) for i in job.todo]

    def compute(self, model: Loaded, ps: PromptSet, vec: Vectors, words: tuple[str, ...]) -> dict[str, WordResult]:
        raise NotImplementedError


def _words(inp: PlanInput) -> list[str]:
    """The run's word list, in order (the prompts are built word by word per template)."""
    return list(dict.fromkeys(p.word for p in inp.prompts))


class AIEStage(_WordStage):
    """Per held-out word: every head's mean z-slice on its shuffled prompt."""

    name = "taskvec_aie"
    folder = AIE_DIR

    def record(self, model: Loaded) -> dict[str, Any]:
        return {"taskvec": {**prompt_set(model).record(), "held_out_indices": held_out(model.words)}}

    def compute(self, model, ps, vec, words):
        a = model.adapter.arch
        return run_rows(model.adapter, ps, words, plan_aie(a.n_layers, a.n_heads), vec)


class InterventionStage(_WordStage):
    """Per held-out word: task vectors, function vectors, steering and self-patches."""

    name = "taskvec_interventions"
    folder = INTERVENTIONS_DIR

    def compute(self, model, ps, vec, words):
        fv = function_vectors(vec, stored_aie(model.cfg.out), FV_KS)
        res = run_rows(model.adapter, ps, words, intervention_rows(model), vec, fv, clean_kinds=(Kind.DEMO,))
        for w in words:  # the shuffled baseline lives with the AIE rows (as run_study)
            res[w].clean[Kind.SHUFFLED] = stored_clean(model.cfg.out, ps.split.words.index(w), Kind.SHUFFLED)
        return res


def stored_aie(root: Path) -> torch.Tensor:
    with h5py.File(Path(root) / TASKVEC_DIR / VECTORS_FILE, "r", locking=False) as f:
        return torch.from_numpy(np.asarray(f[TV.AIE.name][()], np.float32))


def stored_clean(root: Path, word_index: int, kind: Kind) -> tuple[int, float, int, int, bool]:
    """A kind's clean reference of a word from its AIE shard (as WordResult.clean holds it)."""
    with h5py.File(Path(root) / AIE_DIR / word_shard_name(word_index), "r", locking=False) as f:
        (j,) = np.flatnonzero(f[TQ.CLEAN_KIND.name][()] == int(kind))
        return (int(f[TQ.CLEAN_TARGET_ID.name][j]), float(f[TQ.CLEAN_TARGET_PROB.name][j]),
                int(f[TQ.CLEAN_TARGET_RANK.name][j]), int(f[TQ.CLEAN_TOP1_ID.name][j]),
                bool(f[TQ.CLEAN_ECHO_CORRECT.name][j]))


def aie_from_shards(root: Path, indices: list[int], n_layers: int, n_heads: int) -> torch.Tensor:
    """(L, H) AIE over the held-out words' AIE shards: extract.stages.taskvec.study.aie_table on
    the stored rows (the same float32 probabilities, the same order of words)."""
    per_word = []
    for i in indices:
        with h5py.File(Path(root) / AIE_DIR / word_shard_name(i), "r", locking=False) as f:
            base = stored_clean(root, i, Kind.SHUFFLED)[1]
            eff = np.zeros((n_layers, n_heads), np.float64)
            lay, head, prob = (f[x.name][()] for x in (TQ.LAYER, TQ.HEAD, TQ.TARGET_PROB))
            for q in range(len(prob)):
                eff[lay[q], head[q]] = float(prob[q]) - base
            per_word.append(eff)
    return torch.tensor(np.mean(per_word, 0), dtype=torch.float32)


class VectorsStage:
    """Once, after every AIE shard: taskvec/vectors.h5."""

    name = "taskvec_vectors"
    unit = "file"
    count = "files"

    def __init__(self, study: Study) -> None:
        self.study = study

    def plan(self, inp: PlanInput) -> list[Job]:
        if not inp.cfg.task_vectors or (inp.cfg.out / TASKVEC_DIR / VECTORS_FILE).exists():
            return []
        return [Job(self.name, (VECTORS,), (VECTORS,), 1)]

    def run(self, job: Job, model: Loaded, tick: Tick) -> list[Shard]:
        ps, vec = self.study.get(model)
        a = model.adapter.arch
        aie = aie_from_shards(model.cfg.out, held_out(model.words), a.n_layers, a.n_heads)
        arrays: dict[Field, Any] = vector_arrays(ps, vec, function_vectors(vec, aie, FV_KS), model.cfg.dtype)
        arrays[TV.VALIDATION] = validation_array(arrays[TV.VALIDATION])
        tick(1)
        attrs = {"n_demos": ps.n_demos, "chat": ps.chat, "fv_ks": list(FV_KS),  # TV_ATTRS, as shard.write_vectors
                 "coefficients": list(model.cfg.tv_coefficients), "fingerprint": model.fingerprint}
        return [Shard(TASKVEC_DIR, VECTORS, arrays, attrs, name=VECTORS_FILE)]


def taskvec_stages() -> list:
    """AIE, vectors, interventions: the schema's write order (FV_k needs every word's AIE)."""
    study = Study()
    return [AIEStage(study), VectorsStage(study), InterventionStage(study)]
