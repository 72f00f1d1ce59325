"""Comparison of two real extractions (tiny Qwen2: 3 layers x 12 heads, d_model 96; tiny Llama:
3 layers x 4 heads, d_model 64): every view against each warehouse alone, pushdown per
warehouse, and every comparison analysis against numbers computed from each warehouse's HDF5
arrays with numpy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from extract.config import ExtractConfig
from extract.pipeline.run import extract
from query import VIEWS, Comparison, QueryError, Warehouse, list_analyses, parse_warehouse_arg
from query.analyses import is_comparison
from query.compare import WarehouseArg, assign_labels
from query.export import export_parquet
from store import A, F, Role, WarehouseReader
from store.schema import ABLATION_DIR, MANIFEST_NAME

WORDS = ("cat", "dog", "house")
TOL = 1e-6  # float32 values averaged in DuckDB (double) vs numpy float64


@pytest.fixture(scope="module")
def pair(tiny_qwen2_dir, tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cmp")
    out = {"qwen": root / "qwen", "llama": root / "llama"}
    extract(ExtractConfig(out=out["qwen"], model=str(tiny_qwen2_dir), words=WORDS, progress=False,
                          ablation=("zero", "mean")), log=lambda m: None)
    extract(ExtractConfig(out=out["llama"], model=str(tiny_llama_dir), words=WORDS, progress=False,
                          ablation=("zero",), ablate_layers=(1, 2)), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def cmp(pair):
    with Comparison([("qwen", pair["qwen"]), ("llama", pair["llama"])]) as c:
        yield c


# -- independent numbers from one warehouse's HDF5 arrays ---------------------------------------
def _raw(path: Path) -> dict:
    """Per warehouse, straight from h5py: sizes, attrs, lens ranks, DLA, ablation, attention."""
    with WarehouseReader(path) as r:
        attrs = r.model_attrs()
        prompts = r.prompt_indices()
        out: dict = {"L": int(attrs["n_layers"]), "H": int(attrs["n_heads"]), "attrs": {}, "ranks": {}, "dla": {},
                     "first": {}, "abl": {}}
        for p in prompts:
            out["attrs"][p] = r.prompt_attrs(p)
            out["ranks"][p] = r.read(F.LENS_TARGET_RANK, p)
            out["dla"][p] = r.read(F.DLA_HEAD, p).astype(np.float64)  # (L, H)
            roles = r.read(F.POSITION_ROLE, p)
            last = int(np.flatnonzero(roles == Role.LAST)[0])
            out["first"][p] = r.read(F.ATTN_PATTERN, p)[:, :, last, 0].astype(np.float64)  # (L, H)
        for p in r.ablation_indices():
            f = r.shard(p, ABLATION_DIR)
            modes = [m.decode() if isinstance(m, bytes) else str(m) for m in np.atleast_1d(f.attrs["modes"])]
            diff = r.read(A.LOGIT_DIFF, p, subdir=ABLATION_DIR).astype(np.float64)  # (M, L', U)
            out["abl"][p] = {m: {int(layer): diff[mi, li, :out["H"]] for li, layer in enumerate(f.attrs["layers"])}
                             for mi, m in enumerate(modes)}
    return out


def _emergence(ranks: np.ndarray) -> int | None:
    if ranks[-1] != 0:
        return None
    b = len(ranks) - 1
    while b > 0 and ranks[b - 1] == 0:
        b -= 1
    return b - 1  # boundary b is the residual after block b - 1


@pytest.fixture(scope="module")
def raw(pair) -> dict[str, dict]:
    return {label: _raw(path) for label, path in pair.items()}


# -- views ------------------------------------------------------------------------------------
def test_every_view_is_each_warehouse_alone_plus_a_model_column(cmp, pair) -> None:
    for v in VIEWS:
        both = cmp.sql(f"SELECT * FROM {v.name} LIMIT 0")
        assert both.columns[0] == "model" and tuple(both.columns[1:] if v.name != "models" else both.columns) == v.names
        order = ", ".join(c.name for c in v.columns if c.type != "FLOAT[D]")
        for label, path in pair.items():
            with Warehouse(path) as wh:
                alone = wh.sql(f"SELECT * FROM {v.name} ORDER BY {order}")
            mine = cmp.sql(f"SELECT * EXCLUDE (model) FROM {v.name} WHERE model = '{label}' ORDER BY {order}"
                           if v.name != "models" else f"SELECT * FROM models WHERE model = '{label}'")
            if v.name == "models":
                alone = alone.with_columns(pl.lit(label).alias("model"))
            # vectors of models with different d_model are FLOAT[] lists in the union
            mine = mine.with_columns([pl.col(c).cast(alone.schema[c]) for c in mine.columns
                                      if mine.schema[c] != alone.schema[c]])
            assert mine.equals(alone), (v.name, label)
            # head_out_all needs --head-out-all-positions, the patching views --patching, circuit_* --circuits, taskvec_* --task-vectors
            assert mine.height > 0 or v.name == "head_out_all" or v.name.startswith(("patching", "circuit_", "taskvec_")), v.name


def test_single_warehouse_views_have_no_model_column(pair) -> None:
    with Warehouse(pair["qwen"]) as wh:
        for v in VIEWS:
            assert tuple(wh.sql(f"SELECT * FROM {v.name} LIMIT 0").columns) == v.names
        (label, n_layers, n_heads, d), = wh.sql("SELECT model, n_layers, n_heads, d_model FROM models").rows()
        assert label.startswith("tiny-qwen2") and (n_layers, n_heads, d) == (3, 12, 96)  # the model folder's name
        with pytest.raises(QueryError, match="compares models"):
            wh.run_analysis("compare_emergence")
    with Warehouse(pair["qwen"], label="mine") as wh:
        assert wh.sql("SELECT model FROM models")["model"].to_list() == ["mine"]


def test_vectors_of_different_widths_are_lists(cmp) -> None:
    df = cmp.sql("SELECT model, len(vec) AS d, typeof(vec) AS t FROM resid WHERE layer = 0 AND position = 0 "
                 "AND prompt = 0 ORDER BY model")
    assert df.rows() == [("llama", 64, "FLOAT[]"), ("qwen", 96, "FLOAT[]")]


def test_a_model_filter_reads_only_that_warehouse(cmp, pair) -> None:
    """Pushdown per warehouse: the bytes read are those of the model's own warehouse alone."""
    sql = "SELECT count(*) AS n, sum(vec[1]) AS s FROM resid WHERE layer = 1 AND position = 2"
    for label, path in pair.items():
        with Warehouse(path) as wh:
            alone = wh.sql(sql)
            expected = wh.bytes_read
        before = [m.shards.bytes_read for m in cmp.members]
        got = cmp.sql(sql.replace("WHERE", f"WHERE model = '{label}' AND"))
        after = [m.shards.bytes_read for m in cmp.members]
        read = {m.label: a - b for m, a, b in zip(cmp.members, after, before, strict=True)}
        assert got.equals(alone)
        assert expected > 0 and read[label] == expected
        assert all(n == 0 for other, n in read.items() if other != label)
    # without a model filter each warehouse reads what it reads alone (the other filters narrow each)
    sql = "SELECT count(*) AS n FROM attention WHERE layer = 0 AND head = 1 AND query_pos = 3"
    alone = 0
    for path in pair.values():
        with Warehouse(path) as wh:
            wh.sql(sql.replace("count(*)", "sum(weight)"))
            alone += wh.bytes_read
    before = cmp.bytes_read
    cmp.sql(sql.replace("count(*)", "sum(weight)"))
    assert cmp.bytes_read - before == alone > 0


