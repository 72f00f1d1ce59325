"""Task vectors end to end on a tiny Llama: engine -> extract.stages.taskvec.shard -> views -> analyses
-> report section (tests/query/taskvec_fixture.py writes the shards the way the stage will).

Views are checked against the raw HDF5 arrays (h5py/numpy); analyses against numpy/Polars
recomputations from the raw arrays (and, for the joined ranks, from the other views); the report's
findings quote the analyses' numbers, and the section is absent without task vectors.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict

import h5py
import numpy as np
import polars as pl
import pytest

from extract.stages.taskvec.interventions import Row
from extract.stages.taskvec.shard import (
    AIE_SET,
    INTERVENTIONS_SET,
    done_words,
    has_vectors,
    read_word,
    write_word,
)
from query import QueryError, Warehouse
from reports.context import Ctx
from reports.report import build, render_html
from reports.sections import taskvec as section
from store.ledger import LEDGER_NAME
from store.schema import MODEL_FILE, M
from store.taskvec_schema import TASKVEC_DIR, TQ, TV, VECTORS_FILE, Compared, Kind, Method, Where
from store.verify import verify
from store.warehouse import WarehouseWriter
from tests.query import taskvec_fixture as fx

HELD = {1: "dog", 3: "house", 5: "moon"}  # word index -> held-out word
KIND = {int(k): k.name.lower() for k in Kind}


@pytest.fixture(scope="module")
def wh_dir(tiny_llama_dir, tmp_path_factory):
    return fx.build(tiny_llama_dir, tmp_path_factory.mktemp("tv") / "w")


def _raw(wh_dir, subset: str) -> dict[int, dict]:
    """Every word shard's datasets, read with h5py alone."""
    out = {}
    for i in HELD:
        with h5py.File(wh_dir / TASKVEC_DIR / subset / f"w{i:05d}.h5", "r") as f:
            out[i] = {fld.name: f[fld.name][()] for fld in vars(TQ).values() if hasattr(fld, "axes")}
            out[i]["word"] = f.attrs["word"]
    return out


def _vectors(wh_dir) -> dict:
    with h5py.File(wh_dir / TASKVEC_DIR / VECTORS_FILE, "r") as f:
        return {k: f[k][()] for k in f}


def _vocab(wh_dir) -> np.ndarray:
    with h5py.File(wh_dir / MODEL_FILE, "r") as f:
        return np.array([x.decode() for x in f[M.VOCAB_TEXT.name][()]])


# -- the writer ----------------------------------------------------------------------------


def test_writer_resume_api_and_round_trip(wh_dir):
    assert done_words(wh_dir, AIE_SET) == done_words(wh_dir, INTERVENTIONS_SET) == set(HELD)
    assert has_vectors(wh_dir)
    raw = _raw(wh_dir, INTERVENTIONS_SET)
    for i, word in HELD.items():
        r = read_word(wh_dir, INTERVENTIONS_SET, i)
        assert (r.word, r.word_index) == (word, i)
        np.testing.assert_array_equal(r.target_prob, raw[i][TQ.TARGET_PROB.name])
        back = r.arrays()
        for fld in (TQ.METHOD, TQ.KIND, TQ.LAYER, TQ.COEF, TQ.WHERE, TQ.SOURCE, TQ.K, TQ.CLEAN_KIND,
                    TQ.CLEAN_TARGET_PROB, TQ.CLEAN_ECHO_CORRECT):
            np.testing.assert_array_equal(back[fld], raw[i][fld.name])
        assert Kind.SHUFFLED in r.clean and Kind.DEMO in r.clean  # the baselines travel with the word
    # the wrong set for the rows is refused, nothing is written
    w = WarehouseWriter(wh_dir)
    r = read_word(wh_dir, INTERVENTIONS_SET, 1)
    with pytest.raises(ValueError, match="HEAD_MEAN"):
        write_word(w, AIE_SET, r)
    assert done_words(wh_dir, AIE_SET) == set(HELD)


