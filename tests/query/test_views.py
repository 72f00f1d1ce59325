"""Views: columns, values from the hand-made warehouse, lazy loading and pushdown."""

from __future__ import annotations

import numpy as np
import pytest

from query import VIEWS, QueryError, Warehouse
from tests.query.conftest import PROMPTS, RANKS, VOCAB, D, H, L, T


def test_every_view_has_its_documented_columns(wh: Warehouse) -> None:
    for v in VIEWS:
        df = wh.sql(f"SELECT * FROM {v.name} LIMIT 0")
        assert tuple(df.columns) == v.names, v.name


def test_prompts_view(wh: Warehouse) -> None:
    df = wh.sql("SELECT prompt, word, template_index, target_id, top1_text, target_logit, echo_correct "
                "FROM prompts ORDER BY prompt")
    assert df.rows() == [
        (0, "cat", 0, 4, "cat", 7.0, True),
        (1, "cat", 1, 4, "cat", 8.0, True),
        (2, "dog", 0, 5, "dog", 9.0, True),
        (3, "dog", 1, 5, "X", 10.0, False),
    ]


def test_light_views_row_counts(wh: Warehouse) -> None:
    n = len(PROMPTS)
    counts = {"tokens": n * T, "logit_lens": n * (L + 1), "lens_topk": n * (L + 1) * 3,
              "dla": n * (1 + L * H + 2 * L), "ablation": n * 2 * L * (H + 2),
              "validation": n * 2, "vocab": len(VOCAB), "heads": H, "generations": n}
    for view, expected in counts.items():
        assert wh.sql(f"SELECT count(*) AS c FROM {view}")["c"][0] == expected, view


def test_logit_lens_layer_is_boundary_minus_one(wh: Warehouse) -> None:
    df = wh.sql("SELECT boundary, layer, target_rank FROM logit_lens WHERE prompt = 1 ORDER BY boundary")
    assert df["layer"].to_list() == [-1, 0, 1, 2]
    assert df["boundary"].to_list() == [0, 1, 2, 3]
    assert df["target_rank"].to_list() == RANKS[1]


def test_ablation_units_and_text(wh: Warehouse) -> None:
    df = wh.sql("SELECT unit, head, unit_kind, top1_text, positions FROM ablation "
                "WHERE prompt = 0 AND mode = 'zero' AND layer = 0 ORDER BY unit")
    assert df.rows() == [(0, 0, "head", "cat", "all"), (1, 1, "head", "cat", "all"),
                         (2, 2, "head", "cat", "all"), (3, None, "attn", "cat", "all"),
                         (4, None, "mlp", "X", "all")]


def test_dla_sums_per_prompt(wh: Warehouse) -> None:
    df = wh.sql("SELECT component, sum(dla) AS s FROM dla WHERE prompt = 2 GROUP BY component ORDER BY component")
    got = dict(df.rows())
    assert got["embed"] == pytest.approx(0.02)
    assert got["head"] == pytest.approx(0.9 + 0.8 + 0.7 + 0.1 + 0.3 + 0.2 + 0.2 + 0.1 + 0.0, abs=1e-6)
    assert got["mlp"] == pytest.approx(6.0)
    assert got["attn_bias"] == 0.0


def test_resid_vectors_match_numpy(wh: Warehouse, arrays: dict) -> None:
    df = wh.sql("SELECT prompt, boundary, position, vec FROM resid WHERE layer = 1 AND position = 3 ORDER BY prompt")
    assert df["boundary"].to_list() == [2] * 4
    got = np.stack(df["vec"].to_list())
    np.testing.assert_array_equal(got, np.stack([r[2, 3] for r in arrays["resid"]]))
    assert got.shape == (4, D)


