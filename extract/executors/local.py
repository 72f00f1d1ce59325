"""The local executor: every job in this process, with one background writer thread.

A job's shards are written while the next job computes. At most one job's shards wait, so
memory stays flat in the number of prompts; a failed write re-raises before the next job is
handed over. Jobs come planned from the whole prompt set (extract.stages.base), so a resumed
run recomputes exactly what the first run computed and writes only the missing shards.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tqdm.auto import tqdm

from extract.config import ExtractConfig
from extract.executors.base import Session
from extract.stages.base import Job, Shard, Stage, write_shard


class LocalExecutor:
    """Runs jobs on the driver's own model (extract.executors.base.Executor)."""

    computes_here = True

    def __init__(self) -> None:
        self.session: Session | None = None

    def preflight(self) -> None:
        return None

    def driver_config(self, cfg: ExtractConfig) -> ExtractConfig:
        return cfg

    def start(self, session: Session) -> None:
        assert session.model is not None, "the local executor computes on the driver's model"
        self.session = session

    def run_stage(self, stage: Stage, jobs: list[Job]) -> int:
        s = self.session
        assert s is not None and s.model is not None, "start() first"
        bar = tqdm(total=sum(j.work for j in jobs), unit=stage.unit, desc=stage.name,
                   disable=not s.cfg.progress or not jobs, file=sys.stderr)

        def write(shards: list[Shard]) -> None:
            for sh in shards:
                write_shard(s.writer, sh)

        written = 0
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending: Future | None = None
                for job in jobs:
                    shards = stage.run(job, s.model, bar.update)
                    if pending is not None:
                        pending.result()  # re-raises a failed write here
                    pending = pool.submit(write, shards)
                    written += len(shards)
                if pending is not None:
                    pending.result()
        finally:
            bar.close()
        return written

    def close(self) -> dict[str, Any]:
        return {}