def test_a_foreign_shard_is_refused_on_read(wh_dir, tmp_path):
    bad = tmp_path / "w"
    shutil.copytree(wh_dir, bad)
    with h5py.File(bad / TASKVEC_DIR / INTERVENTIONS_SET / "w00003.h5", "a") as f:
        f.attrs["fingerprint"] = "another-run"
    with Warehouse(bad) as wh, pytest.raises(QueryError, match="fingerprint"):
        wh.sql("SELECT count(*) FROM taskvec_interventions")
    rel = f"{TASKVEC_DIR}/{INTERVENTIONS_SET}/w00003.h5"
    probs = [p.message for p in verify(bad).problems if p.path == rel]
    assert any("content differs" in m for m in probs) and any("fingerprint" in m for m in probs), probs


def test_verify_checks_every_task_vector_file(wh_dir, tmp_path):
    rep = verify(wh_dir)
    assert not rep.problems, rep.problems
    ledger = (wh_dir / LEDGER_NAME).read_text()
    for rel in [f"{TASKVEC_DIR}/{VECTORS_FILE}"] + [f"{TASKVEC_DIR}/{s}/w{i:05d}.h5" for s in
                                                    (AIE_SET, INTERVENTIONS_SET) for i in HELD]:
        assert rel in ledger, rel  # every file's SHA-256 recorded by the writer
    bad = tmp_path / "w"
    shutil.copytree(wh_dir, bad)
    (bad / TASKVEC_DIR / AIE_SET / "stray.txt").write_text("x")
    assert [p.path for p in verify(bad).problems] == [f"{TASKVEC_DIR}/{AIE_SET}/stray.txt"]


# -- views against the raw arrays ----------------------------------------------------------


def test_interventions_view_is_the_shards(wh_dir):
    raw, vocab = _raw(wh_dir, INTERVENTIONS_SET), _vocab(wh_dir)
    with Warehouse(wh_dir) as wh:
        v = wh.sql("SELECT * FROM taskvec_interventions")
        clean = wh.sql("SELECT * FROM taskvec_clean")
    assert v.height == sum(a[TQ.METHOD.name].size for a in raw.values())
    for i, a in raw.items():
        s = v.filter(pl.col("word_index") == i)  # rows in shard order
        assert set(s["word"]) == {HELD[i]}
        np.testing.assert_array_equal(s["target_prob"].to_numpy(), a[TQ.TARGET_PROB.name])
        np.testing.assert_array_equal(s["target_rank"].to_numpy(), a[TQ.TARGET_RANK.name])
        np.testing.assert_array_equal(s["correct"].to_numpy(), a[TQ.ECHO_CORRECT.name])
        np.testing.assert_array_equal(s["kl"].to_numpy(), a[TQ.KL.name])
        np.testing.assert_array_equal(s["top1_id"].to_numpy(), a[TQ.TOP1_ID.name])
        assert s["top1_text"].to_list() == vocab[a[TQ.TOP1_ID.name]].tolist()
        np.testing.assert_array_equal(s["boundary"].to_numpy(), a[TQ.LAYER.name])
        np.testing.assert_array_equal(s["layer"].to_numpy(), a[TQ.LAYER.name] - 1)
        assert s["method"].to_list() == [Method(m).name.lower() for m in a[TQ.METHOD.name]]
        assert s["dest_kind"].to_list() == [KIND[k] for k in a[TQ.KIND.name]]
        assert s["position_mode"].to_list() == [Where(w).name.lower() for w in a[TQ.WHERE.name]]
        steer = a[TQ.METHOD.name] == Method.STEER
        want = np.where(a[TQ.KIND.name] == Kind.REPEAT, -1.0, 1.0) * a[TQ.COEF.name]
        np.testing.assert_allclose(s.filter(pl.col("method") == "steer")["coefficient"].to_numpy(), want[steer])
        assert s.filter(pl.col("method") != "steer")["coefficient"].null_count() == int((~steer).sum())
        tv = a[TQ.METHOD.name] == Method.TASK_VECTOR
        assert s.filter(pl.col("method") == "task_vector")["source_kind"].to_list() == \
            [KIND[k] for k in a[TQ.SOURCE.name][tv]]
        fv = a[TQ.METHOD.name] == Method.FUNCTION_VECTOR
        np.testing.assert_array_equal(s.filter(pl.col("method") == "function_vector")["k"].to_numpy(),
                                      a[TQ.K.name][fv])
        c = clean.filter(pl.col("word_index") == i)
        assert c["kind"].to_list() == [KIND[k] for k in a[TQ.CLEAN_KIND.name]]
        np.testing.assert_array_equal(c["target_prob"].to_numpy(), a[TQ.CLEAN_TARGET_PROB.name])
        np.testing.assert_array_equal(c["correct"].to_numpy(), a[TQ.CLEAN_ECHO_CORRECT.name])
        assert c["target_text"].to_list() == vocab[a[TQ.CLEAN_TARGET_ID.name]].tolist()
    # every kind a method reads has its clean reference (demo and shuffled: the baselines)
    assert set(clean["kind"]) == {"demo", "zero_shot", "shuffled", "repeat", "echo", "neutral"}


