"""The stage protocol: what an experiment kind writes, and nothing about where it runs.

A stage (capture, ablation, patching, the next kind) does three things:

- ``plan(PlanInput) -> list[Job]``: cut its jobs from the WHOLE prompt set and config (a batch of
  equal-length prompts, an ablation group, a template pair), and drop the jobs whose shards are
  all on disk. A job keeps its members as first composed even when only some of its shards are
  missing: a resumed run recomputes it exactly (BLAS results depend on the batch's shape) and
  writes only ``Job.todo``;
- ``run(Job, Loaded, tick) -> list[Shard]``: compute one job on a loaded model; one ``Shard``
  per missing shard of the job, arrays keyed by the schema's own ``store.schema.Field`` objects;
- say where its shards go: each ``Shard`` names its folder (store.schema's ``*_DIR``) and index.

An executor (extract.executors) runs any stage's jobs and writes the shards with
``write_shard``; the pipeline (extract.pipeline) owns the manifest, the fingerprint, the lock,
the ledger and the validation summary. A stage never opens a writer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from extract.config import ExtractConfig
from extract.models.families import Adapter, Arch
from extract.stages.prompts import Prompt
from store.schema import TOLERANCE, Field
from store.warehouse import WarehouseReader, WarehouseWriter

Tick = Callable[[int], None]


@dataclass(frozen=True)
class Job:
    """One unit of work of a stage: prompts computed together, and the shards still missing."""

    stage: str
    members: tuple[int, ...]  # prompt indices computed together, as the whole prompt set cuts them
    todo: tuple[int, ...]  # shard indices (in the stage's folder) not on disk: only these are written
    work: int  # progress units (Stage.unit) of the job


@dataclass(frozen=True)
class Shard:
    """The content of one shard: folder (store.schema ``*_DIR``), index, arrays in put order."""

    folder: str
    index: int
    arrays: dict[Field, Any]
    attrs: dict[str, Any]
    name: str | None = None  # the file name in ``folder`` when not pNNNNN.h5 (wNNNNN.h5, graph.h5)

    def __post_init__(self) -> None:
        bad = [k for k in self.arrays if not isinstance(k, Field)]
        assert not bad, f"shard arrays are keyed by store.schema.Field, not {bad}"


@dataclass(frozen=True)
class PlanInput:
    """What a stage plans from: the config, the whole prompt set, the model's shape, the disk."""

    cfg: ExtractConfig
    prompts: list[Prompt]
    arch: Arch
    batch_size: int  # the extraction batch (cfg.batch_size, or sized from the planning device)
    done: Callable[[str], set[int]]  # folder -> indices of the shards complete on disk


@dataclass
class Loaded:
    """One process's model side of a run: the model, tokenizer and prompt set a job runs on."""

    cfg: ExtractConfig
    adapter: Adapter
    tok: Any
    prompts: list[Prompt]
    fingerprint: str
    ident: dict[str, Any] = field(default_factory=dict)
    words: list[str] = field(default_factory=list)

    @cached_property
    def by_index(self) -> dict[int, Prompt]:
        return {p.index: p for p in self.prompts}

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.cfg.dtype]

    def reader(self) -> WarehouseReader:
        """The warehouse as stored so far (earlier stages' shards: targets, the model's logits)."""
        return WarehouseReader(self.cfg.out)


class Stage(Protocol):
    """An experiment kind (module docstring)."""

    name: str  # the manifest's phase and timing key ("extract", "ablation", "patching")
    unit: str  # progress unit of Job.work
    count: str  # what one shard is, for the timings ("prompts", "pairs")

    def plan(self, inp: PlanInput) -> list[Job]: ...

    def run(self, job: Job, model: Loaded, tick: Tick) -> list[Shard]: ...


def write_shard(w: WarehouseWriter, shard: Shard) -> None:
    """One shard through the store's writer (atomic, ledgered; staged on a Ray actor)."""
    (w.root / shard.folder).mkdir(parents=True, exist_ok=True)  # patching/<a>-<b>/: one per pair
    with w.shard_writer(shard.index, shard.folder, shard.name) as s:
        for fld, value in shard.arrays.items():
            s.put(fld, value)
        s.attrs(shard.attrs)
