"""Resource guards (timeout, memory limit, spill directory), every EXPLAIN form, and broken
shards: each a result or a one-line error, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from echowh.cli import main
from query import QueryError, Warehouse

SLOW = "SELECT count(*) FROM range(200000000) a, range(1000000) b WHERE (a.range * b.range) % 7 = 3"


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_timeout_interrupts_the_statement(wh_path) -> None:
    with Warehouse(wh_path, timeout=0.3) as wh:
        with pytest.raises(QueryError, match=r"^interrupted: the statement ran longer than the timeout \(0.3 s\)$"):
            wh.sql(SLOW)
        wh.timeout = None  # no timing race on a loaded machine: only "still usable" is checked here
        assert wh.sql("SELECT count(*) AS n FROM prompts")["n"][0] == 4  # the connection still works


def test_cli_timeout_is_a_one_line_error(wh_path) -> None:
    r = run("query", "-w", str(wh_path), "--timeout", "0.3", SLOW)
    assert r.exit_code == 1
    assert r.output == "Error: interrupted: the statement ran longer than the timeout (0.3 s)\n"
    r = run("query", "-w", str(wh_path), "--timeout", "0", "SELECT 1")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_memory_limit_and_spill_directory(wh_path) -> None:
    with Warehouse(wh_path, memory_limit="64MB") as wh:
        limit, tmp = wh.con.sql("SELECT current_setting('memory_limit'), current_setting('temp_directory')").fetchall()[0]
        assert limit == "61.0 MiB"  # DuckDB shows 64 MB in MiB
        spill = Path(tmp)
        assert spill == wh.spill_dir and spill.is_dir()
        assert spill.resolve() != Path.cwd().resolve()
        assert wh_path.resolve() not in spill.resolve().parents
        with pytest.raises(QueryError, match=r"Out of Memory Error") as e:
            wh.sql("SELECT list(range) FROM range(40000000)")  # a list aggregate cannot spill
        assert "Traceback" not in str(e.value)
        # a user cannot lift the limit or move the spill directory
        with pytest.raises(QueryError, match="refused: SET statements are not allowed"):
            wh.sql("SET memory_limit = '100GB'")
    assert not spill.exists()  # removed on close


def test_default_memory_limit_is_set(wh: Warehouse) -> None:
    limit = wh.con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]
    assert limit.endswith(("MiB", "GiB"))


def test_cli_memory_limit(wh_path) -> None:
    r = run("query", "-w", str(wh_path), "--memory-limit", "64MB", "--format", "csv",
            "SELECT current_setting('memory_limit') AS m")
    assert r.exit_code == 0 and r.output == "m\n61.0 MiB\n"
    r = run("query", "-w", str(wh_path), "--memory-limit", "lots", "SELECT 1")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith("Error: cannot open DuckDB (") and "--memory-limit 'lots'" in r.output



def test_out_of_memory_is_one_line_with_our_advice_not_duckdbs(wh_path) -> None:
    """Issue 19.7: 9 lines, including DuckDB's "SET threads" advice, which the tool refuses."""
    r = run("query", "-w", str(wh_path), "--memory-limit", "2MB", "SELECT list(range) AS l FROM range(3000000)")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: Out of Memory Error: ")
    assert r.output.endswith("; raise --memory-limit (now 2MB) or select fewer rows or columns\n")
    assert "SET threads" not in r.output


@pytest.mark.parametrize(("args", "line"), [
    (["-a", "head_dla", "-p", "layer=99999999999"], "Error: parameter layer takes an INTEGER (32-bit), got 99999999999\n"),
    (["SELECT 300::TINYINT AS x"], "Error: Conversion Error: Type INT32 with value 300 can't be cast because the "
                                   "value is out of range for the destination type INT8\n"),
])
def test_duckdb_errors_are_their_first_line(wh_path, args: list[str], line: str) -> None:
    """Issue 19.7: an out-of-range value printed DuckDB's 4-line error (LINE, caret)."""
    r = run("query", "-w", str(wh_path), *args)
    assert r.exit_code == 1 and r.output == line


@pytest.mark.parametrize("args", [
    ["SELECT 1::UNION(a INT, b VARCHAR) AS u"],
    ["--format", "csv", "SELECT MAP {'a':1} AS m"],
    ["--format", "csv", "SELECT * FROM duckdb_settings()"],
])
def test_the_issues_tracebacks_are_results(wh_path, args: list[str]) -> None:
    """Issue 19.6: each of these was a Polars traceback."""
    r = run("query", "-w", str(wh_path), *args)
    assert r.exit_code == 0 and r.exception is None, r.output
    assert r.output.strip()


EXPLAINS = [
    "EXPLAIN SELECT * FROM resid WHERE layer = 1",
    "EXPLAIN ANALYZE SELECT * FROM resid WHERE layer = 1",
    "EXPLAIN (FORMAT JSON) SELECT * FROM resid WHERE layer = 1",
    "explain (format json) SELECT * FROM resid WHERE layer = 1",
    "EXPLAIN (FORMAT TEXT) SELECT * FROM resid WHERE layer = 1",
    "EXPLAIN (FORMAT HTML) SELECT * FROM resid WHERE layer = 1",
    "EXPLAIN (FORMAT GRAPHVIZ) SELECT * FROM resid WHERE layer = 1",
    "EXPLAIN (FORMAT YAML) SELECT * FROM resid WHERE layer = 1",
    "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM resid WHERE layer = 1",
    "EXPLAIN (ANALYZE) SELECT count(*) FROM attention",
    "EXPLAIN WITH x AS (SELECT * FROM resid) SELECT count(*) FROM x",
]