def test_attention_is_causal_long_form(wh: Warehouse, arrays: dict) -> None:
    df = wh.sql("SELECT query_pos, key_pos, weight FROM attention "
                "WHERE prompt = 2 AND layer = 1 AND head = 2 ORDER BY query_pos, key_pos")
    assert df.height == T * (T + 1) // 2
    a = arrays["attn"][2][1, 2]
    for q, k, w in df.rows():
        assert k <= q
        assert w == pytest.approx(float(a[q, k]))
    sums = wh.sql("SELECT head, query_pos, sum(weight) AS s FROM attention WHERE prompt = 0 AND layer = 0 "
                  "GROUP BY ALL")["s"].to_numpy()
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)


def test_head_out_matches_numpy(wh: Warehouse, arrays: dict) -> None:
    df = wh.sql("SELECT vec FROM head_out WHERE prompt = 3 AND layer = 2 AND head = 0")
    np.testing.assert_array_equal(np.array(df["vec"][0]), arrays["head_out"][3][2, 0])


def test_one_layer_reads_a_fraction_of_all_layers(wh_path) -> None:
    with Warehouse(wh_path) as w:
        w.sql("SELECT sum(vec[1]) FROM resid")
        all_bytes = w.bytes_read
    with Warehouse(wh_path) as w:
        w.sql("SELECT sum(vec[1]) FROM resid WHERE layer = 1")
        one = w.bytes_read
    assert all_bytes == len(PROMPTS) * (L + 1) * T * D * 4
    assert one * (L + 1) == all_bytes  # one chunk (= one layer) per prompt


def test_counting_rows_reads_no_vectors(wh: Warehouse) -> None:
    # DuckDB asks only for the columns it needs: a count never touches the vectors
    assert wh.sql("SELECT count(*) AS n FROM resid WHERE layer = 1")["n"][0] == len(PROMPTS) * T
    assert wh.sql("SELECT count(*) AS n FROM attention")["n"][0] == len(PROMPTS) * L * H * T * (T + 1) // 2
    assert wh.bytes_read == 0


@pytest.mark.parametrize(("sql", "rows"), [
    ("SELECT * FROM resid r WHERE r.layer IN (0, 2)", 2 * 4 * T),
    ("SELECT * FROM resid WHERE boundary BETWEEN 1 AND 2 AND prompt = 3", 2 * T),
    ("SELECT * FROM resid WHERE layer >= 1 AND role = 4", 2 * 4),
    ("SELECT * FROM resid WHERE -1 = layer AND position < 2", 4 * 2),
])
def test_pushdown_reads_only_needed_rows(wh_path, sql: str, rows: int) -> None:
    with Warehouse(wh_path) as w:
        df = w.sql(sql)
        assert df.height == rows
        assert w.bytes_read == rows * D * 4


def test_pushdown_never_narrows_another_tables_predicate(wh: Warehouse) -> None:
    # l.layer = 0 filters logit_lens, not resid: resid must keep every layer
    df = wh.sql("SELECT count(*) AS c FROM resid r JOIN logit_lens l ON l.prompt = r.prompt "
                "WHERE l.layer = 0 AND r.position = 0")
    assert df["c"][0] == len(PROMPTS) * (L + 1)
    # OR is not narrowed
    df = wh.sql("SELECT count(*) AS c FROM resid WHERE layer = 0 OR position = 1")
    assert df["c"][0] == 4 * (T + L)
    # the same view twice with different predicates loads the union
    df = wh.sql("SELECT count(*) AS c FROM resid a JOIN resid b ON a.prompt = b.prompt "
                "AND a.position = b.position WHERE a.layer = 0 AND b.layer = 2")
    assert df["c"][0] == 4 * T


def test_heavy_view_from_a_previous_query_is_not_reused_partially(wh: Warehouse) -> None:
    wh.sql("SELECT * FROM resid WHERE layer = 0")
    assert wh.sql("SELECT count(*) AS c FROM resid")["c"][0] == 4 * (L + 1) * T


