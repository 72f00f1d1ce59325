"""`echowh export --parquet`: every view and every named analysis identical on the export.

The hand-made warehouse (conftest) is exported; both forms are opened with ``Warehouse`` and
compared exactly (Polars ``equals``: same columns, types, values, nulls). Plain DuckDB and
Polars read the export in a subprocess that never imports the project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from query import QueryError, Warehouse, list_analyses
from query.analyses import is_comparison
from query.export import EXPORT_FILE, export_parquet
from query.views import VIEWS
from tests.query.conftest import PROMPTS, build


def _sorted(df: pl.DataFrame) -> pl.DataFrame:
    keys = [c for c, t in df.schema.items() if not isinstance(t, pl.Array | pl.List)]
    return df.sort(keys, nulls_last=True) if keys and df.height else df


@pytest.fixture(scope="module")
def exported(wh_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("export") / "pq"
    s = export_parquet(wh_path, dest, progress=False)
    assert s.n_prompts == 4 and s.bytes > 0
    return dest


def test_layout_is_hive_partitioned_by_template(exported: Path) -> None:
    assert (exported / "manifest.json").is_file() and (exported / EXPORT_FILE).is_file()
    assert not exported.with_name("pq.partial").exists()
    for t in (0, 1):
        assert (exported / "resid" / f"template_index={t}" / "part-00000.parquet").is_file()
    assert (exported / "vocab" / "part-00000.parquet").is_file()
    meta = json.loads((exported / EXPORT_FILE).read_text())
    assert meta["views"]["resid"]["rows"] == 4 * 4 * 5  # prompts x boundaries x positions
    # the partition column lives in the path: the files of `prompts` do not repeat it
    import pyarrow.parquet as pq

    assert "template_index" not in pq.read_schema(exported / "prompts" / "template_index=0" / "part-00000.parquet").names
    vec = pq.read_schema(exported / "resid" / "template_index=0" / "part-00000.parquet").field("vec").type
    import pyarrow as pa

    assert isinstance(vec, pa.FixedSizeListType) and vec.list_size == 4 and vec.value_type == pa.float32()


def test_every_view_identical_on_both_forms(wh_path: Path, exported: Path) -> None:
    with Warehouse(wh_path) as a, Warehouse(exported) as b:
        for v in a.views():
            x, y = (_sorted(w.sql(f"SELECT * FROM {v.name}")) for w in (a, b))
            assert x.schema == y.schema, v.name
            assert x.equals(y), v.name
        # filters reach the Parquet scan and give the same rows
        q = "SELECT prompt, layer, position, vec FROM resid WHERE layer = 1 AND role = 4 ORDER BY prompt"
        assert a.sql(q).equals(b.sql(q)) and a.sql(q).height == 4


def test_every_analysis_identical_on_both_forms(wh_path: Path, exported: Path) -> None:
    with Warehouse(wh_path) as a, Warehouse(exported) as b:
        for an in list_analyses():
            if is_comparison(an):
                continue  # compare_* run on query.Comparison (tests/query/test_compare.py)
            x, y = a.run_analysis(an.name), b.run_analysis(an.name)
            # this hand-made warehouse has no patching, circuit or task-vector shards and no sink captures: those are empty on both
            assert x.height > 0 or an.name.startswith(("patching_", "sink_", "circuit_", "taskvec_")) or an.name == "massive_activations", an.name
            assert _sorted(x).equals(_sorted(y)), an.name


def test_refusals_are_one_line_and_write_nothing(wh_path: Path, exported: Path, tmp_path: Path) -> None:
    with pytest.raises(QueryError, match=r"already exists; the export writes a new directory"):
        export_parquet(wh_path, exported, progress=False)
    inside = wh_path / "pq"
    with pytest.raises(QueryError, match=r"^refusing to write the export .* inside the warehouse"):
        export_parquet(wh_path, inside, progress=False)
    assert not inside.exists() and not (wh_path / "pq.partial").exists()
    with pytest.raises(QueryError, match=r"is already a Parquet export"):
        export_parquet(exported, tmp_path / "again", progress=False)


def test_failed_export_leaves_nothing_and_a_stale_partial_is_replaced(tmp_path: Path) -> None:
    wh = tmp_path / "wh"
    build(wh)
    stale = tmp_path / "pq.partial"
    stale.mkdir()
    (stale / "junk").write_text("left by a killed export")
    good = export_parquet(wh, tmp_path / "pq", progress=False)
    assert not stale.exists() and not (Path(good.path) / "junk").exists()
    shard = wh / "prompts" / "p00003.h5"
    shard.write_bytes(shard.read_bytes()[:200])  # a broken shard: the export stops
    with pytest.raises(QueryError, match="p00003.h5"):
        export_parquet(wh, tmp_path / "pq2", progress=False)
    assert not (tmp_path / "pq2").exists() and not (tmp_path / "pq2.partial").exists()
    build(wh2 := tmp_path / "wh2")
    abl = wh2 / "ablation" / "p00003.h5"
    abl.write_bytes(abl.read_bytes()[:200])  # a broken ablation shard is named, not its prompt's shard
    with pytest.raises(QueryError, match=r"ablation/p00003\.h5"):
        export_parquet(wh2, tmp_path / "pq3", progress=False)
    assert not (tmp_path / "pq3").exists() and not (tmp_path / "pq3.partial").exists()


PLAIN = r"""
import json, sys
import duckdb, polars as pl
root = sys.argv[1]
con = duckdb.connect()
acc = con.execute(f'''
    SELECT template_index, count(*) AS n, avg(echo_correct::INT) AS echo_accuracy
    FROM read_parquet('{root}/prompts/*/*.parquet', hive_partitioning = true)
    GROUP BY ALL ORDER BY template_index''').fetchall()