def test_aie_view_averages_to_the_stored_table(wh_dir):
    raw, vec = _raw(wh_dir, AIE_SET), _vectors(wh_dir)
    with Warehouse(wh_dir) as wh:
        v = wh.sql("SELECT * FROM taskvec_aie")
    L, H = vec[TV.AIE.name].shape
    assert v.height == L * H * len(HELD)
    for i, a in raw.items():
        base = a[TQ.CLEAN_TARGET_PROB.name][list(a[TQ.CLEAN_KIND.name]).index(Kind.SHUFFLED)]
        s = v.filter(pl.col("word_index") == i)
        np.testing.assert_array_equal(s["layer"].to_numpy(), a[TQ.LAYER.name])
        np.testing.assert_array_equal(s["head"].to_numpy(), a[TQ.HEAD.name])
        np.testing.assert_allclose(s["aie"].to_numpy(), a[TQ.TARGET_PROB.name].astype(np.float64) - base, atol=0)
    mean = v.group_by("layer", "head").agg(pl.col("aie").mean()).sort("layer", "head")["aie"].to_numpy()
    np.testing.assert_allclose(mean, vec[TV.AIE.name].reshape(-1), atol=1e-9)  # the engine's table (float32)


def _cos(x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    d = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return np.where(d > 0, (x * y).sum(-1) / np.where(d > 0, d, 1), np.nan)


def test_vectors_and_split_views(wh_dir):
    vec = _vectors(wh_dir)
    with Warehouse(wh_dir) as wh:
        v = wh.sql("SELECT * FROM taskvec_vectors")
        split = wh.sql("SELECT * FROM taskvec_split ORDER BY word_index")
        val = wh.sql("SELECT * FROM taskvec_validation")
    sv, B = vec[TV.STEER_VECTOR.name], vec[TV.STEER_VECTOR.name].shape[0]
    want = {"tv_demo": vec[TV.TASK_VECTOR.name][0], "tv_repeat": vec[TV.TASK_VECTOR.name][1], "steer": sv}
    for j, k in enumerate(vec[TV.FV_K.name]):
        want[f"fv_{k}"] = np.broadcast_to(vec[TV.FUNCTION_VECTOR.name][j], sv.shape)
    for name, x in want.items():
        s = v.filter(pl.col("vector") == name).sort("boundary")
        assert s["boundary"].to_list() == list(range(B))
        np.testing.assert_allclose(s["norm"].to_numpy(), np.linalg.norm(x.astype(np.float64), axis=-1), rtol=1e-12)
        np.testing.assert_allclose(s["cosine"].to_numpy().astype(float), _cos(x, sv), atol=1e-6)
    echo = vec[TV.MEAN_ECHO.name]
    s = v.filter(pl.col("vector") == "mean_repeat_vs_echo").sort("boundary")
    np.testing.assert_allclose(s["cosine"].to_numpy(), _cos(echo + sv, echo), atol=1e-6)
    np.testing.assert_allclose(s["cosine"].to_numpy(), vec[TV.COSINE.name][Compared.MEAN_REPEAT_VS_ECHO], atol=0)
    assert split["word"].to_list() == list(fx.WORDS)
    assert split["split"].to_list() == ["train", "held_out"] * 3
    assert val["passed"].all() and val.height == 1 + len(HELD) * (1 + 3)  # vectors; per word: aie 1, interventions 3
    assert set(val["invariant"]) == {"taskvec_capture_is_model", "taskvec_clean_is_model",
                                     "taskvec_self_patch_is_clean", "taskvec_c0_is_clean"}


# -- analyses against recomputations ---------------------------------------------------------


def _rows(raw: dict) -> list[tuple[Row, dict]]:
    """(row, metrics) of every intervention of every word, from the raw arrays."""
    out = []
    for a in raw.values():
        for q in range(a[TQ.METHOD.name].size):
            r = Row(Method(a[TQ.METHOD.name][q]), Kind(a[TQ.KIND.name][q]), int(a[TQ.LAYER.name][q]),
                    Where(a[TQ.WHERE.name][q]), int(a[TQ.SOURCE.name][q]), -1, int(a[TQ.K.name][q]),
                    float(a[TQ.COEF.name][q]))
            out.append((r, {m: float(a[m][q]) for m in ("echo_correct", "target_prob", "kl")}))
    return out


def _baselines(raw: dict) -> dict[str, float]:
    acc = defaultdict(list)
    for a in raw.values():
        for k, c in zip(a[TQ.CLEAN_KIND.name], a[TQ.CLEAN_ECHO_CORRECT.name], strict=True):
            acc[KIND[k]].append(float(c))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def test_accuracy_by_layer_is_the_recomputed_mean(wh_dir):
    raw = _raw(wh_dir, INTERVENTIONS_SET)
    base = _baselines(raw)
    groups = defaultdict(list)
    for r, m in _rows(raw):
        if r.method in (Method.TASK_VECTOR, Method.FUNCTION_VECTOR):
            src = KIND[r.source] if r.method == Method.TASK_VECTOR else "demo"
            groups[(r.method.name.lower(), src, KIND[r.kind], r.k or None, r.layer)].append(m)
    with Warehouse(wh_dir) as wh:
        got = wh.run_analysis("taskvec_accuracy_by_layer")
        only_tv = wh.run_analysis("taskvec_accuracy_by_layer", method="task_vector")
    assert got.height == len(groups) and set(only_tv["method"]) == {"task_vector"}
    for row in got.iter_rows(named=True):
        ms = groups[(row["method"], row["source_kind"], row["dest_kind"], row["k"], row["boundary"])]
        assert row["n_words"] == len(ms) == len(HELD)
        assert row["accuracy"] == pytest.approx(np.mean([m["echo_correct"] for m in ms]), abs=1e-12)
        assert row["mean_target_prob"] == pytest.approx(np.mean([m["target_prob"] for m in ms]), rel=1e-6)
        assert row["dest_clean_accuracy"] == base[row["dest_kind"]]
        assert row["source_clean_accuracy"] == base[row["source_kind"]]
        assert row["layer"] == row["boundary"] - 1


def test_steering_curve_is_the_recomputed_mean(wh_dir):
    raw = _raw(wh_dir, INTERVENTIONS_SET)
    base = _baselines(raw)
    groups = defaultdict(list)
    for r, m in _rows(raw):
        if r.method == Method.STEER:
            c = -r.coef if r.kind == Kind.REPEAT else r.coef
            groups[(KIND[r.kind], r.where.name.lower(), r.layer, c + 0.0)].append(m)
    with Warehouse(wh_dir) as wh:
        got = wh.run_analysis("taskvec_steering")
        one = wh.run_analysis("taskvec_steering", boundary=1, position_mode="last")
    n_layers = _vectors(wh_dir)[TV.AIE.name].shape[0]
    assert got.height == len(groups) == 2 * 2 * n_layers * len(fx.COEFS)
    assert set(one["boundary"]) == {1} and set(one["position_mode"]) == {"last"}
    for row in got.iter_rows(named=True):
        ms = groups[(row["dest_kind"], row["position_mode"], row["boundary"], row["coefficient"])]
        towards = "repeat" if row["dest_kind"] == "echo" else "echo"
        assert row["direction"] == f"{row['dest_kind']}->{towards}"
        assert row["accuracy"] == pytest.approx(np.mean([m["echo_correct"] for m in ms]), abs=1e-12)
        assert row["mean_target_prob"] == pytest.approx(np.mean([m["target_prob"] for m in ms]), rel=1e-6)
        assert row["mean_kl"] == pytest.approx(np.mean([m["kl"] for m in ms]), rel=1e-5, abs=1e-9)
        assert (row["dest_clean_accuracy"], row["towards_clean_accuracy"]) == (base[row["dest_kind"]], base[towards])
        if row["coefficient"] == 0:  # c = 0 is the clean run: nothing moves
            assert row["mean_kl"] < 1e-6 and row["accuracy"] == base[row["dest_kind"]]


def _rank(df: pl.DataFrame, col: str) -> pl.DataFrame:
    return df.with_columns(pl.col(col).rank("min", descending=True).cast(pl.Int64).alias("r"))


def test_top_heads_ranks_are_recomputed(wh_dir):
    vec = _vectors(wh_dir)
    aie = vec[TV.AIE.name]  # (L, H): the engine's own table
    L, H = aie.shape
    with Warehouse(wh_dir) as wh:
        got = wh.run_analysis("taskvec_top_heads", top=L * H)
        top3 = wh.run_analysis("taskvec_top_heads", top=3)
        abl = wh.sql("SELECT layer, head, logit_diff AS x FROM ablation WHERE unit_kind = 'head' AND mode = 'zero'")
        dla = wh.sql("SELECT layer, head, dla AS x FROM dla WHERE component = 'head'")
        pat = wh.sql("SELECT layer, head, recovery AS x FROM patching WHERE kind = 'head_all'")
        sink = wh.sql("SELECT layer, head, weight_first AS x FROM first_token_share WHERE query_role = 4")
    assert got.height == L * H and top3.height == 3
    np.testing.assert_allclose(got.sort("layer", "head")["aie"].to_numpy(), aie.reshape(-1), atol=1e-9)
    order = np.argsort(-aie.reshape(-1), kind="stable")
    assert [(r["layer"], r["head"]) for r in top3.iter_rows(named=True)] == [divmod(int(i), H) for i in order[:3]]
    for name, df in (("ablation", abl), ("dla", dla), ("patching", pat), ("sink", sink)):
        assert df.height, name
        r = _rank(df.group_by("layer", "head").agg(pl.col("x").mean()), "x")
        j = got.join(r, on=["layer", "head"], how="left")
        assert (j[f"{name}_rank"] == j["r"]).all(), name


def test_cosine_analysis_is_recomputed(wh_dir):
    vec = _vectors(wh_dir)
    sv, echo = vec[TV.STEER_VECTOR.name], vec[TV.MEAN_ECHO.name]
    with Warehouse(wh_dir) as wh:
        got = wh.run_analysis("taskvec_cosine")
        words = wh.run_analysis("resid_cosine_templates").group_by("boundary").agg(pl.col("cosine").mean())
    tv = got.filter(pl.col("vector") == "tv_demo").sort("boundary")
    np.testing.assert_allclose(tv["cosine_with_steer"].to_numpy().astype(float),
                               _cos(vec[TV.TASK_VECTOR.name][0], sv), atol=1e-6)
    np.testing.assert_allclose(tv["steer_norm"].to_numpy(), np.linalg.norm(sv.astype(np.float64), axis=-1),
                               rtol=1e-12)
    np.testing.assert_allclose(tv["template_mean_cosine"].to_numpy(), _cos(echo + sv, echo), atol=1e-6)
    w = tv.join(words, on="boundary")
    assert w.height == tv.height
    np.testing.assert_allclose(w["template_word_cosine"].to_numpy(), w["cosine"].to_numpy(), rtol=1e-12)
    assert set(got["vector"]) == {"tv_demo", "tv_repeat", *(f"fv_{k}" for k in fx.KS)}


# -- the report section ----------------------------------------------------------------------


def test_report_section_quotes_the_analyses(wh_dir):
    rep = build(wh_dir)
    assert section.TITLE in [s.title for s in rep.sections]
    text = "\n".join(rep.findings)
    with Warehouse(wh_dir) as wh:
        acc = wh.run_analysis("taskvec_accuracy_by_layer", method="task_vector")
        heads = wh.run_analysis("taskvec_top_heads", top=section.TOP)
    demo = acc.filter(pl.col("source_kind") == "demo").sort(["accuracy", "mean_target_prob"], descending=True)
    best = demo.row(0, named=True)
    m = re.search(r"from demo prompts, put into zero_shot prompts, works best at layer (-?\d+): (\d+)% of (\d+) "
                  r"held-out words echo \(mean target probability ([0-9.]+)\), against (\d+)% .* and (\d+)%", text)
    assert m, text
    assert int(m.group(1)) == best["layer"] and int(m.group(3)) == len(HELD)
    assert int(m.group(2)) == round(100 * best["accuracy"])
    assert float(m.group(4)) == pytest.approx(best["mean_target_prob"], abs=5e-4)
    assert int(m.group(5)) == round(100 * best["dest_clean_accuracy"])
    top = heads.row(0, named=True)
    assert f"L{top['layer']}H{top['head']} (AIE {top['aie']:.3g}); ablation rank {top['ablation_rank']}" in text
    assert "Steering echo prompts towards repeat" in text and "Steering repeat prompts towards echo" in text
    html = render_html(rep)
    assert section.TITLE.replace("'", "&#39;") in html or section.TITLE in html


def test_section_absent_without_task_vectors(wh_path):
    with Warehouse(wh_path) as wh:
        assert wh.sql("SELECT count(*) AS n FROM taskvec_interventions")["n"][0] == 0
        assert wh.run_analysis("taskvec_accuracy_by_layer").height == 0
        ctx = Ctx.open(wh, ("cat", "dog"))
        assert section.sections(ctx) == []
        assert not ctx.findings.answers


def test_write_study_gives_the_same_files(wh_dir, tiny_llama_dir, tmp_path):
    """run_study + write_study (one call) == the per-phase sequence of the fixture, array for array."""
    from extract.models.families import Adapter
    from extract.models.loading import load_model
    from extract.stages.taskvec import run_study
    from extract.stages.taskvec.shard import StudyMeta, write_study

    model, tok, _ = load_model(str(tiny_llama_dir), device="cpu", progress=False)
    study = run_study(Adapter(model), tok, list(fx.WORDS), system_prompt=fx.SYSTEM, n_demos=fx.N_DEMOS, ks=fx.KS,
                      coefs=fx.COEFS)
    out = tmp_path / "w"
    shutil.copytree(wh_dir, out)
    shutil.rmtree(out / TASKVEC_DIR)
    w = WarehouseWriter(out)
    with h5py.File(wh_dir / MODEL_FILE, "r") as f:
        w.manifest = {"fingerprint": f.attrs["fingerprint"]}
    write_study(w, study, StudyMeta(fx.N_DEMOS, True, fx.KS, fx.COEFS))
    for rel in [VECTORS_FILE] + [f"{s}/w{i:05d}.h5" for s in (AIE_SET, INTERVENTIONS_SET) for i in HELD]:
        with h5py.File(wh_dir / TASKVEC_DIR / rel, "r") as a, h5py.File(out / TASKVEC_DIR / rel, "r") as b:
            assert set(a) == set(b), rel
            for k in a:
                if k != "validation":  # errors of the invariants may round differently run to run
                    np.testing.assert_array_equal(a[k][()], b[k][()], err_msg=f"{rel}:{k}")
