"""One writer at a time, the SHA-256 ledger, and the environment record (store only)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import F, WarehouseError, WarehouseReader, WarehouseWriter
from store.ledger import Ledger, read_ledger, sha256_file
from store.lock import current_writer
from store.reader import load_manifest
from store.schema import LEDGER_NAME, LOCK_NAME
from store.verify import verify
from tests.store.guards import ledger_untouched
from tests.store.synthetic import build


def _manifest(env: dict | None = None) -> dict:
    m = {"fingerprint": "fp", "fingerprint_parts": {"model": "m"}, "config": {}}
    if env is not None:
        m["environments"] = [env]
    return m


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path: Path) -> None:
    root = tmp_path / "w"
    first = WarehouseWriter.create(root, _manifest(), resume=False)
    lock_before = (root / LOCK_NAME).read_bytes()
    t0 = time.monotonic()
    with pytest.raises(WarehouseError) as e:
        WarehouseWriter.create(root, _manifest(), resume=True)
    assert time.monotonic() - t0 < 5  # refused, not queued (a generous bound, not a benchmark)
    msg = str(e.value)
    assert msg.startswith(f"{root} is being written by another extraction (pid {os.getpid()} on ")
    assert "\n" not in msg
    assert (root / LOCK_NAME).read_bytes() == lock_before  # the refusal changed nothing
    holder = current_writer(root)
    assert holder is not None and holder.pid == os.getpid()
    with WarehouseReader(root) as r:  # readers never take the lock
        assert r.manifest["fingerprint"] == "fp"
    first.close()
    assert current_writer(root) is None and (root / LOCK_NAME).read_text() == ""
    WarehouseWriter.create(root, _manifest(), resume=True).close()


def test_a_killed_writer_releases_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "w"
    code = ("import sys, time; from pathlib import Path; from store import WarehouseWriter; "
            "w = WarehouseWriter.create(Path(sys.argv[1]), {'fingerprint': 'fp', 'fingerprint_parts': {}, "
            "'config': {}}, resume=False); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        holder = current_writer(root)
        assert holder is not None and holder.pid == proc.pid
        with pytest.raises(WarehouseError, match=f"pid {proc.pid} on "):
            WarehouseWriter.create(root, _manifest(), resume=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert current_writer(root) is None  # the kernel dropped the flock with the process
    WarehouseWriter.create(root, _manifest(), resume=True).close()


def test_ledger_survives_torn_lines_and_is_compacted_on_resume(tmp_path: Path) -> None:
    root = build(tmp_path / "w", ("cat", "dog"))
    entries = read_ledger(root)
    assert entries is not None and len(entries) == 5
    for rel, digest in entries.items():
        assert sha256_file(root / rel) == digest  # independent: hashlib over the final bytes
    ledger = Ledger(root)
    ledger.record(root / "prompts/p00009.h5", "0" * 64)  # appended, then killed before the rename
    with open(root / LEDGER_NAME, "a") as fh:
        fh.write("deadbeef  prompts/p000")  # killed mid-append: a torn line
    assert read_ledger(root) == {**entries, "prompts/p00009.h5": "0" * 64}
    m = WarehouseReader(root).manifest
    WarehouseWriter.create(root, {**m, "status": "running"}, resume=True).close()
    assert read_ledger(root) == entries  # one entry per existing file: `sha256sum -c` passes
    out = subprocess.run(["sha256sum", "-c", LEDGER_NAME], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_staged_shards_are_recorded_and_renamed_only_by_publish(tmp_path: Path, monkeypatch) -> None:
    """A Ray run's split: the actor's staging writer seals ``*.partial`` files and never touches
    the ledger or a shard's name; the driver's publish appends the entries, then renames."""
    root = build(tmp_path / "w", ("cat", "dog"))
    before = (root / LEDGER_NAME).read_bytes()
    actor = WarehouseWriter(root, staging=True)
    assert actor.ledger is None
    with ledger_untouched(root):
        for i in (5, 6):
            with actor.shard_writer(i) as s:
                s.put(F.INPUT_IDS, [1, 2, i])
    staged = actor.take_staged()
    assert [rel for rel, _ in staged] == ["prompts/p00005.h5", "prompts/p00006.h5"] and actor.take_staged() == []
    for rel, digest in staged:
        assert not (root / rel).exists() and sha256_file(root / f"{rel}.partial") == digest
    with pytest.raises(ValueError, match="cannot publish"):
        actor.publish(staged)

    driver = WarehouseWriter(root)
    events: list[object] = []
    record, replace = Ledger.record_many, os.replace
    monkeypatch.setattr(Ledger, "record_many",
                        lambda self, e: (events.append([Path(f).name for f, _ in e]), record(self, e))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(Path(b).name), replace(a, b))[1])
    assert driver.publish(staged) == ["prompts/p00005.h5", "prompts/p00006.h5"]
    monkeypatch.undo()
    assert events == [["p00005.h5", "p00006.h5"], "p00005.h5", "p00006.h5"]  # entries first, in one append
    assert (root / LEDGER_NAME).read_bytes() == before + "".join(f"{d}  {r}\n" for r, d in staged).encode()
    for rel, digest in staged:
        assert sha256_file(root / rel) == digest and not (root / f"{rel}.partial").exists()

    # a second copy of a finished shard is dropped, never published over it
    with actor.shard_writer(5) as s:
        s.put(F.INPUT_IDS, [9, 9])
    assert driver.publish(actor.take_staged()) == []
    assert sha256_file(root / staged[0][0]) == staged[0][1] and not (root / "prompts/p00005.h5.partial").exists()
    assert (root / LEDGER_NAME).read_bytes().count(b"p00005.h5") == 1
    # a sealed file the driver cannot see (a directory not shared), a path outside the warehouse
    with pytest.raises(WarehouseError, match=r"p00007.h5.partial: written by a worker but not visible here"):
        driver.publish([("prompts/p00007.h5", "0" * 64)])
    with pytest.raises(WarehouseError, match="not a file of this warehouse"):
        driver.publish([("../elsewhere.h5", "0" * 64)])
    # killed between sealing and publishing: a resume drops the partial, no entry was written
    with actor.shard_writer(7) as s:
        s.put(F.INPUT_IDS, [7])
    assert "partial write left by a killed run" in " ".join(verify(root).lines())
    m = load_manifest(root)  # (the reader refuses this warehouse: p00005/6 are not in its manifest)
    WarehouseWriter.create(root, {**m, "status": "running"}, resume=True).close()
    assert not list(root.rglob("*.partial")) and "prompts/p00007.h5" not in (read_ledger(root) or {})


def test_resume_in_another_environment(tmp_path: Path) -> None:
    root = tmp_path / "w"
    env = {"device": "cpu", "dtype": "float32", "torch": "2.5.0", "transformers": "4.50.0", "torch_threads": 2}
    WarehouseWriter.create(root, _manifest(env), resume=False).close()
    other = {**env, "device": "cuda", "torch": "2.6.0", "torch_threads": 8}
    with pytest.raises(WarehouseError) as e:
        WarehouseWriter.create(root, _manifest(other), resume=True)
    assert str(e.value) == (
        f"cannot resume {root}: the environment differs from the run that made it (device cpu -> cuda; "
        "torch 2.5.0 -> 2.6.0); numbers would mix environments: pass --allow-env-change to resume anyway "
        "(both environments are recorded)")
    WarehouseWriter.create(root, _manifest({**env, "torch_threads": 8}), resume=True).close()  # threads: recorded only
    w = WarehouseWriter.create(root, _manifest(other), resume=True, allow_env_change=True)
    w.close()
    assert [e["device"] for e in w.manifest["environments"]] == ["cpu", "cpu", "cuda"]
    assert WarehouseReader(root).manifest["environments"][-1] == other


def test_verify_reports_a_running_writer(tmp_path: Path) -> None:
    root = build(tmp_path / "w", ("cat",))
    m = WarehouseReader(root).manifest
    w = WarehouseWriter.create(root, {**m, "status": "running"}, resume=True)
    lines = verify(root).lines()
    assert len(lines) == 1 and lines[0].startswith(f"{root / LOCK_NAME}: an extraction is still writing")
    w.close()