def test_describe_heavy_view_reads_nothing(wh: Warehouse) -> None:
    df = wh.sql("DESCRIBE resid")
    assert df["column_type"].to_list()[-1] == f"FLOAT[{D}]"
    assert wh.bytes_read == 0


def test_parameters_narrow_reads(wh: Warehouse) -> None:
    df = wh.sql("SELECT prompt, vec FROM resid WHERE layer = $l AND position = 0", {"l": 2})
    assert df.height == 4
    assert wh.bytes_read == 4 * D * 4


@pytest.mark.parametrize("sql", [
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO prompts VALUES (1)",
    "COPY (SELECT 1) TO '/tmp/echowh_should_not_exist.csv'",
    "ATTACH '/tmp/x.db'",
    "SET threads = 1",
    "INSTALL httpfs",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "DROP VIEW prompts",
])
def test_writes_are_refused(wh: Warehouse, sql: str) -> None:
    with pytest.raises(QueryError, match=r"^refused: \w+ statements are not allowed; the warehouse is read-only"):
        wh.sql(sql)


def test_several_statements_are_refused(wh: Warehouse) -> None:
    with pytest.raises(QueryError, match="expected one SQL statement, got 2"):
        wh.sql("SELECT 1; SELECT 2")


def test_bad_sql_lists_views(wh: Warehouse) -> None:
    with pytest.raises(QueryError) as e:
        wh.sql("SELEC 1")
    assert str(e.value).startswith("Parser Error: syntax error")
    assert str(e.value).splitlines()[-1].startswith("views: prompts, tokens,")


def test_unknown_table_suggests_a_view(wh: Warehouse) -> None:
    with pytest.raises(QueryError, match='Table with name promts does not exist! Did you mean "prompts"'):
        wh.sql("SELECT * FROM promts")


def test_missing_and_foreign_warehouse(tmp_path) -> None:
    with pytest.raises(QueryError, match="no warehouse at"):
        Warehouse(tmp_path / "nope")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text('{"kind": "other"}')
    with pytest.raises(QueryError, match="is not an echo-warehouse"):
        Warehouse(tmp_path / "foreign")


def test_no_ablation_gives_empty_view(wh_no_ablation) -> None:
    with Warehouse(wh_no_ablation) as w:
        df = w.sql("SELECT * FROM ablation")
        assert df.height == 0
        assert tuple(df.columns) == next(v for v in VIEWS if v.name == "ablation").names


def test_files_are_never_modified(wh_path) -> None:
    before = {p: p.stat().st_mtime_ns for p in wh_path.rglob("*")}
    with Warehouse(wh_path) as w:
        w.sql("SELECT * FROM resid WHERE layer = 0")
        w.run_analysis("emergence_layer")
    assert {p: p.stat().st_mtime_ns for p in wh_path.rglob("*")} == before


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM 'https://example.org/x.parquet'",
])
def test_nothing_outside_the_warehouse_is_reachable(wh: Warehouse, sql: str) -> None:
    with pytest.raises(QueryError, match="file system operations are disabled by configuration"):
        wh.sql(sql)


@pytest.mark.parametrize(("sql", "rows"), [
    # columns renamed by position: here `layer` is the view's boundary and `boundary` its layer
    ("SELECT count(*) AS n FROM resid r(p, layer, boundary) WHERE r.layer = 0 AND r.p = 0", T),
    ("SELECT count(*) AS n FROM resid r(p, layer, boundary) WHERE boundary = -1 AND p = 0", T),
    ("SELECT count(*) AS n FROM resid AS r(p) WHERE p IN (0, 1) AND layer = 1", 2 * T),
    ("SELECT count(*) AS n FROM (SELECT * FROM resid) r(p, layer, boundary) WHERE r.layer = 0 AND r.p = 0", T),
])
def test_renamed_columns_narrow_the_right_column(wh: Warehouse, sql: str, rows: int) -> None:
    assert wh.sql(sql)["n"][0] == rows
