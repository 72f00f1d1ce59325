"""Extraction on a Ray cluster: the local run's batches and ablation groups as Ray tasks.

The driver (the ``echowh extract --ray`` process) builds the prompt set, writes the manifest
and the model file, and cuts the same extraction batches (``run.batches``) and ablation groups
(``ablation.grid_groups``) from the whole prompt set as the local run does, so results do not
depend on where they ran. Each batch or group is one task on a pool of actors; an actor loads
the model once and writes its prompts' shards into the warehouse directory (a path every node
sees: a shared filesystem) with a staging writer: each shard is written as ``*.partial``,
fsynced and hashed, and the task returns the (path, SHA-256) pairs. The driver alone writes
``shards.sha256``: for each result it appends the entries, then renames the files to their
shard names (``WarehouseWriter.publish``). Concurrent appends from actors on several nodes
are not safe on NFS; and with the ledger written first, a kill anywhere leaves no shard
without its entry (the argument is in store.ledger). The driver alone also writes the
manifest and shows the progress bar.

Failures: an actor whose process dies is restarted by Ray (``max_restarts``) and the task it
was running is retried (``max_task_retries``). A retried task recomputes its whole batch (a
batch's numbers depend on its composition) and writes only the shards still missing: a
finished shard is never rewritten, a ``*.partial`` left by the dead process is overwritten
and never visible under a shard's name (a dead attempt's files are never published: only a
result the driver receives is). A resumed run (``--resume``, on Ray or locally) does the same
from the shards on disk, so the modes can be mixed.

Ray is optional (``pip install -e .[ray]``); it is imported only here.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from extract.stages.ablation.metrics import grid_groups, run_ablation
from extract.config import ExtractConfig
from extract.pipeline.run import (
    RunSummary,
    _manifest,
    _write_model_file,
    batches,
    compute_batch,
    eos_ids,
    finish_run,
    prepare,
    write_prompt,
)
from extract.models.sizing import sizes
from store.lock import refuse_if_writing
from store.schema import ABLATION_DIR, PROMPTS_DIR, TOLERANCE, F, prompt_shard_name
from store.warehouse import WarehouseReader, WarehouseWriter

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
    """One Ray actor: the model loaded once; runs extraction batches and ablation groups.

    Every method returns a placement record (where it ran) with what it wrote, and under
    ``staged`` the (path, SHA-256) of each shard it sealed as ``*.partial``: the driver
    publishes them. An actor never opens the ledger and never gives a shard its final name.
    """

    def __init__(self, cfg: ExtractConfig, fingerprint: str, threads: int) -> None:
        torch.set_num_threads(threads)  # batch results depend on the BLAS thread count
        self.cfg = dataclasses.replace(cfg, progress=False, resume=True)
        self.adapter, self.tok, ident, words, self.prompts = prepare(self.cfg)
        own = _manifest(self.cfg, self.adapter, self.tok, ident, words, self.prompts)["fingerprint"]
        if own != fingerprint:
            raise RayError(f"worker on {socket.gethostname()} built another prompt set or model "
                           f"(fingerprint {own}, driver {fingerprint}): same model files on every node?")
        self.fingerprint = fingerprint
        self.by_index = {p.index: p for p in self.prompts}
        self.eos = eos_ids(self.adapter, self.tok)
        self.tol = TOLERANCE[cfg.dtype]
        # no lock, no ledger: the driver holds the lock, records and renames what this seals
        self.w = WarehouseWriter(cfg.out, cfg.store_dtype, staging=True)
        self.w.manifest = {"fingerprint": fingerprint}  # every shard stamped with the run's
        self.means = None

    def where(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(),
                "hostname": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.adapter.lm_head.weight.device)}

    def extract_batch(self, indices: list[int]) -> dict[str, Any]:
        """Compute one batch; write the shards of its prompts that are still missing."""
        t = time.perf_counter()
        batch = [self.by_index[i] for i in indices]
        done = self.w.done()
        self.w.take_staged()  # nothing is left from a failed call: its files are not reported
        if not all(p.index in done for p in batch):
            for item in compute_batch(self.adapter, batch, self.cfg, self.eos):
                if item[0].index not in done:
                    write_prompt(self.w, *item, self.tok, self.tol, self.fingerprint)
        return self._record("extract", indices, t)

    def ablate_group(self, indices: list[int], targets: dict[int, int]) -> dict[str, Any]:
        """Run one ablation group (as ``grid_groups`` cut it); write its missing shards."""
        t = time.perf_counter()
        cfg = self.cfg
        self.w.take_staged()
        if "mean" in cfg.ablation and self.means is None:
            from extract.stages.ablation.metrics import compute_means

            self.means = compute_means(self.adapter, self.prompts)  # every prompt, once per actor
        with WarehouseReader(cfg.out) as stored:
            run_ablation(
                self.adapter, self.prompts, targets, self.w, modes=tuple(cfg.ablation),
                positions=cfg.ablate_positions, layers=cfg.ablate_layers, top_k=cfg.top_k,
                fingerprint=self.fingerprint, progress=False,
                reference=lambda i: stored.read(F.FINAL_LOGITS, i), tolerance=self.tol,
                means=self.means, only=lambda g: [p.index for p in g] == indices,
            )
        return self._record("ablation", indices, t)

    def _record(self, phase: str, indices: list[int], t: float) -> dict[str, Any]:
        warnings, self.w.warnings[:] = list(self.w.warnings), []
        staged = self.w.take_staged()
        return {"phase": phase, "prompts": list(indices), "written": sorted(_index(rel) for rel, _ in staged),
                "seconds": round(time.perf_counter() - t, 3), "warnings": warnings, "staged": staged,
                **self.where()}


def _index(rel: str) -> int:
    """The prompt index of a shard path (``.../pNNNNN.h5``)."""
    return int(rel.rsplit("/", 1)[-1][1:].split(".", 1)[0])


def extract_ray(cfg: ExtractConfig, rc: RayConfig, log: Callable[[str], None] = print,
                on_result: Callable[[dict[str, Any]], None] | None = None) -> RunSummary:
    """The whole extraction (and ablation grid) into ``cfg.out`` on a Ray actor pool.

    ``on_result(record)`` is called by the driver after each finished batch or group.
    """
    if cfg.patching:
        raise RayError("--patching does not run on Ray yet: run the patching grid locally "
                       "(`echowh extract ... --patching` without --ray)")
    ray = import_ray()
    if rc.workers < 1 or rc.cpus_per_worker < 1 or rc.gpus_per_worker < 0:
        raise RayError("--workers and --cpus-per-worker must be >= 1, --gpus-per-worker >= 0")
    check_reachable(rc.address)
    t0 = time.perf_counter()
    # The driver computes only the manifest and model.h5: it loads the model on its CPU (the head
    # node need not have a GPU); the actors load it where cfg.device says.
    refuse_if_writing(cfg.out)  # at once, before the model loads; create() takes the lock
    adapter, tok, ident, words, prompts = prepare(dataclasses.replace(cfg, device="cpu"))
    t_load = time.perf_counter() - t0
    manifest = _manifest(cfg, adapter, tok, ident, words, prompts)
    w = WarehouseWriter.create(cfg.out, manifest, resume=cfg.resume, allow_env_change=cfg.allow_env_change)
    try:
        return _drive(ray, cfg, rc, w, adapter, tok, prompts, t0, t_load, log, on_result)
    finally:
        w.close()  # the writer lock: the driver holds it while the actors write shards


def _drive(ray, cfg: ExtractConfig, rc: RayConfig, w: WarehouseWriter, adapter, tok, prompts, t0: float,
           t_load: float, log, on_result) -> RunSummary:
    manifest = w.manifest
    if not w.has_model_file():
        _write_model_file(w, adapter, tok, prompts)
    # The extraction batches a local run on this CPU would cut (on a GPU actor pool pass
    # --batch-size to match a local GPU run's device-sized batches).
    batch_size = cfg.batch_size or sizes(adapter).extract_batch
    del adapter  # the driver computes nothing: free the model before the actors load theirs
    done = w.done()
    if done:
        log(f"resuming {cfg.out}: {len(done)} of {len(prompts)} prompts already stored")
    fp = manifest["fingerprint"]
    session = int(w.manifest.get("timings", {}).get("sessions", 1 if w.manifest.get("timings") else 0)) + 1
    placement: list[dict[str, Any]] = list(w.manifest.get("placement", []))
    started_ray = not ray.is_initialized()
    if started_ray:
        # Ray runs workers at nice 15 unless told otherwise; the actors are this run's compute.
        os.environ.setdefault("RAY_worker_niceness", "0")
        try:
            ray.init(address=None if rc.address == "auto" else rc.address, log_to_driver=False,
                     include_dashboard=False)
        except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError ...
            raise RayError(f"cannot reach the Ray cluster at {rc.address}: "
                           f"{' '.join(str(e).split())[:300]}") from None
    actors: list = []
    try:
        actors = _actors(ray, cfg, rc, fp)
        from ray.util import ActorPool

        pool = ActorPool(actors)
        last_write = [time.perf_counter()]

        def collect(phase: str, subdir: str, jobs: list[list[int]], method: str, *args: Any) -> None:
            bar = tqdm(total=sum(map(len, jobs)), unit="prompt", desc=f"{phase} (ray x{rc.workers})",
                       disable=not cfg.progress or not jobs, file=sys.stderr)
            for job in jobs:
                pool.submit(lambda a, v: getattr(a, method).remote(v, *args), job)
            try:
                while pool.has_next():
                    try:
                        r = pool.get_next_unordered()
                    except ray.exceptions.RayError as e:
                        raise RayError(f"a {phase} task failed after {rc.max_retries} retries: "
                                       f"{' '.join(str(e).split())[:300]}; the warehouse is "
                                       "resumable with --resume") from None
                    # the ledger entries, then the shard names: only this process writes either
                    published = set(w.publish(r.pop("staged")))
                    r["written"] = [i for i in r["written"] if f"{subdir}/{prompt_shard_name(i)}" in published]
                    placement.append({"session": session, **{k: v for k, v in r.items() if k != "warnings"}})
                    w.warnings.extend(r["warnings"])
                    bar.update(len(r["prompts"]))
                    if on_result is not None:
                        on_result(r)
                    if time.perf_counter() - last_write[0] > MANIFEST_EVERY_S:
                        w.write_manifest(placement=placement)
                        last_write[0] = time.perf_counter()
            finally:
                bar.close()

        t1 = time.perf_counter()
        jobs = [[p.index for p in b] for b in batches(prompts, batch_size)
                if not all(p.index in done for p in b)]
        collect("extract", PROMPTS_DIR, jobs, "extract_batch")
        n_extracted = len(w.done() - done)  # the shards this session published
        timings: dict[str, Any] = {"load_s": round(t_load, 3), "extract_s": round(time.perf_counter() - t1, 3),
                                   "extract_prompts": n_extracted}
        if cfg.ablation:
            t2 = time.perf_counter()
            with WarehouseReader(cfg.out) as stored:
                targets = {i: int(a["target_id"]) for i, a in stored.iter_prompts()}
            have = w.done(ABLATION_DIR)
            groups = [[p.index for p in g] for g in grid_groups(prompts)
                      if not all(p.index in have for p in g)]
            collect("ablation", ABLATION_DIR, groups, "ablate_group", targets)
            n_abl = len(w.done(ABLATION_DIR) - have)
            timings.update({"ablation_s": round(time.perf_counter() - t2, 3), "ablation_prompts": n_abl})
    except BaseException:
        w.write_manifest(placement=placement)  # what did finish, and where, survives a failed run
        raise
    finally:
        for a in actors:
            ray.kill(a)  # free the cluster's GPUs now, not when the job ends
        if started_ray:
            ray.shutdown()
    return finish_run(w, cfg, len(prompts), n_extracted, len(done), timings, t0, placement=placement,
                      ray={**rc.as_manifest(), "session": session})


def _actors(ray, cfg: ExtractConfig, rc: RayConfig, fingerprint: str) -> list:
    remote = ray.remote(Worker).options(
        num_cpus=rc.cpus_per_worker, num_gpus=rc.gpus_per_worker,
        max_restarts=rc.max_retries, max_task_retries=rc.max_retries,
    )
    wcfg = cfg if rc.gpus_per_worker > 0 or cfg.device != "auto" else dataclasses.replace(cfg, device="cpu")
    return [remote.remote(wcfg, fingerprint, rc.cpus_per_worker) for _ in range(rc.workers)]
