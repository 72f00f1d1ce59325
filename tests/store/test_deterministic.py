"""Deterministic bytes (issue 19.9): the same shards written twice, at different times, or by
a run interrupted during ablation and resumed, are byte-identical files with identical
ledger hashes (no HDF5 object-header timestamps, attributes in a fixed order)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import store.warehouse
from store import F, ShardWriter
from store.ledger import read_ledger, sha256_file
from store.verify import verify
from tests.store.synthetic import build


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.h5"))}


def test_the_same_shards_written_at_different_times_are_the_same_bytes(tmp_path: Path) -> None:
    a = build(tmp_path / "a", ("cat", "dog"))
    time.sleep(1.1)  # HDF5 object-header times have a resolution of one second
    b = build(tmp_path / "b", ("cat", "dog"))
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys() and len(fa) == 5
    for rel in fa:
        assert fa[rel] == fb[rel], f"{rel} differs in {sum(x != y for x, y in zip(fa[rel], fb[rel], strict=False))} bytes"
    assert read_ledger(a) == read_ledger(b)
    assert (a / "shards.sha256").read_bytes() == (b / "shards.sha256").read_bytes()


def test_attribute_order_does_not_change_the_bytes(tmp_path: Path) -> None:
    for name, order in (("x.h5", ["word", "n_tokens", "flag"]), ("y.h5", ["flag", "word", "n_tokens"])):
        values = {"word": "cat", "n_tokens": 5, "flag": True}
        with ShardWriter(tmp_path / name) as s:
            s.put(F.DLA_MLP, np.arange(3, dtype=np.float32))
            for k in order:
                s.attrs({k: values[k]})
    assert sha256_file(tmp_path / "x.h5") == sha256_file(tmp_path / "y.h5")


@pytest.mark.parametrize("store_dtype", ["bfloat16"])
def test_a_committed_type_carries_no_timestamp(tmp_path: Path, store_dtype: str) -> None:
    paths = []
    for n in range(2):
        paths.append(tmp_path / f"s{n}.h5")
        with ShardWriter(paths[-1], store_dtype) as s:
            s.put(F.RESID, np.ones((2, 3, 4), np.float32))
        time.sleep(1.1 if n == 0 else 0)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_a_run_interrupted_during_ablation_then_resumed_has_the_straight_runs_bytes(
        tiny_qwen2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.config import ExtractConfig
    from extract.pipeline.run import extract

    def cfg(out: Path, resume: bool = False) -> ExtractConfig:
        return ExtractConfig(out=out, model=str(tiny_qwen2_dir), device="cpu", words=("cat", "dog", "tree"),
                             ablation=("zero",), ablate_layers=(1,), progress=False, resume=resume)

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert not extract(cfg(straight), log=lambda m: None).failed
    time.sleep(1.1)
    # interrupt the second run after its second ablation shard (the prompts are all written)
    real = store.warehouse.WarehouseWriter.shard_writer
    calls = {"ablation": 0}

    def interrupting(self, index, subdir="prompts", *args, **kwargs):
        if subdir == "ablation":
            calls["ablation"] += 1
            if calls["ablation"] == 3:
                raise KeyboardInterrupt
        return real(self, index, subdir, *args, **kwargs)

    monkeypatch.setattr(store.warehouse.WarehouseWriter, "shard_writer", interrupting)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg(cut), log=lambda m: None)
    monkeypatch.setattr(store.warehouse.WarehouseWriter, "shard_writer", real)
    assert len(list((cut / "ablation").glob("*.h5"))) == 2
    time.sleep(1.1)
    assert not extract(cfg(cut, resume=True), log=lambda m: None).failed
    fs, fc = _files(straight), _files(cut)
    assert fs.keys() == fc.keys() and len(fs) == 1 + 2 * 6
    assert [rel for rel in fs if fs[rel] != fc[rel]] == []
    assert read_ledger(straight) == read_ledger(cut)
    assert verify(cut).ok, verify(cut).lines()