def test_per_model_schemas_and_derived_views(cmp, pair) -> None:
    for label, path in pair.items():
        with Warehouse(path) as wh:
            alone = wh.sql("SELECT * FROM emergence ORDER BY prompt")
        assert cmp.sql(f'SELECT * FROM "{label}".emergence ORDER BY prompt').equals(alone)


def test_single_warehouse_analyses_run_per_warehouse_exactly(cmp, pair) -> None:
    alone = {label: Warehouse(path) for label, path in pair.items()}
    try:
        for a in list_analyses():
            if a.name.startswith("compare_"):
                continue
            params = {"layer": 1} if any(p.name == "layer" for p in a.params) and a.name != "ablation_flips" else {}
            both = cmp.run_analysis(a.name, **params)
            assert both.columns == ["model", *[c[0] for c in a.columns]], a.name
            for label, wh in alone.items():
                mine = both.filter(pl.col("model") == label).drop("model")
                # exact but for the last bits of DuckDB's parallel float sums (corr(), avg() differ
                # between two runs of one statement on one warehouse too)
                assert_frame_equal(mine, wh.run_analysis(a.name, **params), check_exact=False, rtol=1e-12,
                                   atol=1e-12), (a.name, label)
    finally:
        for wh in alone.values():
            wh.close()


