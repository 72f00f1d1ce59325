"""The extraction run: model + prompt set -> warehouse, resumable, validated, streamed.

The one place that owns a run's bookkeeping: the lock (``WarehouseWriter.create``), the
manifest and fingerprint (extract.pipeline.manifest), ``model.h5``, the order of the stages,
the timings and the validation summary. What is computed is the stages' (extract.stages);
where, the executor's (extract.executors: local, or a Ray actor pool).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from extract.config import ExtractConfig, check_model_fit
from extract.executors.base import Executor, Session
from extract.executors.local import LocalExecutor
from extract.models.families import Adapter
from extract.models.loading import ModelError, load_model
from extract.models.sizing import sizes
from extract.pipeline.manifest import fingerprint, make_manifest, write_model_file
from extract.pipeline.validation import summarise_validation
from extract.stages.ablation.stage import AblationStage
from extract.stages.base import Loaded, PlanInput, Stage
from extract.stages.capture.stage import CaptureStage
from extract.stages.circuits.stage import circuit_stages
from extract.stages.patching.stage import PatchingStage
from extract.stages.prompts import build_prompts, default_words
from extract.stages.taskvec.stage import taskvec_stages
from store.lock import refuse_if_writing
from store.warehouse import WarehouseWriter


@dataclass
class RunSummary:
    """What a run did, for the CLI to print and the exit code."""

    out: str
    n_prompts: int
    n_extracted: int
    n_skipped: int
    validation: dict[str, dict[str, Any]]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.validation.items() if not v["passed"]]


def stages_for(cfg: ExtractConfig) -> list[Stage]:
    """The run's stages, in order: capture, then the ablation grid, patching, circuits (one stage
    per pair kind) and the task-vector phases (AIE, vectors, interventions) when asked."""
    out: list[Stage] = [CaptureStage()]
    if cfg.ablation:
        out.append(AblationStage())
    if cfg.patching:
        out.append(PatchingStage())
    out += circuit_stages(cfg)
    if cfg.task_vectors:
        out += taskvec_stages()
    return out


def stage_records(stages: list[Stage], model: Loaded) -> dict[str, Any]:
    """What stages record in the manifest (``record(model)``: circuit pairs, the task-vector
    split and prompt set), merged one level deep (``circuits.template``, ``circuits.word``)."""
    out: dict[str, Any] = {}
    for s in stages:
        rec = getattr(s, "record", None)
        for k, v in (rec(model) if rec is not None else {}).items():
            out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def load(cfg: ExtractConfig, expect: str | None = None) -> Loaded:
    """Load the model and build the prompt set; nothing is written. ``expect``: the fingerprint
    a worker must reproduce (same model files and prompt set as the driver)."""
    words = list(cfg.words) if cfg.words is not None else default_words()
    model, tok, ident = load_model(cfg.model, cfg.dtype, cfg.device, cfg.progress)
    if cfg.chat_template_file is not None:  # replaces the tokenizer's template (hash in the manifest)
        tok.chat_template = cfg.chat_template_file.read_text()
    adapter = Adapter(model)
    check_model_fit(cfg, adapter.arch.n_layers)
    prompts = build_prompts(tok, words, cfg.templates, chat=cfg.chat_template,
                            system_prompt=cfg.system_prompt, prepend_bos=cfg.prepend_bos)
    fp, _ = fingerprint(cfg, tok, ident, words)
    if expect is not None and fp != expect:
        import socket

        raise ModelError(f"worker on {socket.gethostname()} built another prompt set or model "
                         f"(fingerprint {fp}, driver {expect}): same model files on every node?")
    return Loaded(cfg, adapter, tok, prompts, fp, ident, words)


def extract(cfg: ExtractConfig, executor: Executor | None = None, log=print) -> RunSummary:
    """Run the whole extraction (and its ablation grid and patching) into ``cfg.out``."""
    ex = executor or LocalExecutor()
    ex.preflight()
    t0 = time.perf_counter()
    refuse_if_writing(cfg.out)  # at once, before minutes of model loading; create() locks
    model = load(ex.driver_config(cfg))
    t_load = time.perf_counter() - t0
    w = WarehouseWriter.create(cfg.out, make_manifest(cfg, model), resume=cfg.resume,
                               allow_env_change=cfg.allow_env_change)
    try:
        return _run(cfg, ex, w, model, t0, t_load, log)
    finally:
        w.close()  # the writer lock; the OS also releases it if this process dies


def _run(cfg: ExtractConfig, ex: Executor, w: WarehouseWriter, model: Loaded, t0: float, t_load: float,
         log) -> RunSummary:
    if not w.has_model_file():
        write_model_file(w, model)
    n_prompts = len(model.prompts)
    done = w.done()
    if done:
        log(f"resuming {cfg.out}: {len(done)} of {n_prompts} prompts already stored")
    # Plans are cut on the driver: the extraction batch from its device (a Ray pool on GPUs
    # matches a local GPU run's batches with --batch-size).
    base = PlanInput(cfg, model.prompts, model.adapter.arch, cfg.batch_size or sizes(model.adapter).extract_batch,
                     w.done)
    stages = stages_for(cfg)
    records = stage_records(stages, model)
    if records:
        w.write_manifest(**records)
    session = Session(cfg, w, model if ex.computes_here else None, model.fingerprint, load, stages)
    if not ex.computes_here:
        model.adapter = None  # type: ignore[assignment]  # the driver computes nothing: free the
        # model's weights before the workers load theirs (extract() still holds the Loaded)
    timings: dict[str, Any] = {"load_s": round(t_load, 3)}
    written: dict[str, int] = {}
    ex.start(session)
    try:
        for stage in stages:
            t = time.perf_counter()
            written[stage.name] = ex.run_stage(stage, stage.plan(base))
            timings.update({f"{stage.name}_s": round(time.perf_counter() - t, 3),
                            f"{stage.name}_{stage.count}": written[stage.name]})
    finally:
        record = ex.close()
    return finish_run(w, cfg, n_prompts, written["extract"], len(done), timings, t0, **record)


def finish_run(w: WarehouseWriter, cfg: ExtractConfig, n_prompts: int, n_extracted: int, n_skipped: int,
               timings: dict[str, Any], t0: float, **record: Any) -> RunSummary:
    """Validate every stored shard and write the final manifest (status, timings, validation);
    ``record`` adds further manifest keys (a Ray run's placement)."""
    validation = summarise_validation(cfg.out)
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    status = "complete" if all(v["passed"] for v in validation.values()) else "failed-validation"
    w.write_manifest(status=status, timings=accumulate_timings(w.manifest.get("timings", {}), timings),
                     validation=validation, warnings=sorted(set(w.manifest.get("warnings", []) + w.warnings)),
                     completed=datetime.now(UTC).isoformat(timespec="seconds"), **record)
    return RunSummary(str(cfg.out), n_prompts, n_extracted, n_skipped, validation, timings, w.warnings)


def accumulate_timings(previous: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
    """The manifest's timings: every session (a resumed run adds one) and their totals.

    A resume must not replace the first run's minutes with its own seconds.
    """
    runs = list(previous.get("runs", [previous] if previous else []))
    runs.append(session)
    keys = dict.fromkeys(k for r in runs for k, v in r.items() if isinstance(v, int | float))
    totals = {k: round(sum(r.get(k, 0) for r in runs), 3) for k in keys}
    return {**totals, "sessions": len(runs), "runs": runs}
