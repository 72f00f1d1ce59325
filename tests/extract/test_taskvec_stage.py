"""The task-vector stages through `echowh extract --task-vectors` on a tiny model: the shards in
the schema's layout, `echowh verify`, the stored numbers against ``run_study`` (the engine in one
call), and a crashed run that resumes to a bit-identical warehouse without recomputing."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from echowh.cli import main
from extract.config import ConfigError, ExtractConfig
from extract.pipeline.run import load
from extract.stages.taskvec import stage as tstage
from extract.stages.taskvec.study import run_study
from extract.stages.taskvec.vectors import vector_arrays
from store.taskvec_schema import TASKVEC_DIR, TQ, TV, TV_INVARIANTS, VECTORS_FILE, word_shard_name
from tests.extract.stage_runs import Crash, cli_extract, contents, crash_after, verify

WORDS = ("cat", "dog", "sun", "red", "hat", "cup", "pen")  # train cat sun hat pen; held out dog red cup
ARGS = ("--task-vectors", "--tv-demos", "2", "--tv-coefficients", "0,1,4", "--tv-steer-stride", "1")


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tw") / "words.txt"
    p.write_text("\n".join(WORDS) + "\n")
    return p


@pytest.fixture(scope="module")
def straight(tiny_qwen2_dir, words, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tv") / "w"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tstage, "WORD_BATCH", 2)  # two jobs per phase: a crash can fall between them
        r = cli_extract(tiny_qwen2_dir, words, out, *ARGS)
    assert r.exit_code == 0, r.output
    return out


def test_layout_manifest_verify(straight):
    m = json.loads((straight / "manifest.json").read_text())
    assert m["taskvec"]["held_out"] == ["dog", "red", "cup"] and m["taskvec"]["held_out_indices"] == [1, 3, 5]
    assert m["taskvec"]["n_demos"] == 2 and "demo/dog" in m["taskvec"]["texts"]
    for sub in ("aie", "interventions"):
        names = sorted(p.name for p in (straight / TASKVEC_DIR / sub).iterdir())
        assert names == [word_shard_name(i) for i in (1, 3, 5)]
    assert set(TV_INVARIANTS) <= set(m["validation"]) and all(v["passed"] for v in m["validation"].values())
    r = verify(straight)
    assert r.exit_code == 0 and " ok " in r.output, r.output


def test_stored_numbers_equal_run_study(straight, tiny_qwen2_dir):
    cfg = ExtractConfig(model=str(tiny_qwen2_dir), words=WORDS, ablation=(), progress=False, out=straight)
    model = load(cfg)
    study = run_study(model.adapter, model.tok, list(WORDS), chat=True, n_demos=2, coefs=(0.0, 1.0, 4.0))
    with h5py.File(straight / TASKVEC_DIR / VECTORS_FILE) as f:
        for fld, arr in vector_arrays(study.prompts, study.vectors, study.fv).items():
            if fld is TV.VALIDATION:
                continue
            got = f[fld.name][()]
            if fld is TV.WORDS:
                assert [w.decode() for w in got] == list(arr)
            else:  # AIE, FV heads and vectors: float32 rounding of batches of other shapes (1e-6)
                np.testing.assert_allclose(got, arr, rtol=0, atol=1e-6, equal_nan=True, err_msg=fld.name)
    for sub, results in (("aie", study.aie_rows), ("interventions", study.rows)):
        for w, res in results.items():
            with h5py.File(straight / TASKVEC_DIR / sub / word_shard_name(res.word_index)) as f:
                for fld, arr in res.arrays().items():
                    if fld is not TQ.VALIDATION:
                        np.testing.assert_allclose(f[fld.name][()], arr, rtol=0, atol=1e-6, err_msg=f"{sub} {w} {fld.name}")


def test_crash_then_resume_is_bit_identical_and_skips_done_words(straight, tiny_qwen2_dir, words, tmp_path):
    out = tmp_path / "w"
    first: list = []
    cls = tstage.InterventionStage
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tstage, "WORD_BATCH", 2)
        mp.setattr(cls, "run", crash_after(cls, 1, first))
        r = cli_extract(tiny_qwen2_dir, words, out, *ARGS)
    assert isinstance(r.exception, Crash), r.output
    done = sorted((out / TASKVEC_DIR).rglob("*.h5"))
    assert len(done) == 3 + 1 + 2  # every AIE shard, vectors.h5, the first interventions job
    stamps = {p: p.stat().st_mtime_ns for p in done}
    second: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tstage, "WORD_BATCH", 2)
        for c in (tstage.AIEStage, tstage.VectorsStage, cls):
            mp.setattr(c, "run", crash_after(c, None, second))
        r = cli_extract(tiny_qwen2_dir, words, out, *ARGS, "--resume")
    assert r.exit_code == 0, r.output
    assert [(name, todo) for name, _, todo in second] == [("taskvec_interventions", (5,))]  # only the rest
    assert {p: p.stat().st_mtime_ns for p in done} == stamps
    assert contents(out, TASKVEC_DIR) == contents(straight, TASKVEC_DIR)
    assert verify(out).exit_code == 0


def test_help_and_errors(tiny_qwen2_dir, tmp_path):
    r = CliRunner().invoke(main, ["extract", "--help"])
    for opt in ("--task-vectors", "--tv-demos", "--tv-coefficients", "--tv-steer-stride"):
        assert opt in r.output, opt
    with pytest.raises(ConfigError, match="`tv_steer_stride`"):
        ExtractConfig(task_vectors=True, tv_steer_stride=0)
    p = tmp_path / "few.txt"
    p.write_text("cat\ndog\nsun\n")
    r = cli_extract(tiny_qwen2_dir, p, tmp_path / "w", "--task-vectors", "--tv-demos", "3")
    assert r.exit_code != 0 and "--tv-demos" in r.output and "--words" in r.output, r.output
