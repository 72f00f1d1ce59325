"""The extraction run: model + prompt set -> warehouse, resumable, validated, streamed."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from extract.stages.capture.engine import capture, derive, greedy_continue
from extract.config import ExtractConfig
from extract.models.loading import Adapter, ModelError, load_model
from extract.stages.prompts import (
    Prompt,
    build_prompts,
    choose_target,
    default_words,
    is_echo,
    is_exact_echo,
    sha,
)
from extract.stages.capture.sinks import SINK_CAPTURES, add_sink_arrays
from extract.models.sizing import sizes
from store.lock import refuse_if_writing
from store.schema import (
    ABLATION_DIR,
    INVARIANTS,
    PATCHING_DIR,
    PROMPTS_DIR,
    TOLERANCE,
    A,
    F,
    M,
)
from store.warehouse import WarehouseReader, WarehouseWriter, validation_array

LIBRARIES = ("torch", "transformers", "h5py", "numpy", "echo-warehouse")


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


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def environment(adapter: Adapter, cfg: ExtractConfig) -> dict[str, Any]:
    """Where and with what this run computes: one entry of the manifest's ``environments``.

    A resume must match the first run's device, dtype, torch and transformers versions
    (store.schema.ENV_MUST_MATCH) unless ``allow_env_change``.
    """
    dev = adapter.lm_head.weight.device
    libs = library_versions()
    env = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": dev.type,
        "dtype": cfg.dtype,
        "torch": libs["torch"],
        "transformers": libs["transformers"],
        "torch_threads": torch.get_num_threads(),
        "python": libs["python"],
        "platform": platform.platform(),
        "host": platform.node(),
    }
    if dev.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def tokenizer_hash(tok) -> str:
    try:
        return sha(tok.backend_tokenizer.to_str())  # type: ignore[return-value]
    except AttributeError:
        return sha(repr(sorted(tok.get_vocab().items())))  # type: ignore[return-value]


def _apply_chat_template_choice(tok, cfg: ExtractConfig) -> None:
    """--chat-template FILE replaces the tokenizer's own template (its hash is in the manifest)."""
    if cfg.chat_template_file is not None:
        tok.chat_template = cfg.chat_template_file.read_text()


def prepare(cfg: ExtractConfig):
    """Load the model and build the prompt set; nothing is written yet."""
    words = list(cfg.words) if cfg.words is not None else default_words()
    model, tok, ident = load_model(cfg.model, cfg.dtype, cfg.device, cfg.progress)
    _apply_chat_template_choice(tok, cfg)
    adapter = Adapter(model)
    check_layers(cfg.ablate_layers, adapter.arch.n_layers)
    if cfg.patching:
        from extract.stages.patching.pairs import parse_pairs

        parse_pairs(",".join(f"{a}:{b}" for a, b in cfg.patch_pairs) if cfg.patch_pairs else None,
                    len(cfg.templates))  # refuse bad pairs before any work
    prompts = build_prompts(
        tok, words, cfg.templates, chat=cfg.chat_template,
        system_prompt=cfg.system_prompt, prepend_bos=cfg.prepend_bos,
    )
    return adapter, tok, ident, words, prompts


def check_layers(layers: tuple[int, ...] | None, n_layers: int) -> None:
    """Refuse --ablate-layers outside the model before anything is computed or written."""
    if layers is None:
        return
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise ModelError(f"--ablate-layers {','.join(map(str, bad)) or '(none)'} is outside this model's "
                         f"layers 0-{n_layers - 1}")