# -- comparison analyses against numpy ---------------------------------------------------------
def test_compare_echo_accuracy_and_words(cmp, raw) -> None:
    acc = cmp.run_analysis("compare_echo_accuracy")
    for label, r in raw.items():
        for t in (0, 1):
            ps = [a for a in r["attrs"].values() if a["template_index"] == t]
            row = acc.filter((pl.col("model") == label) & (pl.col("template_index") == t)).row(0, named=True)
            assert row["n_prompts"] == len(ps)
            assert row["n_echo_correct"] == sum(bool(a["echo_correct"]) for a in ps)
            assert row["n_echo_first_token"] == sum(bool(a["echo_first_token"]) for a in ps)
            assert row["n_echo_exact"] == sum(bool(a["echo_exact"]) for a in ps)
            assert row["echo_accuracy"] == pytest.approx(row["n_echo_correct"] / len(ps))
    words = cmp.run_analysis("compare_echo_words")
    assert words.height == len(WORDS) * 2
    for row in words.iter_rows(named=True):
        echo = sorted(label for label, r in raw.items() for a in r["attrs"].values()
                      if a["word"] == row["word"] and a["template_index"] == row["template_index"] and a["echo_correct"])
        assert row["n_models"] == 2 and row["n_echo"] == len(echo)
        assert (row["models_echo"] or "") == ", ".join(echo)
        assert row["agree"] == (len(echo) in (0, 2))


def test_compare_emergence(cmp, raw) -> None:
    per = cmp.run_analysis("compare_emergence_prompts")
    summary = cmp.run_analysis("compare_emergence")
    for label, r in raw.items():
        for p in r["attrs"]:
            e = _emergence(r["ranks"][p])
            row = per.filter((pl.col("model") == label) & (pl.col("prompt") == p)).row(0, named=True)
            assert row["emergence_layer"] == e and row["n_layers"] == r["L"]
            assert row["rel_depth"] == (None if e is None else pytest.approx(e / r["L"], abs=1e-12))
        for t in (0, 1):
            es = [_emergence(r["ranks"][p]) for p, a in r["attrs"].items() if a["template_index"] == t]
            got = [e for e in es if e is not None]
            row = summary.filter((pl.col("model") == label) & (pl.col("template_index") == t)).row(0, named=True)
            assert row["n_prompts"] == len(es) and row["n_emerged"] == len(got)
            if got:
                assert row["mean_rel_depth"] == pytest.approx(np.mean(got) / r["L"], abs=1e-12)
                assert row["median_layer"] == pytest.approx(float(np.median(got)))
                assert row["max_rel_depth"] == pytest.approx(max(got) / r["L"])
            else:
                assert row["mean_rel_depth"] is None


def _mean_over_prompts(per_prompt: dict) -> np.ndarray:
    return np.mean(np.stack(list(per_prompt.values())), axis=0)


def test_compare_top_heads(cmp, raw) -> None:
    top = cmp.run_analysis("compare_top_heads", top=3)
    for label, r in raw.items():
        dla = _mean_over_prompts(r["dla"])  # (L, H)
        by = {"dla": {(la, h): dla[la, h] for la in range(r["L"]) for h in range(r["H"])}}
        layers = sorted(next(iter(r["abl"].values()))["zero"])
        abl = {la: np.mean([r["abl"][p]["zero"][la] for p in r["abl"]], axis=0) for la in layers}
        by["ablation"] = {(la, h): abl[la][h] for la in layers for h in range(r["H"])}
        for measure, values in by.items():
            rows = top.filter((pl.col("model") == label) & (pl.col("measure") == measure))
            ranked = sorted(values.values(), reverse=True)
            want = {k for k, v in values.items() if v >= ranked[2] - TOL}  # top 3, ties included
            assert {(x["layer"], x["head"]) for x in rows.iter_rows(named=True)} == want, (label, measure)
            for x in rows.iter_rows(named=True):
                key = (x["layer"], x["head"])
                assert x["rel_depth"] == pytest.approx(x["layer"] / r["L"])
                assert x["mean_dla"] == pytest.approx(dla[key], abs=TOL)
                if x["layer"] in abl:
                    assert x["mean_logit_diff"] == pytest.approx(abl[x["layer"]][x["head"]], abs=TOL)
                else:
                    assert x["mean_logit_diff"] is None
                assert x["rank"] == 1 + sum(v > values[key] + TOL for v in values.values())
    # the llama warehouse ablated layers 1-2 only: no ablation rank at layer 0
    assert top.filter((pl.col("model") == "llama") & (pl.col("measure") == "ablation"))["layer"].min() >= 1


