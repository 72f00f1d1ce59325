"""The executor protocol: run any stage's jobs somewhere, and get every shard written once.

The pipeline (extract.pipeline.run) loads the model, writes the manifest and holds the writer
lock; for each stage it plans the jobs and hands them to an executor. An executor knows
nothing about a stage but ``Stage.run`` and ``Stage.unit``: it runs each job on a loaded model
and gets the returned shards written (extract.stages.base.write_shard) by the one process
that holds the lock and the ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from extract.config import ExtractConfig
from extract.stages.base import Job, Loaded, Stage
from store.warehouse import WarehouseWriter

Loader = Callable[[ExtractConfig, str], Loaded]  # (config, fingerprint) -> the model side, checked


@dataclass
class Session:
    """What an executor runs with: the driver's writer and model, and how a worker loads one."""

    cfg: ExtractConfig
    writer: WarehouseWriter  # holds the lock and the ledger
    model: Loaded | None  # the driver's model (None when the driver does not compute)
    fingerprint: str
    load: Loader  # picklable (a module-level function): a remote worker loads its own model
    stages: list[Stage]  # the run's stages, in order (a remote worker gets its own copies)


class Executor(Protocol):
    def preflight(self) -> None:
        """Refuse bad settings in one line before anything is loaded or written."""

    def driver_config(self, cfg: ExtractConfig) -> ExtractConfig:
        """The config the driver loads its model with (a Ray driver: on its CPU)."""

    computes_here: bool  # jobs run on the driver's model (else the driver frees it first)

    def start(self, session: Session) -> None: ...

    def run_stage(self, stage: Stage, jobs: list[Job]) -> int:
        """Run the jobs; returns the shards this session wrote."""

    def close(self) -> dict[str, Any]:
        """Release workers; returns what the manifest records about where jobs ran."""
