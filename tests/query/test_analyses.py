"""Each named analysis on the hand-made warehouse: exact results worked out from conftest."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

from query import Comparison, QueryError, Warehouse, get_analysis, is_comparison, list_analyses
from tests.query.conftest import DLA_HEAD, EMERGENCE, FLIPS, LOGIT_DIFF, PROMPTS, RANKS, D, H, L, T

# The study's analyses (issue), then the aggregates the report charts.
NAMES = {"echo_behaviour", "echo_agreement", "emergence_layer", "emergence_counts",
         "lens_trajectory", "head_dla", "head_ablation", "dla_vs_ablation",
         "dla_vs_ablation_corr", "top_heads_consistency", "first_token_attention",
         "resid_cosine_templates", "bos_cosine", "ablation_flips",
         "validation_summary", "lens_target", "head_dla_grid", "dla_vs_ablation_heads",
         "block_ablation", "first_token_attention_grid", "resid_cosine_by_layer",
         # activation patching (issue 11; checked on a real extraction in test_patching_views.py)
         "patching_recovery_map", "patching_top_heads", "patching_attribution", "patching_disagreements",
         # model comparison (query.Comparison; tested against numpy in test_compare.py)
         "compare_echo_accuracy", "compare_echo_words", "compare_emergence", "compare_emergence_prompts",
         "compare_top_heads", "compare_first_token_attention", "compare_depth_profile",
         # attention sinks (issue 10; checked against numpy in test_sinks.py)
         "sink_heads", "sink_share", "sink_norms", "massive_activations", "sink_ablation",
         # circuits (issue 17; checked against h5py/numpy in test_circuits.py)
         "circuit_top_edges", "circuit_head_inputs", "circuit_paths", "circuit_faithfulness_curve",
         "circuit_agreement", "circuit_head_rankings"}


@pytest.fixture()
def one(wh: Warehouse):
    """The same warehouse as a one-model comparison: compare_* analyses run there."""
    with Comparison([wh.path]) as c:
        yield c


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_catalogue_is_complete_and_self_consistent(wh: Warehouse, one: Comparison) -> None:
    assert {a.name for a in list_analyses()} == NAMES
    for a in list_analyses():
        assert a.description, a.name
        used = set(re.findall(r"\$(\w+)", a.sql))
        assert used == {p.name for p in a.params}, a.name
        df = (one if is_comparison(a) else wh).run_analysis(a.name)
        assert [c[0] for c in a.columns] == df.columns, a.name


def test_unknown_analysis_suggests_closest() -> None:
    with pytest.raises(QueryError, match=r"no analysis named 'head_dl'; did you mean 'head_dla'\?"):
        get_analysis("head_dl")


def test_bad_parameters(wh: Warehouse) -> None:
    with pytest.raises(QueryError, match=r"analysis head_dla has no parameter 'lay' \(parameters: layer\)"):
        wh.run_analysis("head_dla", lay=1)
    with pytest.raises(QueryError, match="parameter layer takes INTEGER, got 'one'"):
        wh.run_analysis("head_dla", layer="one")
    with pytest.raises(QueryError, match="parameter layer takes INTEGER, got 1.5"):
        wh.run_analysis("head_dla", layer=1.5)


def test_parameter_text_is_a_value_not_sql(wh: Warehouse) -> None:
    df = wh.run_analysis("lens_trajectory", word="cat' OR 1=1 --")
    assert df.height == 0


def test_echo_behaviour(wh: Warehouse) -> None:
    df = wh.run_analysis("echo_behaviour")
    assert df.select("template_index", "n_prompts", "n_echo_first_token", "first_token_accuracy",
                     "n_echo_correct", "echo_accuracy", "n_echo_exact", "exact_accuracy").rows() == [
        (0, 2, 2, 1.0, 2, 1.0, 2, 1.0), (1, 2, 1, 0.5, 1, 0.5, 1, 0.5)]


def test_echo_agreement(wh: Warehouse) -> None:
    assert wh.run_analysis("echo_agreement").rows() == [
        ("cat", 2, True, True, 2, ["cat", "cat"], ["cat", "cat"]),
        ("dog", 2, False, False, 1, ["dog", "X"], ["dog", "X"]),
    ]


def test_emergence_layer_and_counts(wh: Warehouse) -> None:
    assert wh.run_analysis("emergence_layer")["emergence_layer"].to_list() == EMERGENCE
    assert wh.run_analysis("emergence_counts").rows() == [(0, -1, 1), (0, 1, 1), (1, 2, 1), (1, None, 1)]


def test_lens_trajectory(wh: Warehouse) -> None:
    df = wh.run_analysis("lens_trajectory", word="cat", template_index=0, k=1)
    assert df.select("layer", "token_text", "is_target", "layers_before_emergence").rows() == [
        (-1, "请", False, 2), (0, "请", False, 1), (1, "cat", True, 0), (2, "cat", True, -1)]
    assert wh.run_analysis("lens_trajectory").height == 4 * 4 * 3  # k = 5 > K = 3 stored


def test_head_dla_default_is_emergence_layer(wh: Warehouse) -> None:
    df = wh.run_analysis("head_dla")
    assert df.select("prompt", "layer", "head", "dla_rank").rows() == [
        (0, 1, 0, 1), (0, 1, 1, 3), (0, 1, 2, 2), (1, 2, 0, 2), (1, 2, 1, 1), (1, 2, 2, 3)]
    np.testing.assert_allclose(df["dla"].to_numpy(), [*DLA_HEAD[0][1], *DLA_HEAD[1][2]], rtol=1e-6)
    at0 = wh.run_analysis("head_dla", layer=0)
    assert at0.height == 12
    assert at0.filter(at0["prompt"] == 2)["dla_rank"].to_list() == [1, 2, 3]


def test_head_ablation(wh: Warehouse) -> None:
    df = wh.run_analysis("head_ablation")
    assert df.select("prompt", "layer", "head", "mode", "ablation_rank", "top1_text").rows() == [
        (0, 1, 0, "zero", 1, "cat"), (0, 1, 1, "zero", 2, "cat"), (0, 1, 2, "zero", 3, "cat"),
        (1, 2, 0, "zero", 1, ":"), (1, 2, 1, "zero", 3, "cat"), (1, 2, 2, "zero", 2, "cat")]
    np.testing.assert_allclose(df["logit_diff"].to_numpy(),
                               [*LOGIT_DIFF[0][0][1][:3], *LOGIT_DIFF[1][0][2][:3]], rtol=1e-6)
    mean = wh.run_analysis("head_ablation", mode="mean")
    np.testing.assert_allclose(mean["logit_diff"].to_numpy(), [0.1, 0.2, 0.3, 0.3, 0.1, 0.2], rtol=1e-6)
    assert wh.run_analysis("head_ablation", mode=None).height == 12


def test_dla_vs_ablation(wh: Warehouse) -> None:
    df = wh.run_analysis("dla_vs_ablation", top=1)
    flagged = df.filter(df["large_ablation_small_dla"]).select("prompt", "layer", "head").rows()
    assert flagged == [(1, 2, 0)]
    row = df.filter((df["prompt"] == 1) & (df["head"] == 0))
    assert row["indirect"][0] == pytest.approx(0.9 - 0.05, abs=1e-6)
    assert row["dla_rank"][0] == 2 and row["ablation_rank"][0] == 1


def _spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def test_dla_vs_ablation_corr(wh: Warehouse) -> None:
    df = wh.run_analysis("dla_vs_ablation_corr")
    assert df["layer"].to_list() == [0, 1, 2]
    for layer in range(3):
        rho = [_spearman(DLA_HEAD[p][layer], LOGIT_DIFF[p][0][layer][:3]) for p in range(4)]
        got = df.filter(df["layer"] == layer).row(0, named=True)
        assert got["n_prompts"] == 4
        assert got["mean_spearman"] == pytest.approx(np.mean(rho))
        assert got["median_spearman"] == pytest.approx(np.median(rho))
        assert (got["min_spearman"], got["max_spearman"]) == pytest.approx((min(rho), max(rho)))


def test_top_heads_consistency(wh: Warehouse) -> None:
    df = wh.run_analysis("top_heads_consistency", top=1)
    assert df.select("head", "n_prompts_dla", "n_top_dla", "n_prompts_ablation", "n_top_ablation",
                     "frac_top_ablation").rows() == [(0, 2, 1, 2, 2, 1.0), (1, 2, 1, 2, 0, 0.0),
                                                     (2, 2, 0, 2, 0, 0.0)]
    assert df["mean_logit_diff"][0] == pytest.approx((0.3 + 0.9) / 2)


def test_first_token_attention(wh: Warehouse, arrays: dict) -> None:
    df = wh.run_analysis("first_token_attention")
    assert df.select("prompt", "layer", "head").rows() == [(0, 1, 0), (0, 1, 1), (0, 1, 2),
                                                           (1, 2, 0), (1, 2, 1), (1, 2, 2)]
    for r in df.iter_rows(named=True):
        a = arrays["attn"][r["prompt"]][r["layer"], r["head"], T - 1]
        got = [r["mass_first"], r["mass_template"], r["mass_word"], r["mass_suffix"], r["mass_last"]]
        np.testing.assert_allclose(got, a, rtol=1e-6)  # positions 0..4 have roles 0..4
        assert r["top_other_pos"] == 1 + int(np.argmax(a[1:]))
        assert r["top_other_role"] == ["first", "template", "word", "suffix", "last"][r["top_other_pos"]]


def test_first_token_attention_layer_and_head_narrow_reads(wh: Warehouse, arrays: dict) -> None:
    df = wh.run_analysis("first_token_attention", layer=2, head=1)
    assert df.select("prompt", "layer", "head").rows() == [(p, 2, 1) for p in range(4)]
    np.testing.assert_allclose(df["mass_first"].to_numpy(),
                               [arrays["attn"][p][2, 1, T - 1, 0] for p in range(4)], rtol=1e-6)
    assert wh.bytes_read == 4 * T * 4  # one query row of one head of one layer per prompt


def test_resid_cosine_templates(wh: Warehouse, arrays: dict) -> None:
    df = wh.run_analysis("resid_cosine_templates")
    assert df.height == 2 * 4
    for r in df.iter_rows(named=True):
        ra, rb = arrays["resid"][r["prompt_a"]], arrays["resid"][r["prompt_b"]]
        b = r["boundary"]
        assert r["cosine"] == pytest.approx(_cos(ra[b, T - 1], rb[b, T - 1]), abs=1e-5)
    # last position only: two scans of resid (ra, rb), each 4 prompts x 4 boundaries x D floats
    assert wh.bytes_read == 2 * 4 * 4 * 1 * D * 4


def test_bos_cosine(wh: Warehouse) -> None:
    df = wh.run_analysis("bos_cosine")
    assert df.select("layer", "n_pairs", "n_first_tokens").rows() == [(-1, 6, 1), (0, 6, 1), (1, 6, 1), (2, 6, 1)]
    np.testing.assert_allclose(df["min_cosine"].to_numpy(), [1, 1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(df["mean_cosine"].to_numpy(), [1, 1, 0, 1], atol=1e-5)


def test_ablation_flips(wh: Warehouse) -> None:
    df = wh.run_analysis("ablation_flips")
    assert df.select("prompt", "mode", "layer", "unit", "unit_kind", "head", "clean_top1_text",
                     "new_top1_text").rows() == [
        (0, "zero", 0, 4, "mlp", None, "cat", "X"),
        (1, "zero", 2, 0, "head", 0, "cat", ":"),
        (3, "mean", 1, 1, "head", 1, "X", "Y")]
    assert wh.run_analysis("ablation_flips", mode="mean").height == 1
    assert wh.run_analysis("ablation_flips", unit_kind="head", layer=2)["prompt"].to_list() == [1]


def test_validation_summary(wh: Warehouse) -> None:
    # conftest: resid_chain passes everywhere at 1e-6; logits_from_resid errs 0.1 * prompt
    assert wh.run_analysis("validation_summary").rows() == [
        ("logits_from_resid", 4, 1, pytest.approx(0.3), pytest.approx(0.3), 1e-4),
        ("resid_chain", 4, 4, 1e-6, 1e-6, 1e-4)]


def test_lens_target(wh: Warehouse) -> None:
    df = wh.run_analysis("lens_target")
    assert df.height == 4 * (L + 1)
    assert df["target_rank"].to_list() == [r for ranks in RANKS for r in ranks]
    assert df["layer"].to_list() == list(range(-1, L)) * 4
    assert df.group_by("prompt", maintain_order=True).first()["emergence_layer"].to_list() == EMERGENCE
    np.testing.assert_allclose(df["target_prob"].to_numpy(), np.tile(np.linspace(0.1, 0.7, L + 1), 4), rtol=1e-6)
    assert wh.run_analysis("lens_target", template_index=1)["prompt"].unique().sort().to_list() == [1, 3]


def test_head_dla_grid(wh: Warehouse) -> None:
    dla = np.array(DLA_HEAD)  # (prompt, layer, head)
    df = wh.run_analysis("head_dla_grid")
    assert df.select("layer", "head").rows() == [(la, h) for la in range(L) for h in range(H)]
    assert set(df["n_prompts"]) == {4}
    np.testing.assert_allclose(df["mean_dla"].to_numpy(), dla.mean(0).reshape(-1), atol=1e-7)
    np.testing.assert_allclose(df["mean_abs_dla"].to_numpy(), np.abs(dla).mean(0).reshape(-1), atol=1e-7)
    t1 = wh.run_analysis("head_dla_grid", template_index=1)
    np.testing.assert_allclose(t1["mean_dla"].to_numpy(), dla[[1, 3]].mean(0).reshape(-1), atol=1e-7)


def test_dla_vs_ablation_heads(wh: Warehouse) -> None:
    dla = np.array(DLA_HEAD)  # (prompt, layer, head)
    diff = np.array(LOGIT_DIFF)[:, 0, :, :H]  # zero mode, heads only: (prompt, layer, head)
    df = wh.run_analysis("dla_vs_ablation_heads").sort("layer", "head")
    np.testing.assert_allclose(df["mean_dla"].to_numpy(), dla.mean(0).reshape(-1), atol=1e-7)
    np.testing.assert_allclose(df["mean_logit_diff"].to_numpy(), diff.mean(0).reshape(-1), atol=1e-6)
    np.testing.assert_allclose(df["mean_kl"].to_numpy(), 0.1 * diff.mean(0).reshape(-1), atol=1e-6)
    # rows come ranked: rank 1 = the head with the largest mean effect
    top = wh.run_analysis("dla_vs_ablation_heads").row(0, named=True)
    best = np.unravel_index(int(np.argmax(diff.mean(0))), (L, H))
    assert (top["layer"], top["head"], top["ablation_rank"]) == (*best, 1)
    best_dla = df.filter(df["dla_rank"] == 1).select("layer", "head").rows()
    assert best_dla == [np.unravel_index(int(np.argmax(dla.mean(0))), (L, H))]
    mean = wh.run_analysis("dla_vs_ablation_heads", mode="mean").sort("layer", "head")
    np.testing.assert_allclose(mean["mean_logit_diff"].to_numpy(),
                               np.array(LOGIT_DIFF)[:, 1, :, :H].mean(0).reshape(-1), atol=1e-6)


def test_block_ablation(wh: Warehouse) -> None:
    diff = np.array(LOGIT_DIFF)  # (prompt, mode, layer, unit); unit H = attn, H + 1 = mlp
    df = wh.run_analysis("block_ablation")
    assert df.select("layer", "unit_kind", "n_prompts").rows() == [
        (la, k, 4) for la in range(L) for k in ("attn", "mlp")]
    expect = [diff[:, 0, la, H + (k == "mlp")].mean() for la in range(L) for k in ("attn", "mlp")]
    np.testing.assert_allclose(df["mean_logit_diff"].to_numpy(), expect, atol=1e-6)
    np.testing.assert_allclose(df["mean_kl"].to_numpy(), 0.1 * np.array(expect), atol=1e-6)
    # the only block flip in zero mode: prompt 0, layer 0, the MLP (FLIPS)
    changed = {(la, k): f for la, k, f in df.select("layer", "unit_kind", "frac_top1_changed").rows()}
    flips = {(la, "mlp" if u == H + 1 else "attn") for (p, mo, la, u) in FLIPS if mo == 0 and u >= H}
    assert changed == {key: (0.25 if key in flips else 0.0) for key in changed}
    assert wh.run_analysis("block_ablation", mode="mean").height == 2 * L


def test_first_token_attention_grid(wh: Warehouse, arrays: dict) -> None:
    df = wh.run_analysis("first_token_attention_grid")
    first = np.stack([a[:, :, T - 1, 0] for a in arrays["attn"]])  # (prompt, layer, head)
    assert df.select("layer", "head").rows() == [(la, h) for la in range(L) for h in range(H)]
    np.testing.assert_allclose(df["mean_mass_first"].to_numpy(), first.mean(0).reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(df["min_mass_first"].to_numpy(), first.min(0).reshape(-1), rtol=1e-6)


def test_resid_cosine_by_layer(wh: Warehouse, arrays: dict) -> None:
    df = wh.run_analysis("resid_cosine_by_layer")
    pairs = [(a, b) for a, (wa, ta) in enumerate(PROMPTS) for b, (wb, tb) in enumerate(PROMPTS)
             if wa == wb and ta == 0 and tb == 1]
    cos = np.array([[_cos(arrays["resid"][a][b_, T - 1], arrays["resid"][b][b_, T - 1])
                     for b_ in range(L + 1)] for a, b in pairs])  # (word, boundary)
    assert df["layer"].to_list() == list(range(-1, L)) and set(df["n_words"]) == {2}
    np.testing.assert_allclose(df["mean_cosine"].to_numpy(), cos.mean(0), atol=1e-5)
    np.testing.assert_allclose(df["min_cosine"].to_numpy(), cos.min(0), atol=1e-5)
    np.testing.assert_allclose(df["max_cosine"].to_numpy(), cos.max(0), atol=1e-5)


@pytest.mark.parametrize("name", ["head_ablation", "dla_vs_ablation", "dla_vs_ablation_corr", "ablation_flips",
                                  "dla_vs_ablation_heads", "block_ablation"])
def test_ablation_analyses_are_empty_without_ablation(wh_no_ablation, name: str) -> None:
    with Warehouse(wh_no_ablation) as w:
        df = w.run_analysis(name)
    assert df.height == 0
    assert df.columns == [c[0] for c in get_analysis(name).columns]


def test_top_heads_without_ablation(wh_no_ablation) -> None:
    with Warehouse(wh_no_ablation) as w:
        df = w.run_analysis("top_heads_consistency")
    assert df["n_prompts_ablation"].to_list() == [0, 0, 0]
    assert df["n_prompts_dla"].to_list() == [2, 2, 2]


def _avg_ranks(x: list[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (what standard Spearman uses)."""
    x = np.asarray(x)
    return np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x])