def test_compare_first_token_attention_and_depth_profile(cmp, raw) -> None:
    att = cmp.run_analysis("compare_first_token_attention")
    prof = cmp.run_analysis("compare_depth_profile", bins=2, threshold=0.2)
    for label, r in raw.items():
        mass = _mean_over_prompts(r["first"])  # (L, H)
        mine = att.filter(pl.col("model") == label).sort("layer", "head")
        assert mine.height == r["L"] * r["H"]
        np.testing.assert_allclose(mine["mean_mass_first"].to_numpy(), mass.reshape(-1), atol=TOL)
        np.testing.assert_allclose(mine["min_mass_first"].to_numpy(),
                                   np.min(np.stack(list(r["first"].values())), axis=0).reshape(-1), atol=TOL)
        np.testing.assert_allclose(mine["rel_depth"].to_numpy(), np.repeat(np.arange(r["L"]) / r["L"], r["H"]))
        dla = _mean_over_prompts(r["dla"])
        for b in (0, 1):
            layers = [la for la in range(r["L"]) if la * 2 // r["L"] == b]
            row = prof.filter((pl.col("model") == label) & (pl.col("depth_bin") == b)).row(0, named=True)
            m = mass[layers].reshape(-1)
            assert row["n_blocks"] == len(layers) and row["n_heads"] == m.size
            assert row["mean_mass_first"] == pytest.approx(m.mean(), abs=TOL)
            assert row["sink_share"] == pytest.approx(np.mean(m >= 0.2))
            assert row["max_dla"] == pytest.approx(dla[layers].max(), abs=TOL)
            assert (row["rel_lo"], row["rel_hi"]) == (b / 2, (b + 1) / 2)


# -- labels, refusals ---------------------------------------------------------------------------
def test_labels_default_disambiguated_and_given(pair, tmp_path) -> None:
    with Comparison([pair["qwen"], pair["llama"]]) as c:
        assert c.labels[0].startswith("tiny-qwen2") and c.labels[1].startswith("tiny-llama")
    with Comparison([pair["qwen"], pair["qwen"]]) as c:  # the same model twice
        assert c.labels[0] != c.labels[1]
        assert c.sql("SELECT count(DISTINCT model) AS n FROM prompts")["n"][0] == 2
    assert assign_labels([None, None], ["m", "M"], [Path("/a/x"), Path("/b/y")]) == ["m@x", "M@y"]
    assert assign_labels([None, None], ["m", "m"], [Path("/a/x"), Path("/b/x")]) == ["m@x", "m#2"]
    assert assign_labels(["m", None], ["a", "m"], [Path("/a/x"), Path("/b/y")]) == ["m", "m@y"]
    with pytest.raises(QueryError, match="given to two warehouses"):
        Comparison([("a", pair["qwen"]), ("A", pair["llama"])])
    with pytest.raises(QueryError, match="reserved"):
        Comparison([("main", pair["qwen"])])
    assert parse_warehouse_arg(f"x={pair['qwen']}") == WarehouseArg(pair["qwen"], "x")
    assert parse_warehouse_arg(str(pair["qwen"])) == WarehouseArg(pair["qwen"])
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_warehouse_arg(str(odd)) == WarehouseArg(odd)
    with pytest.raises(QueryError, match="LABEL=DIR"):
        parse_warehouse_arg("=somewhere")


def test_mixed_schema_versions_are_refused(pair, tmp_path) -> None:
    old = tmp_path / "old"
    shutil.copytree(pair["llama"], old)
    m = json.loads((old / MANIFEST_NAME).read_text())
    m["schema_version"] = m["schema_version"] - 1
    (old / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(QueryError) as e:
        Comparison([pair["qwen"], old])
    msg = str(e.value)
    assert "\n" not in msg and "different schema versions" in msg and str(old) in msg and str(pair["qwen"]) in msg


# -- Parquet exports in a comparison ------------------------------------------------------------
COMPARE_PARAMS = {"compare_top_heads": {"top": 3}, "compare_depth_profile": {"bins": 2, "threshold": 0.2}}
PLAIN_SQL = ("SELECT model, template_index, count(*) AS n, avg(echo_correct::INT) AS acc, min(word) AS w "
             "FROM prompts GROUP BY ALL ORDER BY ALL")


@pytest.fixture(scope="module")
def exports(pair, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cmp_export")
    return {label: Path(export_parquet(path, root / f"{label}.parquet", progress=False).path)
            for label, path in pair.items()}


def _rows(df: pl.DataFrame) -> pl.DataFrame:
    """Rows in a fixed order (by every scalar column), for frames whose order SQL leaves open."""
    keys = [c for c, t in df.schema.items() if not isinstance(t, pl.Array | pl.List)]
    return df.sort(keys, nulls_last=True) if keys and df.height else df


@pytest.mark.parametrize("form", ["two exports", "an export and an HDF5 warehouse"])
def test_comparing_exports_gives_the_same_rows(cmp, pair, exports, form) -> None:
    """`-w qwen=EXPORT -w llama=EXPORT` (or one export, one HDF5 warehouse) is `-w qwen=DIR -w llama=DIR`:
    every view with its model column, the per-model schemas, a plain SELECT, every compare_*."""
    llama = exports["llama"] if form == "two exports" else pair["llama"]
    with Comparison([("qwen", exports["qwen"]), ("llama", llama)]) as c:
        assert c.labels == cmp.labels
        for v in VIEWS:
            got, want = (_rows(w.sql(f"SELECT * FROM {v.name}")) for w in (c, cmp))
            assert got.schema == want.schema and got.equals(want), v.name
        assert c.sql(PLAIN_SQL).equals(cmp.sql(PLAIN_SQL)) and c.sql(PLAIN_SQL).height == 4
        assert c.sql('SELECT * FROM "llama".emergence ORDER BY prompt').equals(
            cmp.sql('SELECT * FROM "llama".emergence ORDER BY prompt'))
        assert c.sql("SELECT model, d_model FROM models ORDER BY model").rows() == [("llama", 64), ("qwen", 96)]
        for a in list_analyses():
            if not is_comparison(a):
                continue
            params = COMPARE_PARAMS.get(a.name, {})
            got, want = c.run_analysis(a.name, **params), cmp.run_analysis(a.name, **params)
            assert want.height > 0, a.name
            # exact but for the last bits of DuckDB's parallel float sums
            assert_frame_equal(_rows(got), _rows(want), check_exact=False, rtol=1e-12, atol=1e-12), a.name


def test_exports_keep_default_labels_and_compare_alone(pair, exports) -> None:
    with Comparison([exports["qwen"], exports["llama"]]) as c, Comparison([pair["qwen"], pair["llama"]]) as h:
        assert c.labels == h.labels and c.labels[0].startswith("tiny-qwen2")
        assert c.sql("SELECT model FROM models ORDER BY model").equals(h.sql("SELECT model FROM models ORDER BY model"))
        assert c.bytes_read == 0  # Parquet scans are not HDF5 reads
    with Comparison([("mine", exports["qwen"])]) as c, Comparison([("mine", pair["qwen"])]) as h:
        assert_frame_equal(c.run_analysis("compare_emergence"), h.run_analysis("compare_emergence"),
                           check_exact=False, rtol=1e-12, atol=1e-12)
        assert c.sql("SELECT model FROM models").rows() == [("mine",)]
    with Warehouse(exports["qwen"], label="mine") as wh:  # one export, a given label: the models view says it
        assert wh.sql("SELECT model FROM models").rows() == [("mine",)]


def test_cli_compares_exports_like_warehouses(pair, exports) -> None:
    from click.testing import CliRunner

    from echowh.cli import main

    def run(*args: str) -> str:
        r = CliRunner().invoke(main, ["query", *args, "--format", "csv"])
        assert r.exit_code == 0, r.output
        return r.output

    on_exports = ["-w", f"qwen={exports['qwen']}", "-w", f"llama={exports['llama']}"]
    on_hdf5 = ["-w", f"qwen={pair['qwen']}", "-w", f"llama={pair['llama']}"]
    for args in (["-a", "compare_echo_accuracy"], ["-a", "compare_echo_words"], [PLAIN_SQL]):
        out = run(*on_exports, *args)
        assert out == run(*on_hdf5, *args) and out.count("\n") > 2, args
