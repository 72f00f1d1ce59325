"""A warehouse with task-vector shards for the query and report tests: a tiny Llama extracted
(with --patching and the default ablation, so the rank joins have data), then the study run by the
engine on a few words and written by extract.stages.taskvec.shard (the stage's calls, in its order)."""

from __future__ import annotations

from pathlib import Path

from extract.config import ExtractConfig
from extract.models.families import Adapter
from extract.models.loading import load_model
from extract.pipeline.run import extract
from extract.stages.taskvec import (
    aie_table,
    build_set,
    build_vectors,
    function_vectors,
    plan_aie,
    plan_interventions,
    run_rows,
)
from extract.stages.taskvec.shard import (
    AIE_SET,
    INTERVENTIONS_SET,
    StudyMeta,
    read_word,
    with_shuffled,
    write_vectors,
    write_word,
)
from store.reader import load_manifest
from store.taskvec_schema import Kind
from store.warehouse import WarehouseWriter

# 3 train (cat, tree, sun), 3 held out (dog, house, moon)
WORDS = ("cat", "dog", "tree", "house", "sun", "moon")
TEMPLATES = ("repeat the following word: {word}", "echo the following word: {word}")
N_DEMOS = 2
KS = (1, 2, 3)  # the tiny model has few heads: k in 5, 10, 20 would take every head
COEFS = (0.0, 1.0, 4.0)
SYSTEM = "Be brief."


def build(model_dir: Path, out: Path, *, task_vectors: bool = True) -> Path:
    cfg = ExtractConfig(out=out, model=str(model_dir), device="cpu", words=WORDS, templates=TEMPLATES,
                        patching=True, ablation=("zero",), progress=False)
    s = extract(cfg, log=lambda m: None)
    assert not s.failed, s.validation
    if task_vectors:
        write_study(model_dir, out)
    return out


def write_study(model_dir: Path, out: Path) -> None:
    """The stage's sequence: AIE shards, (reading them back) vectors.h5, intervention shards."""
    model, tok, _ = load_model(str(model_dir), device="cpu", progress=False)
    ad = Adapter(model)
    a = ad.arch
    ps = build_set(tok, list(WORDS), n_demos=N_DEMOS, system_prompt=SYSTEM)
    vec = build_vectors(ad, ps)
    w = WarehouseWriter(out)
    w.manifest = load_manifest(out)
    held = ps.split.held_out
    for r in run_rows(ad, ps, held, plan_aie(a.n_layers, a.n_heads), vec).values():
        write_word(w, AIE_SET, r)
    aie = {word: read_word(out, AIE_SET, ps.split.words.index(word)) for word in held}
    fv = function_vectors(vec, aie_table(aie, a.n_layers, a.n_heads), KS)
    write_vectors(w, ps, vec, fv, StudyMeta(N_DEMOS, True, KS, COEFS))
    rows = run_rows(ad, ps, held, plan_interventions(a.n_layers, KS, COEFS), vec, fv, clean_kinds=(Kind.DEMO,))
    for word, r in rows.items():
        write_word(w, INTERVENTIONS_SET, with_shuffled(r, aie[word]))