def test_dla_vs_ablation_corr_averages_tied_ranks(wh: Warehouse) -> None:
    # mean mode: prompt 2 ties every head at every layer (no correlation: left out, not NaN)
    df = wh.run_analysis("dla_vs_ablation_corr", mode="mean")
    for layer in range(L):
        rho = []
        for p in range(4):
            a, d = np.array(LOGIT_DIFF[p][1][layer][:H]), np.array(DLA_HEAD[p][layer])
            if np.ptp(a) == 0 or np.ptp(d) == 0:
                continue
            rho.append(float(np.corrcoef(_avg_ranks(d), _avg_ranks(a))[0, 1]))
        got = df.filter(df["layer"] == layer).row(0, named=True)
        assert got["n_prompts"] == len(rho)
        assert got["mean_spearman"] == pytest.approx(np.mean(rho))
        assert got["min_spearman"] == pytest.approx(min(rho))


def test_ties_get_average_ranks_in_sql(tmp_path) -> None:
    """A direct check of the rank formula on a tie: Spearman of [1, 2, 2] vs [1, 2, 3]."""
    import duckdb

    sql = get_analysis("dla_vs_ablation_corr").sql
    rank_expr = sql[sql.index("rank() OVER (PARTITION BY prompt, layer, mode ORDER BY dla)"):sql.index(" AS rank_dla")]
    con = duckdb.connect()
    con.execute("CREATE TABLE j AS SELECT 0 AS prompt, 0 AS layer, 'zero' AS mode, * FROM "
                "(VALUES (1.0), (2.0), (2.0)) t(dla)")
    ranks = [r[0] for r in con.execute(f"SELECT {rank_expr} FROM j ORDER BY dla").fetchall()]
    assert ranks == [1.0, 2.5, 2.5]