vec = con.execute(f'''
    SELECT vec FROM read_parquet('{root}/resid/*/*.parquet', hive_partitioning = true)
    WHERE prompt = 3 AND boundary = 2 AND position = 0''').fetchone()[0]
pol = (pl.scan_parquet(f"{root}/prompts/*/*.parquet", hive_partitioning=True)
       .group_by("template_index").agg(pl.len().alias("n"), pl.col("echo_correct").cast(pl.Int32).mean())
       .sort("template_index").collect().rows())
n_resid = pl.scan_parquet(f"{root}/resid/**/*.parquet", hive_partitioning=True).select(pl.len()).collect().item()
mine = sorted(m for m in sys.modules if m.split(".")[0] in ("query", "store", "extract", "echowh", "reports"))
print(json.dumps({"duckdb": acc, "polars": pol, "vec": vec, "n_resid": n_resid, "project": mine}))
"""


def test_plain_duckdb_and_polars_read_the_export(wh_path: Path, exported: Path, arrays) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", "-c", PLAIN, str(exported)], capture_output=True, text=True,
                       env=env, cwd=exported)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["project"] == []  # read without the project
    with Warehouse(wh_path) as wh:
        want = wh.run_analysis("echo_behaviour").select("template_index", "n_prompts", "echo_accuracy").rows()
    assert [tuple(x) for x in out["duckdb"]] == [tuple(x) for x in want]
    assert [tuple(x) for x in out["polars"]] == [tuple(x) for x in want]
    np.testing.assert_array_equal(np.array(out["vec"], np.float32), arrays["resid"][3][2, 0])
    assert out["n_resid"] == len(PROMPTS) * 4 * 5


def test_cli_export_then_query_the_export(wh_path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    cli = [sys.executable, "-m", "echowh.cli"]
    dest = tmp_path / "pq"
    r = subprocess.run([*cli, "export", "-w", str(wh_path), "--parquet", str(dest), "-q"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"wrote {dest}: 4 prompts, {len(VIEWS)} views")
    r = subprocess.run([*cli, "query", "-w", str(dest), "-a", "emergence_layer", "--format", "csv"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r2 = subprocess.run([*cli, "query", "-w", str(wh_path), "-a", "emergence_layer", "--format", "csv"],
                        capture_output=True, text=True, env=env)
    assert r.stdout == r2.stdout and r.stdout.count("\n") == 5
    r = subprocess.run([*cli, "export", "-w", str(wh_path), "--parquet", str(dest)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"Error: {dest} already exists; the export writes a new directory (remove it or choose another)"]


PLAIN_VIEWS = r"""
import json, sys
import duckdb
root, jobs = sys.argv[1], json.loads(sys.stdin.read())
meta = json.load(open(f"{root}/export.json"))
con = duckdb.connect()
for name, v in meta["views"].items():  # each view over its files, typed as export.json says
    files = f"{root}/{name}/*/*.parquet" if v["partitioned"] else f"{root}/{name}/*.parquet"
    cols = ", ".join(f"{c}::FLOAT[{meta['d_model']}] AS {c}" if t == "FLOAT[D]" else f"{c}::{t} AS {c}"
                     for c, t in v["columns"])
    con.execute(f"CREATE VIEW {name} AS SELECT {cols} FROM read_parquet('{files}', hive_partitioning = true)")
out = {name: [list(row) for row in con.execute(sql, params or None).fetchall()] for name, sql, params in jobs}
assert not any(m.split(".")[0] in ("query", "store", "extract", "echowh") for m in sys.modules)
print(json.dumps(out))
"""


def test_every_analysis_runs_in_plain_duckdb_over_the_export(wh_path: Path, exported: Path) -> None:
    """The analyses' own SQL, run by DuckDB alone over read_parquet views, gives the same rows."""
    jobs = [(a.name, a.sql, a.bind({})) for a in list_analyses() if not is_comparison(a)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", "-c", PLAIN_VIEWS, str(exported)], input=json.dumps(jobs),
                       capture_output=True, text=True, env=env, cwd=exported)
    assert r.returncode == 0, r.stderr
    plain = json.loads(r.stdout)
    with Warehouse(wh_path) as wh:
        for name, _, _ in jobs:
            want = wh.run_analysis(name)
            got = pl.DataFrame(plain[name], schema=want.schema, orient="row") if plain[name] else want.clear()
            assert _sorted(want).equals(_sorted(got)), name