def _manifest(cfg: ExtractConfig, adapter: Adapter, tok, ident: dict, words: list[str],
              prompts: list[Prompt]) -> dict[str, Any]:
    a = adapter.arch
    resolved = {
        "model": ident["model"],
        "model_revision": ident.get("revision"),
        "words": words,
        "tokenizer_sha": tokenizer_hash(tok),
        "chat_template_sha": sha(getattr(tok, "chat_template", None)) if cfg.chat_template else None,
        "sink_captures": SINK_CAPTURES,  # a warehouse without them (or older ones) is not resumed
    }
    parts = cfg.fingerprint_parts(resolved)
    fp = hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:16]
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "status": "running",
        "fingerprint": fp,
        "fingerprint_parts": parts,
        "model": {**ident, **a.__dict__, "kv_group": a.kv_group},
        "tokenizer": {"class": type(tok).__name__, "sha": resolved["tokenizer_sha"],
                      "chat_template_sha": resolved["chat_template_sha"],
                      "first_token": prompts[0].token_text[0]},
        "config": cfg.as_manifest(),
        "templates": list(cfg.templates),
        "words": words,
        "prompts": [{"index": p.index, "word": p.word, "template_index": p.template_index,
                     "n_tokens": p.n_tokens} for p in prompts],
        "libraries": library_versions(),
        "environments": [environment(adapter, cfg)],  # a resume appends its own
    }


def _write_model_file(w: WarehouseWriter, adapter: Adapter, tok, prompts: list[Prompt]) -> None:
    a = adapter.arch
    ids = sorted({c[1] for p in prompts for c in p.candidates})
    n_text = min(a.vocab_size, len(tok))
    vocab = tok.batch_decode([[i] for i in range(n_text)]) + [""] * (a.vocab_size - n_text)
    with torch.no_grad(), w.model_writer() as s:
        s.put(M.UNEMBED_IDS, np.array(ids, np.int32))
        s.put(M.UNEMBED_ROWS, adapter.folded_unembed(torch.tensor(ids, device=adapter.lm_head.weight.device)).cpu().numpy())
        s.put(M.FINAL_NORM_WEIGHT, adapter.norm_gain(adapter.final_norm).cpu().numpy())
        s.put(M.KV_GROUP, np.array(a.kv_group, np.int32))
        s.put(M.VOCAB_TEXT, vocab)
        s.attrs({"model_type": a.model_type, "n_layers": a.n_layers, "n_heads": a.n_heads,
                 "n_kv_heads": a.n_kv_heads, "head_dim": a.head_dim, "d_model": a.d_model,
                 "vocab_size": a.vocab_size, "norm_eps": a.norm_eps,
                 "final_softcap": float(a.final_softcap or 0.0),
                 "fingerprint": w.manifest["fingerprint"]})


def batches(prompts: list[Prompt], size: int) -> list[list[Prompt]]:
    """Group by token count (equal lengths need no padding, so batching is exact)."""
    groups: dict[int, list[Prompt]] = defaultdict(list)
    for p in prompts:
        groups[p.n_tokens].append(p)
    out = []
    for _, g in sorted(groups.items()):
        out.extend(g[i : i + size] for i in range(0, len(g), size))
    return out