@pytest.mark.parametrize(("name", "param", "value", "hint"), [
    ("head_ablation", "mode", "zer", "; did you mean 'zero'?"),
    ("ablation_flips", "unit_kind", "heads", "; did you mean 'head'?"),
    ("block_ablation", "mode", "resample", ""),
])
def test_choice_parameters_refuse_other_values(wh: Warehouse, name: str, param: str, value: str, hint: str) -> None:
    allowed = {"mode": "zero, mean", "unit_kind": "head, attn, mlp"}[param]
    msg = f"parameter {param} takes one of {allowed} (or NULL), got '{value}'{hint}"
    with pytest.raises(QueryError, match=re.escape(msg) + "$"):
        wh.run_analysis(name, **{param: value})


_POLARS = {"INTEGER": pl.Int32, "BIGINT": pl.Int64, "DOUBLE": pl.Float64, "FLOAT": pl.Float32,
           "VARCHAR": pl.String, "BOOLEAN": pl.Boolean, "TINYINT": pl.Int8}


def test_declared_column_types_are_what_queries_return(wh: Warehouse, one: Comparison) -> None:
    for a in list_analyses():
        df = (one if is_comparison(a) else wh).run_analysis(a.name)
        for name, typ, _ in a.columns:
            if typ in _POLARS:
                assert df.schema[name] == _POLARS[typ], (a.name, name, typ, df.schema[name])
            else:
                assert typ.endswith("[]") and isinstance(df.schema[name], pl.List), (a.name, name, typ)
