"""The circuits stage through `echowh extract --circuits template,word` on a tiny model: the
shards the manifest lists, `echowh verify`, the stored numbers against a direct call of the
engine, and a crashed run that resumes to a bit-identical warehouse without recomputing."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from echowh.cli import main
from extract.config import ConfigError, ExtractConfig
from extract.pipeline.run import load
from extract.stages.circuits import stage as cstage
from extract.stages.circuits.faithfulness import evaluate_circuits
from extract.stages.circuits.graph import graph_of
from extract.stages.circuits.scores import score_pairs
from extract.stages.circuits.shard import to_shard
from store.circuits_schema import CG, CIRCUIT_INVARIANTS, CIRCUITS_DIR, GRAPH_FILE
from store.schema import prompt_shard_name
from tests.extract.stage_runs import Crash, cli_extract, contents, crash_after, verify

ARGS = ("--circuits", "template,word")


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cw") / "words.txt"
    p.write_text("cat\ndog\n")
    return p


@pytest.fixture(scope="module")
def straight(tiny_qwen2_dir, words, tmp_path_factory) -> Path:
    """One uninterrupted run, one pair per job (so a crash can fall between jobs)."""
    out = tmp_path_factory.mktemp("circ") / "w"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cstage, "PAIR_BATCH", 1)
        r = cli_extract(tiny_qwen2_dir, words, out, *ARGS)
    assert r.exit_code == 0, r.output
    return out


def _manifest(out: Path) -> dict:
    import json

    return json.loads((out / "manifest.json").read_text())


def test_shards_graph_verify_and_validation(straight):
    m = _manifest(straight)
    for kind in ("template", "word"):
        pairs = m["circuits"][kind]["pairs"]
        assert pairs, kind  # tiny qwen: cat/dog are one token each, so every pair exists
        on_disk = sorted(p.name for p in (straight / CIRCUITS_DIR / kind).iterdir())
        assert on_disk == sorted(prompt_shard_name(c) for c, _, _ in pairs)
    with h5py.File(straight / CIRCUITS_DIR / GRAPH_FILE) as f:
        n_edges = int(f.attrs["n_edges"])
        assert len(f[CG.EDGE_UP.name]) == n_edges
    arch = m["model"]
    L, H, KV = arch["n_layers"], arch["n_heads"], arch["n_kv_heads"]
    assert n_edges == sum((H + 2 * KV) * (1 + ly * (H + 1)) + (1 + ly * (H + 1) + H) for ly in range(L)) \
        + 1 + L * (H + 1)  # the spec's edge count, written out independently
    assert set(CIRCUIT_INVARIANTS) <= set(m["validation"]), m["validation"].keys()
    assert all(v["passed"] for v in m["validation"].values())
    r = verify(straight)
    assert r.exit_code == 0 and " ok " in r.output, r.output


@pytest.mark.parametrize("kind", ["template", "word"])
def test_stored_numbers_equal_the_engine(straight, tiny_qwen2_dir, kind):
    m = _manifest(straight)
    cfg = ExtractConfig(model=str(tiny_qwen2_dir), words=("cat", "dog"), ablation=(), circuits=("template", "word"),
                        progress=False, out=straight)
    model = load(cfg)
    pair = cstage.pair_set(kind, model.prompts).pairs[-1]  # the last pair: direction 1 / the second word
    assert [pair.clean.index, pair.corrupted.index, pair.direction] in m["circuits"][kind]["pairs"]
    (ps,) = score_pairs(model.adapter, [pair], steps=5, batch=1, methods=("eap", "eap_ig_inputs"))
    (pc,) = evaluate_circuits(model.adapter, [ps], replacements=("patch",))
    want = to_shard(ps, pc, model.tolerance, model.fingerprint)
    assert graph_of(model.adapter.arch).n_edges == want.scores.shape[-1]
    with h5py.File(straight / CIRCUITS_DIR / kind / prompt_shard_name(pair.key)) as f:
        for fld, arr in want.items():
            got = f[fld.name][()]
            if arr.dtype.names:  # the validation rows: the same invariants, errors to rounding
                assert [r[0].decode() for r in arr] == [r[0].decode() for r in got]
                continue
            # the same computation (same batch, same process): bit for bit
            np.testing.assert_array_equal(got, arr, err_msg=fld.name)
        assert f.attrs["kind"].decode() == kind and f.attrs["ig_steps"] == 5


def test_crash_then_resume_is_bit_identical_and_skips_done_pairs(straight, tiny_qwen2_dir, words, tmp_path):
    out = tmp_path / "w"
    first: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cstage, "PAIR_BATCH", 1)
        mp.setattr(cstage.CircuitsStage, "run", crash_after(cstage.CircuitsStage, 3, first))
        r = cli_extract(tiny_qwen2_dir, words, out, *ARGS)
    assert isinstance(r.exception, Crash), r.output
    written = sorted((out / CIRCUITS_DIR).rglob("*.h5"))
    assert len(written) == 3  # the graph and two template pairs, each whole; nothing partial
    stamps = {p: p.stat().st_mtime_ns for p in written}
    second: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cstage, "PAIR_BATCH", 1)
        mp.setattr(cstage.CircuitsStage, "run", crash_after(cstage.CircuitsStage, None, second))
        r = cli_extract(tiny_qwen2_dir, words, out, *ARGS, "--resume")
    assert r.exit_code == 0, r.output
    done_before = {(name, members) for name, members, _ in first[:3]}
    assert not done_before & {(name, members) for name, members, _ in second}  # no done job reran
    assert {p: p.stat().st_mtime_ns for p in written} == stamps  # nor was rewritten
    assert contents(out, CIRCUITS_DIR) == contents(straight, CIRCUITS_DIR)
    assert verify(out).exit_code == 0


def test_help_lists_the_options_and_errors_name_the_flag(tiny_qwen2_dir, words, tmp_path):
    r = CliRunner().invoke(main, ["extract", "--help"])
    for opt in ("--circuits", "--circuit-methods", "--circuit-steps", "--circuit-replacements"):
        assert opt in r.output, opt
    assert "eap_ig_activations" in r.output and "20x" in r.output  # the cost is in the help
    with pytest.raises(ConfigError, match="`circuit_steps`"):
        ExtractConfig(circuits=("word",), circuit_steps=0)
    r = cli_extract(tiny_qwen2_dir, words, tmp_path / "w", "--circuits", "template", "--template", "say {word}")
    assert r.exit_code != 0 and "--circuits" in r.output and "--template" in r.output, r.output
