"""The Ray executor: any stage's jobs on a pool of actors; the driver alone records and renames.

The driver (the ``echowh extract --ray`` process) loads the model on its CPU only to write the
manifest and ``model.h5`` and to plan (extract.pipeline.run); it frees the model before the
actors load theirs. The jobs are the local run's (cut from the whole prompt set by the
stage), so results do not depend on where they ran. Each job is one task on a pool of actors;
an actor loads the model once (``Session.load``, checked against the driver's fingerprint),
runs ``Stage.run`` and writes the returned shards into the warehouse directory (a path every
node sees: a shared filesystem) with a staging writer: each shard is written as ``*.partial``,
fsynced and hashed, and the task returns the (path, SHA-256) pairs. The driver alone writes
``shards.sha256``: for each result it appends the entries, then renames the files to their
shard names (``WarehouseWriter.publish``). Concurrent appends from actors on several nodes
are not safe on NFS; and with the ledger written first, a kill anywhere leaves no shard
without its entry (the argument is in store.ledger). The driver alone also writes the
manifest and shows the progress bar.

Failures: an actor whose process dies is restarted by Ray (``max_restarts``) and the task it
was running is retried (``max_task_retries``). A retried task recomputes its whole job (a
batch's numbers depend on its composition) and writes the shards of ``Job.todo``: a finished
shard is never rewritten, a ``*.partial`` left by the dead process is overwritten and never
visible under a shard's name (a dead attempt's files are never published: only a result the
driver receives is). A resumed run (``--resume``, on Ray or locally) plans from the shards on
disk, so the executors can be mixed.

Ray is optional (``pip install -e .[ray]``); it is imported only here, and only when used.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from extract.config import ExtractConfig
from extract.executors.base import Session
from extract.stages.base import Job, Loaded, Stage, write_shard
from store.warehouse import WarehouseWriter

RAY_MISSING = ("--ray needs Ray, an optional extra: pip install 'echo-warehouse[ray]' "
               "(or pip install 'ray==2.*')")
MANIFEST_EVERY_S = 5.0  # the driver rewrites the manifest's placement record at most this often


class RayError(Exception):
    """A user-facing problem with the Ray cluster (Ray missing, unreachable, a task that kept failing)."""


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide a Ray run is."""

    address: str = "auto"
    """``auto``: the cluster in $RAY_ADDRESS or one started on this machine (``ray start``), else
    a new local one; otherwise a cluster address (``HOST:PORT`` or ``ray://HOST:PORT``). A
    process already connected to Ray (``ray.init`` called) runs on that connection."""
    workers: int = 1
    """Actors in the pool; each loads the model once."""
    gpus_per_worker: float = 0.0
    """GPUs Ray reserves per actor (fractions share a GPU); the model runs on cuda when > 0."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves per actor; also the actor's torch thread count."""
    max_retries: int = 3
    """Restarts of a dead actor, and retries of the task it was running."""

    def as_manifest(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def import_ray():
    """Ray, or a one-line RayError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayError(RAY_MISSING) from None
    return ray


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A named cluster address must accept a TCP connection (Ray itself retries for minutes)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayError(f"--ray {address}: give auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


class Worker:
    """One Ray actor: the model loaded once; runs any stage's jobs.

    ``run`` returns a placement record (where it ran) with what it wrote, and under ``staged``
    the (path, SHA-256) of each shard it sealed as ``*.partial``: the driver publishes them.
    An actor never opens the ledger and never gives a shard its final name.
    """

    def __init__(self, load: Callable[[], Loaded], threads: int, stages: list[Stage]) -> None:
        torch.set_num_threads(threads)  # batch results depend on the BLAS thread count
        self.model = load()
        self.stages = {s.name: s for s in stages}
        cfg = self.model.cfg
        # no lock, no ledger: the driver holds the lock, records and renames what this seals
        self.w = WarehouseWriter(cfg.out, cfg.store_dtype, staging=True)
        self.w.manifest = {"fingerprint": self.model.fingerprint}  # every shard stamped with the run's

    @property
    def prompts(self):
        return self.model.prompts

    def where(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(),
                "hostname": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.model.adapter.lm_head.weight.device)}

    def run(self, job: Job) -> dict[str, Any]:
        """Compute one job; seal the shards of its missing members."""
        t = time.perf_counter()
        self.w.take_staged()  # nothing is left from a failed call: its files are not reported
        for shard in self.stages[job.stage].run(job, self.model, lambda n: None):
            write_shard(self.w, shard)
        warnings, self.w.warnings[:] = list(self.w.warnings), []
        staged = self.w.take_staged()
        return {"phase": job.stage, "prompts": list(job.members), "written": sorted(_index(r) for r, _ in staged),
                "seconds": round(time.perf_counter() - t, 3), "warnings": warnings, "staged": staged,
                **self.where()}


def _index(rel: str) -> int:
    """The shard index of a shard path (``.../pNNNNN.h5``, ``.../wNNNNN.h5``; -1 for a named file
    such as ``circuits/graph.h5``)."""
    stem = rel.rsplit("/", 1)[-1].split(".", 1)[0]
    return int(stem[1:]) if stem[1:].isdigit() else -1


class RayExecutor:
    """Runs jobs on a Ray actor pool (extract.executors.base.Executor; module docstring).

    ``on_result(record)`` is called by the driver after each published job (tests kill an
    actor from it).
    """

    computes_here = False

    def __init__(self, rc: RayConfig, on_result: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.rc, self.on_result = rc, on_result
        self.ray: Any = None
        self.actors: list = []
        self.placement: list[dict[str, Any]] = []
        self.session_no = 0
        self.started_ray = False
        self.s: Session | None = None

    def preflight(self) -> None:
        if self.ray is not None:
            return  # checked already (the CLI checks before it builds the config)
        self.ray = import_ray()
        rc = self.rc
        if rc.workers < 1 or rc.cpus_per_worker < 1 or rc.gpus_per_worker < 0:
            raise RayError("--workers and --cpus-per-worker must be >= 1, --gpus-per-worker >= 0")
        check_reachable(rc.address)

    def driver_config(self, cfg: ExtractConfig) -> ExtractConfig:
        return dataclasses.replace(cfg, device="cpu")  # the head node need not have a GPU

    def start(self, session: Session) -> None:
        ray, rc, w = self.ray, self.rc, session.writer
        self.s = session
        timings = w.manifest.get("timings", {})
        self.session_no = int(timings.get("sessions", 1 if timings else 0)) + 1
        self.placement = list(w.manifest.get("placement", []))
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            # Ray runs workers at nice 15 unless told otherwise; the actors are this run's compute.
            os.environ.setdefault("RAY_worker_niceness", "0")
            try:
                ray.init(address=None if rc.address == "auto" else rc.address, log_to_driver=False,
                         include_dashboard=False)
            except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError ...
                raise RayError(f"cannot reach the Ray cluster at {rc.address}: "
                               f"{' '.join(str(e).split())[:300]}") from None
        cfg = session.cfg
        wcfg = dataclasses.replace(cfg, progress=False, resume=True)
        if not (rc.gpus_per_worker > 0 or cfg.device != "auto"):
            wcfg = dataclasses.replace(wcfg, device="cpu")
        remote = ray.remote(Worker).options(
            num_cpus=rc.cpus_per_worker, num_gpus=rc.gpus_per_worker,
            max_restarts=rc.max_retries, max_task_retries=rc.max_retries,
        )
        load = partial(session.load, wcfg, session.fingerprint)
        self.actors = [remote.remote(load, rc.cpus_per_worker, session.stages) for _ in range(rc.workers)]

    def run_stage(self, stage: Stage, jobs: list[Job]) -> int:
        s = self.s
        assert s is not None, "start() first"
        try:
            return self._collect(stage, jobs)
        except BaseException:
            s.writer.write_manifest(placement=self.placement)  # what did finish, and where, survives
            raise

    def _collect(self, stage: Stage, jobs: list[Job]) -> int:
        from ray.util import ActorPool

        ray, rc, s = self.ray, self.rc, self.s
        assert s is not None
        w = s.writer
        pool = ActorPool(self.actors)
        bar = tqdm(total=sum(j.work for j in jobs), unit=stage.unit, desc=f"{stage.name} (ray x{rc.workers})",
                   disable=not s.cfg.progress or not jobs, file=sys.stderr)
        for job in jobs:
            pool.submit(lambda a, j: a.run.remote(j), job)
        written, last_write = 0, time.perf_counter()
        try:
            while pool.has_next():
                try:
                    r = pool.get_next_unordered()
                except ray.exceptions.RayError as e:
                    raise RayError(f"a {stage.name} task failed after {rc.max_retries} retries: "
                                   f"{' '.join(str(e).split())[:300]}; the warehouse is "
                                   "resumable with --resume") from None
                # the ledger entries, then the shard names: only this process writes either
                published = w.publish(r.pop("staged"))
                r["written"] = sorted(_index(rel) for rel in published)
                written += len(published)
                self.placement.append({"session": self.session_no,
                                       **{k: v for k, v in r.items() if k != "warnings"}})
                w.warnings.extend(r["warnings"])
                bar.update(next(j.work for j in jobs if list(j.members) == r["prompts"]))
                if self.on_result is not None:
                    self.on_result(r)
                if time.perf_counter() - last_write > MANIFEST_EVERY_S:
                    w.write_manifest(placement=self.placement)
                    last_write = time.perf_counter()
        finally:
            bar.close()
        return written

    def close(self) -> dict[str, Any]:
        for a in self.actors:
            self.ray.kill(a)  # free the cluster's GPUs now, not when the job ends
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
        return {"placement": self.placement, "ray": {**self.rc.as_manifest(), "session": self.session_no}}
