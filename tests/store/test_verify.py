"""`verify` and the reader's refusals on damaged warehouses (store only, no model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from echowh.cli import main
from store import F, WarehouseError, WarehouseReader
from store.checks import FIELDS
from store.verify import verify
from tests.store.synthetic import build

WORDS = ("cat", "dog", "bird")


def _snapshot(root: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def _flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x5A
    path.write_bytes(bytes(b))


def _chunk_offset(path: Path, name: str) -> int:
    with h5py.File(path, "r") as f:
        return f[name].id.get_chunk_info(0).byte_offset


def _read_everything(root: Path) -> dict[str, object]:
    """Every dataset and attribute of every shard, through the reader (as a query would)."""
    out: dict[str, object] = {}
    with WarehouseReader(root) as r:
        for i in r.prompt_indices():
            out[f"{i}@"] = r.prompt_attrs(i)
            for fld in F.ALL:
                if r.has(fld, i):
                    out[f"{i}/{fld.name}"] = r.read(fld, i)
        for i in r.ablation_indices():
            f = r.shard(i, "ablation")
            for fld in FIELDS["ablation"]:
                if fld.name in f:
                    out[f"a{i}/{fld.name}"] = f[fld.name][()]
    return out


@pytest.fixture()
def damaged(tmp_path: Path) -> Path:
    """Three shards broken three ways: a flipped data byte, a truncation, a foreign shard."""
    root = build(tmp_path / "w", WORDS)
    other = build(tmp_path / "other", ("tree", "house", "lamp"), fingerprint="fp-b", seed=1)
    _flip(root / "prompts/p00000.h5", _chunk_offset(root / "prompts/p00000.h5", "resid") + 17)
    p1 = root / "prompts/p00001.h5"
    p1.write_bytes(p1.read_bytes()[: p1.stat().st_size * 2 // 3])
    shutil.copy(other / "prompts/p00002.h5", root / "prompts/p00002.h5")
    return root


def test_a_fresh_warehouse_verifies_clean(tmp_path: Path) -> None:
    root = build(tmp_path / "w", WORDS)
    rep = verify(root)
    assert rep.ok, rep.lines()
    assert rep.files_checked == 1 + 2 * len(WORDS)
    r = CliRunner().invoke(main, ["verify", "-q", "-w", str(root)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().startswith(f"{root}: ok (7 files")


def test_verify_names_every_damaged_file_and_changes_nothing(damaged: Path) -> None:
    (damaged / "prompts/p00007.h5").write_bytes(b"stale")  # a prompt the manifest does not list
    (damaged / "ablation/p00001.h5.partial").write_bytes(b"torn")
    (damaged / "notes.txt").write_text("mine")
    before = _snapshot(damaged)
    r = CliRunner().invoke(main, ["verify", "-q", "-w", str(damaged)])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    problems, summary = lines[:-1], lines[-1]
    assert all(ln.startswith(f"{damaged}/") for ln in problems), problems
    named = {ln.split(": ", 1)[0] for ln in problems}
    assert named == {str(damaged / p) for p in (
        "prompts/p00000.h5", "prompts/p00001.h5", "prompts/p00002.h5", "prompts/p00007.h5",
        "ablation/p00001.h5.partial", "notes.txt")}
    text = "\n".join(problems)
    assert "prompts/p00000.h5: dataset resid is damaged" in text  # Fletcher32
    assert "prompts/p00000.h5: content differs from what was written" in text  # SHA-256
    assert "prompts/p00001.h5: not a readable HDF5 file (Unable to synchronously open file (truncated file" in text
    assert "prompts/p00002.h5: fingerprint 'fp-b' is not this warehouse's 'fp-a'" in text
    assert "which the manifest does not list" in text and "partial write left by a killed run" in text
    assert summary.startswith(f"{damaged}: {len(problems)} problem(s) in ")
    assert _snapshot(damaged) == before  # bytes and mtimes: verify wrote nothing


@pytest.mark.parametrize(("shard", "message"), [
    ("prompts/p00000.h5", "prompts/p00000.h5: dataset resid is damaged (Can't synchronously read data "
                          "(filter returned failure during read))"),
    ("prompts/p00001.h5", "prompts/p00001.h5: not a readable HDF5 shard (Unable to synchronously open file "
                          "(truncated file"),
    ("prompts/p00002.h5", "prompts/p00002.h5: fingerprint 'fp-b' is not this warehouse's 'fp-a' "
                          "(a shard from another warehouse or run)"),
])
def test_reader_refuses_each_damaged_shard_in_one_line(damaged: Path, shard: str, message: str) -> None:
    i = int(shard[-8:-3])
    with WarehouseReader(damaged) as r, pytest.raises(WarehouseError) as e:
        r.read(F.RESID, i)
    assert str(e.value).startswith(str(damaged / shard) + ": ") and message in str(e.value)
    assert "\n" not in str(e.value) and "verify" in str(e.value)
    with WarehouseReader(damaged) as r:  # an undamaged dataset of an intact shard still reads
        if i == 0:
            assert r.read(F.DLA_MLP, 0).shape == (2,)


def test_reader_refuses_a_missing_dataset_and_a_wrong_shape(tmp_path: Path) -> None:
    root = build(tmp_path / "w", WORDS)
    with h5py.File(root / "prompts/p00001.h5", "a") as f:
        del f["dla_mlp"]
    with h5py.File(root / "prompts/p00002.h5", "a") as f:
        del f["dla_head"]
        f.create_dataset("dla_head", data=np.zeros((2, 4), np.float32))  # H is 3
    with WarehouseReader(root) as r:
        with pytest.raises(WarehouseError, match=r"p00001\.h5: dataset dla_mlp missing"):
            r.read(F.RESID, 1)
        with pytest.raises(WarehouseError, match=r"p00002\.h5: dla_head has shape \(2, 4\), expected \(2, 3\)"):
            r.read(F.DLA_HEAD, 2)
        assert r.read(F.DLA_HEAD, 0).shape == (2, 3)
    lines = verify(root).lines()
    assert any("p00001.h5: dataset dla_mlp missing" in ln for ln in lines)
    assert any("p00002.h5: dla_head has shape (2, 4)" in ln for ln in lines)


def test_a_flipped_byte_never_gives_a_wrong_number(tmp_path: Path) -> None:
    """Flip one byte at a time across a whole shard: every read either returns exactly the
    original values or raises a one-line WarehouseError (never another exception)."""
    root = build(tmp_path / "w", ("cat",), ablation=False)
    shard = root / "prompts/p00000.h5"
    clean_bytes = shard.read_bytes()
    reference = _read_everything(root)
    outcomes = {"refused": 0, "same": 0}
    for offset in range(0, len(clean_bytes), 11):
        b = bytearray(clean_bytes)
        b[offset] ^= 0xFF
        shard.write_bytes(bytes(b))
        try:
            got = _read_everything(root)
        except WarehouseError as e:
            assert "\n" not in str(e) and str(shard) in str(e)
            outcomes["refused"] += 1
            continue
        assert got.keys() == reference.keys(), offset
        for k, v in reference.items():
            if isinstance(v, dict):
                assert got[k] == v, (offset, k)
            else:
                np.testing.assert_array_equal(got[k], v, err_msg=f"offset {offset}: {k}")
        outcomes["same"] += 1
    shard.write_bytes(clean_bytes)
    assert outcomes["refused"] > 0.5 * (outcomes["refused"] + outcomes["same"]), outcomes


@pytest.mark.parametrize("argv", [
    ["query", "SELECT count(*) FROM resid"],
    ["query", "SELECT count(*) FROM prompts"],
    ["report", "-o", "{tmp}/r.html"],
])
def test_query_and_report_fail_in_one_line_naming_the_file(damaged: Path, tmp_path: Path, argv: list[str]) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    r = CliRunner().invoke(main, [argv[0], "-w", str(damaged), *argv[1:]])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert any(lines[0].startswith(f"Error: {damaged}/prompts/p0000{i}.h5: ") for i in range(3)), lines[0]
