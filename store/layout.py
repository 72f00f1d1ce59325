"""What files a warehouse's manifest implies, and the manifest's own shape: shared by the
reader (checked on open) and ``verify`` (checked in full).

A prompt's shard is ``prompts/pNNNNN.h5``; with ablation ``ablation/pNNNNN.h5`` too; with
``--patching`` one ``patching/<a>-<b>/pNNNNN.h5`` per (template pair, word), named by the
prompt index of the word's template-a prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store.circuits_schema import CIRCUITS_DIR, GRAPH_FILE
from store.schema import (
    ABLATION_DIR,
    MODEL_FILE,
    PARTIAL_SUFFIX,
    PATCHING_DIR,
    PROMPTS_DIR,
    prompt_shard_name,
)
from store.taskvec_schema import (
    AIE_SET,
    INTERVENTIONS_SET,
    TASKVEC_DIR,
    VECTORS_FILE,
    word_shard_name,
)

SHARD_NAME = re.compile(r"^p(\d{5,})\.h5$")
# a finished run (all shards written); "running" is a run still writing or killed: resume it
FINISHED = ("complete", "failed-validation")


@dataclass(frozen=True)
class Expected:
    """One file the manifest implies: its kind and the prompt index it belongs to."""

    kind: str  # store.checks.Kind
    index: int | None


def manifest_problems(m: Mapping[str, Any]) -> list[str]:
    """What is malformed in a manifest's prompt list, words and templates (one line each)."""
    prompts = m.get("prompts", [])
    if not isinstance(prompts, list):
        return [f"'prompts' is a {type(prompts).__name__}, not a list"]
    out: list[str] = []
    seen: set[int] = set()
    for n, p in enumerate(prompts):
        if not isinstance(p, Mapping) or not isinstance(p.get("index"), int) or isinstance(p.get("index"), bool):
            out.append(f"prompts[{n}] has no integer 'index'")
            continue
        if p["index"] < 0 or p["index"] in seen:
            out.append(f"prompts[{n}] has index {p['index']} (negative or repeated)")
        seen.add(p["index"])
        for key, typ in (("word", str), ("template_index", int), ("n_tokens", int)):
            if key in p and (not isinstance(p[key], typ) or isinstance(p[key], bool)):
                out.append(f"prompts[{n}].{key} is {p[key]!r}, not {typ.__name__}")
    for key in ("words", "templates"):
        v = m.get(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
            out.append(f"'{key}' is not a list of text")
    if not isinstance(m.get("config", {}), Mapping):
        out.append("'config' is not an object")
    if out:
        return out
    words = m.get("words")
    in_prompts = {p["word"] for p in prompts if "word" in p}
    if words is not None and (len(set(words)) != len(words) or set(words) != in_prompts):
        out.append(f"the word list {_short(words)} is not the prompts' words {_short(sorted(in_prompts))}")
    parts = m.get("fingerprint_parts")
    if words is not None and isinstance(parts, Mapping) and "words" in parts and parts["words"] != words:
        out.append("the word list differs from the one the fingerprint was made from")
    templates = m.get("templates")
    if templates is not None:
        bad = [p["index"] for p in prompts if not 0 <= p.get("template_index", 0) < len(templates)]
        if bad:
            out.append(f"prompt {bad[0]} has a template_index outside the {len(templates)} templates")
    return out


def _short(words: list[str]) -> str:
    return repr(words) if len(words) <= 6 else repr([*words[:6], "..."])


def expected_files(m: Mapping[str, Any]) -> dict[str, Expected]:
    """Path relative to the warehouse -> what it holds, for every file the manifest implies
    (call :func:`manifest_problems` first)."""
    cfg = m.get("config") or {}
    out = {MODEL_FILE: Expected("model", None)}
    for p in m.get("prompts", []):
        i = int(p["index"])
        out[f"{PROMPTS_DIR}/{prompt_shard_name(i)}"] = Expected("prompt", i)
        if cfg.get("ablation"):
            out[f"{ABLATION_DIR}/{prompt_shard_name(i)}"] = Expected("ablation", i)
    if cfg.get("patching"):
        index = {(p.get("word"), int(p.get("template_index", -1))): int(p["index"]) for p in m.get("prompts", [])}
        for a, b in cfg.get("patch_pairs") or [[0, 1]]:
            for w in m.get("words", []):
                if (w, int(a)) in index and (w, int(b)) in index:
                    i = index[(w, int(a))]
                    out[f"{PATCHING_DIR}/{a}-{b}/{prompt_shard_name(i)}"] = Expected("patching", i)
    out.update(stage_files_expected(m))
    return out


def stage_files_expected(m: Mapping[str, Any]) -> dict[str, Expected]:
    """Circuits (``circuits.<kind>.pairs`` of the manifest: one shard per pair, the graph once) and
    the task-vector study (``taskvec.held_out_indices``: an AIE and an interventions shard per
    held-out word, vectors.h5 once)."""
    cfg = m.get("config") or {}
    out: dict[str, Expected] = {}
    circuits = m.get("circuits") or {}
    if cfg.get("circuits") and isinstance(circuits, Mapping):
        out[f"{CIRCUITS_DIR}/{GRAPH_FILE}"] = Expected("circuits_graph", None)
        for kind in cfg["circuits"]:
            for clean, *_ in (circuits.get(kind) or {}).get("pairs", []):
                out[f"{CIRCUITS_DIR}/{kind}/{prompt_shard_name(int(clean))}"] = Expected("circuits", int(clean))
    tv = m.get("taskvec") or {}
    if cfg.get("task_vectors") and isinstance(tv, Mapping):
        out[f"{TASKVEC_DIR}/{VECTORS_FILE}"] = Expected("taskvec", None)  # store.checks' kinds
        for i in tv.get("held_out_indices", []):
            for sub in (AIE_SET, INTERVENTIONS_SET):
                out[f"{TASKVEC_DIR}/{sub}/{word_shard_name(int(i))}"] = Expected("taskvec_word", int(i))
    return out


def shard_files(root: Path, m: Mapping[str, Any] | None = None) -> set[str]:
    """Every file with a shard's name under prompts/, ablation/ and patching/*/ (relative paths;
    ``*.partial`` and other names are verify's to report)."""
    out: set[str] = set()
    folders = [root / PROMPTS_DIR, root / ABLATION_DIR]
    if (root / PATCHING_DIR).is_dir():
        folders += [d for d in sorted((root / PATCHING_DIR).iterdir()) if d.is_dir()]
    for folder in folders:
        if folder.is_dir():
            out |= {p.relative_to(root).as_posix() for p in folder.iterdir()
                    if SHARD_NAME.match(p.name) and not p.name.endswith(PARTIAL_SUFFIX)}
    cfg = (m or {}).get("config") or {}
    # circuits/ and taskvec/ of a run that had them on (store.layout.stage_files_expected); files
    # written there by other means (a study written beside a plain run) are the views' to check
    for top, on in ((CIRCUITS_DIR, cfg.get("circuits")), (TASKVEC_DIR, cfg.get("task_vectors"))):
        if on and (root / top).is_dir():
            out |= {p.relative_to(root).as_posix() for p in (root / top).rglob("*.h5")}
    return out
