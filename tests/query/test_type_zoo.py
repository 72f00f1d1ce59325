"""`echowh query` over DuckDB's type zoo in every output format (issue 19.6): exit 0 with
output, or exit 1 with exactly one line; never a traceback."""

from __future__ import annotations

import random

import pytest
from click.testing import CliRunner

from echowh.cli import main

# (name, SQL expression of one value; {i} is the row number, so rows differ)
ZOO = [
    ("union", "(CASE WHEN {i} % 2 = 0 THEN ({i})::INT::UNION(a INT, b VARCHAR) ELSE 'x'::UNION(a INT, b VARCHAR) END)"),
    ("map", "MAP {{'a': {i}, 'b': 2}}"),
    ("struct", "{{'x': {i}, 'y': [1.5, NULL], 'z': {{'w': 'deep'}}}}"),
    ("nested_list", "[[{i}, 2], [], NULL, [3]]"),
    ("enum", "('lo' || '')::ENUM('lo', 'hi')"),
    ("interval", "INTERVAL ({i}) DAY + INTERVAL 3 MONTH"),
    ("blob", "'\\xAA\\x00ab'::BLOB"),
    ("hugeint", "(170141183460469231731687303715884105727 - {i})::HUGEINT"),
    ("uhugeint", "340282366920938463463374607431768211455::UHUGEINT"),
    ("bit", "'10110'::BIT"),
    ("timetz", "'12:34:56+05:30'::TIMETZ"),
    ("timestamptz", "'2026-01-02 03:04:05+00'::TIMESTAMPTZ"),
    ("uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::UUID"),
    ("decimal", "123.456::DECIMAL(18, 3)"),
    ("array", "[1.0, 2.0, {i}]::FLOAT[3]"),
    ("list_of_union", "[1::UNION(a INT, b VARCHAR)]"),
    ("map_of_lists", "MAP {{'k': [{i}, NULL]}}"),
    ("null", "NULL"),
    ("varchar_nul", "'a' || chr(0) || 'b'"),
    ("json", "'{{\"a\": 1}}'::JSON"),
]
FORMATS = ("table", "csv", "json", "parquet")


def _check(r, out=None) -> None:
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    if r.exit_code == 0:
        assert r.stdout or (out is not None and out.stat().st_size > 0)
    else:
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert r.output.startswith("Error: ")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("name", "expr"), ZOO, ids=[n for n, _ in ZOO])
def test_each_type_in_each_format(wh_path, tmp_path, name: str, expr: str, fmt: str) -> None:
    out = tmp_path / "out" if fmt == "parquet" else None
    args = ["query", "-w", str(wh_path), "--format", fmt, *(["-o", str(out)] if out else []),
            f"SELECT {expr.format(i='range')} AS {name} FROM range(3)"]
    r = CliRunner().invoke(main, args)
    _check(r, out)
    assert r.exit_code == 0, r.output  # every type in the zoo is written, as text where need be


@pytest.mark.parametrize("seed", range(12))
def test_random_mixtures_of_types(wh_path, tmp_path, seed: int) -> None:
    """Seeded random rows of 1-4 zoo columns, 0-3 rows, some from the views, in a random format."""
    rng = random.Random(seed)
    picks = rng.sample(ZOO, rng.randint(1, 4))
    cols = ", ".join(f"{e.format(i='p.prompt')} AS c{k}_{n}" for k, (n, e) in enumerate(picks))
    sql = f"SELECT p.word, {cols} FROM prompts p WHERE p.prompt < {rng.randint(0, 3)}"
    fmt = rng.choice(FORMATS)
    out = tmp_path / "out" if fmt == "parquet" else None
    r = CliRunner().invoke(main, ["query", "-w", str(wh_path), "--format", fmt,
                                  *(["-o", str(out)] if out else []), sql])
    _check(r, out)