def eos_ids(adapter: Adapter, tok) -> set[int]:
    ids: set[int] = set()
    gen = getattr(adapter.model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


def compute_batch(adapter: Adapter, batch: list[Prompt], cfg: ExtractConfig, eos: set[int]) -> list[tuple]:
    """One extraction batch (prompts of equal length): per prompt the arguments of
    ``write_prompt`` after the warehouse writer, (prompt, form, target id, multi, derived, generation)."""
    dev = adapter.lm_head.weight.device
    ids = torch.tensor([p.input_ids for p in batch], device=dev)  # (B, T)
    cap = capture(adapter, ids)
    logits_np = cap.logits.cpu().numpy()  # (B, V)
    chosen = [choose_target(p, logits_np[i]) for i, p in enumerate(batch)]
    derived = derive(adapter, cap, [c[1] for c in chosen], cfg.top_k, cfg.head_out_all_positions)
    add_sink_arrays(adapter, cap, derived, cfg.top_k)  # value/key/query norms, massive activations
    gens = greedy_continue(adapter, cap, cfg.max_new_tokens, eos)
    del cap
    return [(p, *c, d, g) for p, c, d, g in zip(batch, chosen, derived, gens, strict=True)]


def extract(cfg: ExtractConfig, log=print) -> RunSummary:
    """Run the whole extraction (and ablation grid) into ``cfg.out``."""
    t0 = time.perf_counter()
    refuse_if_writing(cfg.out)  # at once, before minutes of model loading; create() locks
    adapter, tok, ident, words, prompts = prepare(cfg)
    t_load = time.perf_counter() - t0
    manifest = _manifest(cfg, adapter, tok, ident, words, prompts)
    w = WarehouseWriter.create(cfg.out, manifest, resume=cfg.resume, allow_env_change=cfg.allow_env_change)
    try:
        return _run(cfg, w, adapter, tok, prompts, t0, t_load, log)
    finally:
        w.close()  # the writer lock; the OS also releases it if this process dies


def _run(cfg: ExtractConfig, w: WarehouseWriter, adapter: Adapter, tok, prompts: list[Prompt],
         t0: float, t_load: float, log) -> RunSummary:
    manifest = w.manifest
    if not w.has_model_file():
        _write_model_file(w, adapter, tok, prompts)
    done = w.done()
    pending = [p for p in prompts if p.index not in done]
    if done:
        log(f"resuming {cfg.out}: {len(done)} of {len(prompts)} prompts already stored")
    eos = eos_ids(adapter, tok)
    tol = TOLERANCE[cfg.dtype]

    t1 = time.perf_counter()
    bar = tqdm(total=len(pending), unit="prompt", desc="extract", disable=not cfg.progress or not pending,
               file=sys.stderr)

    def write_batch(items) -> None:
        for args in items:
            write_prompt(w, *args, tok, tol, manifest["fingerprint"])
            bar.update(1)

    # One writer thread: a batch's shards are written while the next batch computes. At most
    # one batch waits, so memory stays flat in the number of prompts.
    # Batches are cut from the whole prompt set, never from what is pending: a resumed run
    # recomputes the batches it needs exactly as the first run composed them (BLAS results
    # depend on batch shape), so resumed tensors are bit-identical to an uninterrupted run's.
    # Only the missing shards are written; a finished shard is never rewritten.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending_write = None
        for batch in batches(prompts, cfg.batch_size or sizes(adapter).extract_batch):
            if all(p.index in done for p in batch):
                continue
            items = [it for it in compute_batch(adapter, batch, cfg, eos) if it[0].index not in done]
            if pending_write is not None:
                pending_write.result()  # re-raises a failed write here
            pending_write = pool.submit(write_batch, items)
        if pending_write is not None:
            pending_write.result()
    bar.close()
    t_extract = time.perf_counter() - t1

    timings = {"load_s": round(t_load, 3), "extract_s": round(t_extract, 3), "extract_prompts": len(pending)}
    t_abl = 0.0
    if cfg.ablation:
        from extract.stages.ablation.metrics import run_ablation

        t2 = time.perf_counter()
        with WarehouseReader(cfg.out) as stored:
            targets = {i: int(a["target_id"]) for i, a in stored.iter_prompts()}
            abl = run_ablation(
                adapter, prompts, targets, w, modes=tuple(cfg.ablation), positions=cfg.ablate_positions,
                layers=cfg.ablate_layers, top_k=cfg.top_k, fingerprint=manifest["fingerprint"],
                progress=cfg.progress, reference=lambda i: stored.read(F.FINAL_LOGITS, i), tolerance=tol,
            )
        t_abl = time.perf_counter() - t2
        timings.update({"ablation_s": round(t_abl, 3), **{f"ablation_{k}": v for k, v in (abl or {}).items()}})
    if cfg.patching:
        from extract.stages.patching.metrics import run_patching
        from extract.stages.patching.pairs import build_pairs

        t3 = time.perf_counter()
        with WarehouseReader(cfg.out) as stored:
            targets = {i: int(a["target_id"]) for i, a in stored.iter_prompts()}
            pat = run_patching(
                adapter, build_pairs(prompts, cfg.patch_pairs or ((0, 1),)), targets, w,
                fingerprint=manifest["fingerprint"], reference=lambda i: stored.read(F.FINAL_LOGITS, i),
                tolerance=tol, progress=cfg.progress,
            )
        timings.update({"patching_s": round(time.perf_counter() - t3, 3), "patching_pairs": pat["pairs"]})
    return finish_run(w, cfg, len(prompts), len(pending), len(done), timings, t0)


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


def write_prompt(w: WarehouseWriter, p: Prompt, form: str, tid: int, multi: bool, d, gen: list[int],
                  tok, tol: float, fingerprint: str) -> None:
    text = tok.decode(gen, skip_special_tokens=True)
    rows = [(name, e[0], e[1], tol, bool(e[1] <= tol)) for name, e in d.errors.items()]
    with w.shard_writer(p.index) as s:
        s.put(F.INPUT_IDS, np.array(p.input_ids, np.int32))
        s.put(F.TOKEN_TEXT, p.token_text)
        s.put(F.POSITION_ROLE, np.array(p.roles, np.int8))
        for fld in F.ALL:
            if fld.name in d.arrays:
                s.put(fld, d.arrays[fld.name])
        s.put(F.GENERATED_IDS, np.array(gen, np.int32))
        s.put(F.VALIDATION, validation_array(rows))
        top1 = int(np.argmax(d.arrays["final_logits"]))
        s.attrs({
            "prompt_index": p.index, "word": p.word, "template_index": p.template_index,
            "template": p.template, "text": p.text, "fingerprint": fingerprint,
            "n_tokens": p.n_tokens, "word_start": p.word_start, "word_end": p.word_end,
            "target_id": tid, "target_text": tok.decode([tid]),
            "target_form": form, "word_multi_token": multi, "top1_id": top1,
            "generation": text, "echo_first_token": top1 == tid, "echo_correct": is_echo(p.word, text),
            "echo_exact": is_exact_echo(p.word, text),
        })


def summarise_validation(root) -> dict[str, dict[str, Any]]:
    """Max error of each invariant over every stored shard (prompts and ablation), and which
    prompts failed; only the invariants this run checked appear, in INVARIANTS order."""
    seen: dict[str, dict[str, Any]] = {}
    with WarehouseReader(root) as r:
        folders = [(PROMPTS_DIR, r.prompt_indices()), (ABLATION_DIR, r.ablation_indices())]
        patching = r.root / PATCHING_DIR
        if patching.is_dir():  # patching/<a>-<b>/: same validation dtype (store.schema.PT)
            folders += [(f"{PATCHING_DIR}/{d.name}", r.prompt_indices(f"{PATCHING_DIR}/{d.name}"))
                        for d in sorted(patching.iterdir()) if d.is_dir()]
        for subdir, indices in folders:
            for i in indices:
                fld = F.VALIDATION if subdir == PROMPTS_DIR else A.VALIDATION
                if not r.has(fld, i, subdir):
                    continue  # an ablation shard of a run without the engine check
                for row in r.read(fld, i, subdir=subdir):
                    name = row["invariant"].decode()
                    o = seen.setdefault(name, {"max_abs_err": 0.0, "max_rel_err": 0.0, "tolerance": None,
                                               "failed_prompts": [], "passed": True,
                                               "description": INVARIANTS.get(name, "")})
                    o["max_abs_err"] = max(o["max_abs_err"], float(row["max_abs_err"]))
                    o["max_rel_err"] = max(o["max_rel_err"], float(row["rel_err"]))
                    o["tolerance"] = float(row["tolerance"])
                    if not row["passed"]:
                        o["failed_prompts"].append(i)
                        o["passed"] = False
    order = list(INVARIANTS)
    return dict(sorted(seen.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
