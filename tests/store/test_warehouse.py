"""The store on its own (numpy + h5py, no model): atomic shards, resume rules, dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from store import SCHEMA_VERSION, F, ShardWriter, WarehouseError, WarehouseReader, WarehouseWriter
from store.schema import MANIFEST_NAME, PROMPTS_DIR


def _manifest(fp: str = "fp1", **parts) -> dict:
    return {"fingerprint": fp, "fingerprint_parts": {"model": "m", **parts}, "config": {}}


def _shard(w: WarehouseWriter, i: int, resid: np.ndarray | None = None) -> None:
    with w.shard_writer(i) as s:
        s.put(F.RESID, np.ones((2, 3, 4), np.float32) if resid is None else resid)


def test_a_shard_has_its_final_name_only_when_complete(tmp_path: Path) -> None:
    w = WarehouseWriter.create(tmp_path / "w", _manifest(), resume=False)
    final = tmp_path / "w" / PROMPTS_DIR / "p00000.h5"
    with pytest.raises(RuntimeError), w.shard_writer(0) as s:
        s.put(F.RESID, np.ones((2, 3, 4), np.float32))
        assert (final.parent / "p00000.h5.partial").exists() and not final.exists()
        raise RuntimeError("killed mid-write")
    assert not final.exists() and not list(final.parent.iterdir())  # nothing half-written left
    _shard(w, 0)
    assert final.exists() and w.done() == {0}


def test_resume_drops_stale_partials_and_keeps_the_record(tmp_path: Path) -> None:
    root = tmp_path / "w"
    w = WarehouseWriter.create(root, _manifest(), resume=False)
    _shard(w, 0)
    w.write_manifest(timings={"total_s": 5.0}, warnings=["p00000.h5:resid stored as float32"])
    (root / PROMPTS_DIR / "p00001.h5.partial").write_bytes(b"torn")
    w.close()
    w2 = WarehouseWriter.create(root, _manifest(), resume=True)
    assert not list(root.rglob("*.partial"))
    assert w2.done() == {0}
    assert w2.manifest["timings"] == {"total_s": 5.0}
    assert w2.manifest["warnings"] == ["p00000.h5:resid stored as float32"]


def test_refusals_leave_everything_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "w"
    WarehouseWriter.create(root, _manifest(words=["cat"]), resume=False).close()
    before = (root / MANIFEST_NAME).read_bytes()
    with pytest.raises(WarehouseError, match="already holds a warehouse; pass --resume"):
        WarehouseWriter.create(root, _manifest(words=["cat"]), resume=False)
    with pytest.raises(WarehouseError, match=r"cannot resume .*: it was made with a different words;"):
        WarehouseWriter.create(root, _manifest("fp2", words=["dog"]), resume=True)
    assert (root / MANIFEST_NAME).read_bytes() == before
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(WarehouseError, match="exists and is not an echo-warehouse"):
        WarehouseWriter.create(foreign, _manifest(), resume=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["todo.txt"]


def test_reader_refuses_other_schema_versions_and_foreign_manifests(tmp_path: Path) -> None:
    root = tmp_path / "w"
    WarehouseWriter.create(root, _manifest(), resume=False)
    m = json.loads((root / MANIFEST_NAME).read_text())
    (root / MANIFEST_NAME).write_text(json.dumps({**m, "schema_version": SCHEMA_VERSION - 1}))
    with pytest.raises(WarehouseError, match=f"has schema version {SCHEMA_VERSION - 1}, this tool reads {SCHEMA_VERSION}"):
        WarehouseReader(root)
    (root / MANIFEST_NAME).write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(WarehouseError, match="is not an echo-warehouse"):
        WarehouseReader(root)


def test_bfloat16_keeps_float32_range_and_reads_back_as_float32(tmp_path: Path) -> None:
    x = np.array([[[1.0, -3.5e5, 1e30, 2.0 ** -100]]], np.float32)  # beyond float16 both ways
    w = ShardWriter(tmp_path / "b.h5", "bfloat16")
    w.put(F.RESID, x)
    w.commit()
    with h5py.File(tmp_path / "b.h5", "r") as f:
        ds = f["resid"]
        assert ds.id.get_type().get_size() == 2
        np.testing.assert_allclose(ds[()], x, rtol=2 ** -8)  # 8 bits of mantissa, full exponent


def test_float16_falls_back_per_dataset_instead_of_inf(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "h.h5", "float16")
    big = np.array([[[1.0, 7e4]], [[2.0, -1e6]]], np.float32)
    w.put(F.RESID, big)
    w.put(F.ATTN_OUT, np.ones((1, 1, 2), np.float32))
    w.commit()
    with h5py.File(tmp_path / "h.h5", "r") as f:
        assert f["resid"].dtype == np.float32 and f["resid"].attrs["float16_overflow_fallback"]
        np.testing.assert_array_equal(f["resid"][()], big)
        assert f["attn_out"].dtype == np.float16
    assert w.warnings == ["h.h5:resid has |x| up to 1e+06 > 65504; stored as float32 instead of float16"]


def test_wrong_rank_is_refused(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "x.h5")
    with pytest.raises(ValueError, match=r"resid: expected axes \('B', 'T', 'D'\), got shape \(3, 4\)"):
        w.put(F.RESID, np.ones((3, 4), np.float32))
    w.abort()
    assert not list(tmp_path.iterdir())
