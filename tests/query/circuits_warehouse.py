"""A real tiny warehouse with circuit shards, for the circuits views, analyses and report tests.

The tiny random Qwen2 of tests/conftest.py, three single-token words x the two templates,
extracted with a zero-ablation grid (for the ranking joins); then extract.stages.circuits scores every
template pair (both directions) and word pair with EAP-IG in 2 steps, evaluates the circuits
(patch replacement, 2 top + 2 random exact edges per input kind) and writes the graph and one
shard per pair into the same warehouse, as the pipeline stage does.
"""

from __future__ import annotations

from pathlib import Path

from extract.config import ExtractConfig
from extract.models.families import Adapter
from extract.models.loading import load_model
from extract.pipeline.run import extract
from extract.stages.circuits.faithfulness import evaluate_circuits
from extract.stages.circuits.graph import graph_of
from extract.stages.circuits.pairs import template_pairs, word_pairs
from extract.stages.circuits.scores import score_pairs
from extract.stages.circuits.shard import to_shard, write_graph, write_shard
from extract.stages.prompts import build_prompts
from store.reader import load_manifest
from store.warehouse import WarehouseWriter

WORDS = ("cat", "dog", "house")
TOLERANCE = 1e-4  # float32 tiny model: the invariants' relative tolerance


def build(root: Path, model_dir: Path, *, circuits: bool = True) -> Path:
    cfg = ExtractConfig(out=root, model=str(model_dir), words=WORDS, ablation=("zero",), progress=False)
    extract(cfg, log=lambda m: None)
    if not circuits:
        return root
    model, tok, _ = load_model(str(model_dir), device="cpu", progress=False)
    prompts = build_prompts(tok, list(WORDS), cfg.templates, chat=cfg.chat_template,
                            system_prompt=cfg.system_prompt, prepend_bos=cfg.prepend_bos)
    ad = Adapter(model)
    pairs = [*template_pairs(prompts).pairs, *word_pairs(prompts).pairs]
    assert pairs, "the tiny warehouse has no circuit pairs"
    scores = score_pairs(ad, pairs, steps=2)
    circuits = evaluate_circuits(ad, scores, n_top=2, n_random=2)
    manifest = load_manifest(root)
    g = graph_of(ad.arch)
    with WarehouseWriter.create(root, manifest, resume=True) as w:
        write_graph(w, g)
        for ps, pc in zip(scores, circuits, strict=True):
            write_shard(w, to_shard(ps, pc, TOLERANCE, manifest.get("fingerprint")), g.n_edges)
    return root