@pytest.mark.parametrize("sql", EXPLAINS)
def test_every_explain_form(wh: Warehouse, sql: str) -> None:
    df = wh.sql(sql)
    assert df.columns == ["explain_key", "explain_value"] and df.height >= 1
    plan = "\n".join(df["explain_value"].to_list())
    assert plan.strip()
    if "JSON" in sql.upper() and "ANALYZE" not in sql.upper():
        json.loads(plan)
        assert '\\"layer\\" = 1' in plan  # the filter is pushed into the view's scan


@pytest.mark.parametrize("sql", [
    "EXPLAIN (FORMAT JSON) CREATE TABLE t AS SELECT 1",
    "EXPLAIN ANALYZE INSERT INTO prompts VALUES (1)",
    "EXPLAIN (ANALYZE, FORMAT JSON) COPY (SELECT 1) TO '/tmp/x.csv'",
])
def test_explain_of_a_write_is_refused(wh: Warehouse, sql: str) -> None:
    with pytest.raises(QueryError, match=r"^refused: \w+ statements are not allowed"):
        wh.sql(sql)


@pytest.mark.parametrize("sql", ["EXPLAIN (FORMAT JSON", "EXPLAIN (FORMAT NOPE) SELECT 1", "EXPLAIN (FORMAT JSON) SELEC 1"])
def test_bad_explain_is_a_one_line_error(wh_path, sql: str) -> None:
    r = run("query", "-w", str(wh_path), sql)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith("Error: ")


def test_cli_explain_prints_the_plan(wh_path) -> None:
    r = run("query", "-w", str(wh_path), "EXPLAIN (FORMAT JSON) SELECT vec FROM resid WHERE layer = 1")
    assert r.exit_code == 0
    assert json.loads(r.output)[0]["name"]


@pytest.fixture()
def broken(wh_path, tmp_path) -> Path:
    """A copy of the hand-made warehouse whose prompt 1 shard is cut in half."""
    root = tmp_path / "w"
    shutil.copytree(wh_path, root)
    shard = root / "prompts" / "p00001.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return root


@pytest.mark.parametrize("pushdown", [True, False])
@pytest.mark.parametrize("sql", [
    "SELECT sum(vec[1]) FROM resid",
    "SELECT count(*) FROM attention WHERE layer = 1",
    "SELECT count(*) FROM head_out_all",
    "SELECT * FROM prompts",
    "SELECT count(*) FROM tokens",
    "SELECT * FROM resid a JOIN logit_lens USING (prompt)",
])
def test_truncated_shard_is_a_one_line_error_naming_it(broken, sql: str, pushdown: bool) -> None:
    with Warehouse(broken, pushdown=pushdown) as wh, pytest.raises(QueryError) as e:
        wh.sql(sql)
    msg = str(e.value)
    assert "\n" not in msg and str(broken / "prompts" / "p00001.h5") in msg, msg


def test_truncated_shard_in_the_cli(broken) -> None:
    r = run("query", "-w", str(broken), "SELECT count(*) FROM resid WHERE layer = 0")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "Traceback" not in r.output
    assert r.output.startswith(f"Error: {broken / 'prompts' / 'p00001.h5'}: not a readable HDF5 shard ")


def test_statements_that_skip_a_broken_shard_still_run(broken) -> None:
    with Warehouse(broken) as wh:  # DuckDB asks for prompt 0 only: shard 1 is never opened
        assert wh.sql("SELECT count(*) AS n FROM resid WHERE prompt = 0")["n"][0] == 4 * 5


def test_missing_dataset_is_a_one_line_error_naming_the_shard(wh_path, tmp_path) -> None:
    root = tmp_path / "w"
    shutil.copytree(wh_path, root)
    with h5py.File(root / "prompts" / "p00002.h5", "a") as f:
        del f["attn_pattern"]
    with Warehouse(root) as wh, pytest.raises(QueryError) as e:
        wh.sql("SELECT count(*) FROM attention")
    msg = str(e.value)
    assert msg.startswith(f"{root / 'prompts' / 'p00002.h5'}: ") and "attn_pattern" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("pushdown", [True, False])
@pytest.mark.parametrize("sql", ["SELECT sum(vec[1]) FROM resid WHERE layer = 1",
                                 "SELECT count(*) FROM attention", "SELECT * FROM prompts",
                                 "SELECT * FROM ablation"])
def test_store_errors_come_back_as_the_store_wrote_them(wh_path, monkeypatch, sql: str, pushdown: bool) -> None:
    """A WarehouseError raised by the reader inside DuckDB's scan (which wraps it) reaches the
    user as the store's own one line."""
    from store import WarehouseError, WarehouseReader

    real = WarehouseReader.shard

    def shard(self, index: int, subdir: str = "prompts"):
        if index == 2:
            raise WarehouseError(f"{self.root / subdir / 'p00002.h5'}: structure check failed (test)")
        return real(self, index, subdir)

    monkeypatch.setattr(WarehouseReader, "shard", shard)
    with Warehouse(wh_path, pushdown=pushdown) as wh, pytest.raises(QueryError) as e:
        wh.sql(sql)
    sub = "ablation" if "ablation" in sql else "prompts"
    assert str(e.value) == f"{wh_path / sub / 'p00002.h5'}: structure check failed (test)"
