"""A Parquet export is verifiable (issue 19.4): a ledger written before it is published, page
checksums, `verify -w EXPORT`, and `query -w EXPORT` refusing a damaged file in one line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import query.export
from echowh.cli import main
from query import QueryError, Warehouse
from query.export import export_parquet
from query.export_read import EXPORT_LEDGER, verify_export
from store.ledger import read_ledger, sha256_file

SUM = "SELECT sum(list_sum(vec)) AS s FROM resid"


@pytest.fixture(scope="module")
def clean(wh_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("export") / "pq"
    export_parquet(wh_path, dest, progress=False)
    return dest


@pytest.fixture()
def copy(clean: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "pq"))


def _a_resid_file(root: Path) -> Path:
    return sorted((root / "resid").rglob("*.parquet"))[0]


def _flip_in_data(path: Path) -> None:
    """Flip one byte inside the first data page of the vec column (not the footer)."""
    md = pq.ParquetFile(path).metadata
    col = next(md.row_group(0).column(i) for i in range(md.num_columns)
               if md.row_group(0).column(i).path_in_schema.startswith("vec"))
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    at = start + col.total_compressed_size // 2
    b = bytearray(path.read_bytes())
    b[at] ^= 0x01
    path.write_bytes(bytes(b))


def test_the_ledger_lists_every_file_and_pages_carry_checksums(clean: Path) -> None:
    ledger = read_ledger(clean, EXPORT_LEDGER)
    files = {p.relative_to(clean).as_posix() for p in clean.rglob("*") if p.is_file()} - {EXPORT_LEDGER}
    assert ledger is not None and set(ledger) == files
    assert all(sha256_file(clean / rel) == digest for rel, digest in ledger.items())
    rep = verify_export(clean)
    assert rep.ok, rep.lines()
    r = CliRunner().invoke(main, ["verify", "-q", "-w", str(clean)])
    assert r.exit_code == 0 and r.output.strip().startswith(f"{clean}: ok ("), r.output


def test_the_ledger_is_written_before_the_export_is_published(wh_path: Path, tmp_path: Path, monkeypatch) -> None:
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((Path(src) / EXPORT_LEDGER).is_file())
        return real(src, dst)

    monkeypatch.setattr(query.export.os, "replace", spy)
    export_parquet(wh_path, tmp_path / "e", progress=False)
    assert seen == [True]


def test_a_flipped_byte_in_a_resid_file_is_refused_in_one_line(clean: Path, copy: Path) -> None:
    """The issue's damage: the clean answer vs 2.6e38 from a flipped byte, rc 0."""
    with Warehouse(clean) as wh:
        good = wh.sql(SUM)["s"][0]
    bad = _a_resid_file(copy)
    _flip_in_data(bad)
    with pytest.raises(QueryError) as e, Warehouse(copy) as wh:
        wh.sql(SUM)
    assert str(e.value).startswith(f"{bad}: content differs from what was exported") and "\n" not in str(e.value)
    r = CliRunner().invoke(main, ["query", "-w", str(copy), SUM])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and str(bad) in r.output, r.output
    with Warehouse(copy) as wh:  # views whose files are intact still answer
        assert wh.sql("SELECT count(*) AS n FROM prompts")["n"][0] == 4
    lines = verify_export(copy).lines()
    assert [ln.split(": ", 1)[0] for ln in lines] == [str(bad), str(bad)], lines
    assert "content differs" in lines[0] and "unreadable Parquet" in lines[1]  # the page CRC, too
    r = CliRunner().invoke(main, ["verify", "-q", "-w", str(copy)])
    assert r.exit_code == 1 and f"{bad}: content differs" in r.output
    with Warehouse(copy, check_export=False) as wh:  # the opt-out: no hashing, as before
        unchecked = wh.sql(SUM)["s"][0]
    assert not np.isclose(unchecked, good)  # which is exactly why the check is on by default
    r = CliRunner().invoke(main, ["query", "-w", str(copy), "--no-check-export", "--format", "csv", SUM])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("damage", ["missing file", "extra file", "no ledger", "export.json"])
def test_other_damage_is_refused_on_open(copy: Path, damage: str) -> None:
    if damage == "missing file":
        named = _a_resid_file(copy)
        named.unlink()
    elif damage == "extra file":
        named = copy / "resid" / "stray.parquet"
        shutil.copy(_a_resid_file(copy), named)
    elif damage == "no ledger":
        named = copy / EXPORT_LEDGER
        named.unlink()
    else:
        named = copy / "export.json"
        named.write_text(named.read_text().replace('"d_model": 4', '"d_model": 5'))
    with pytest.raises(QueryError) as e:
        Warehouse(copy)
    assert str(e.value).startswith(f"{named}") and "\n" not in str(e.value), str(e.value)
    assert any(ln.startswith(str(named)) for ln in verify_export(copy).lines())


def test_output_hard_linked_to_an_export_file_is_refused(clean: Path, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in clean.rglob("*") if p.is_file()}
    out = tmp_path / "x.json"
    os.link(clean / "manifest.json", out)
    r = CliRunner().invoke(main, ["query", "-w", str(clean), "--format", "json", "-o", str(out), "SELECT 1 AS x"])
    assert r.exit_code == 1 and r.output.startswith("Error: refusing to write"), r.output
    assert {p: p.read_bytes() for p in clean.rglob("*") if p.is_file()} == before
