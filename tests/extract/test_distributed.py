"""Extraction on a real local Ray cluster (ray.init on this machine's CPUs; no mocks).

A Ray run is compared with the local run shard for shard, bit for bit: the same batches and
ablation groups are cut from the whole prompt set and the torch thread count is the same (one
thread per actor, one in the local run). An actor process killed with SIGKILL mid-run is
restarted by Ray and its task retried: the warehouse still ends complete and identical.

The SHA-256 ledger is written by the driver alone: an actor seals its shards as ``*.partial``
and returns their digests; the driver appends the entries, then renames (store.ledger). Every
Ray-written warehouse here has exactly one ledger line per file, each the file's SHA-256, and
passes ``echowh verify``; the actor's code path, run in this process, never opens the ledger.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extract.config import ExtractConfig
from extract.pipeline.run import extract, load, stages_for
from extract.stages.ablation.grid import grid_groups
from extract.stages.base import Job
from extract.stages.capture.stage import batches
from store.ledger import Ledger, sha256_file
from store.schema import ABLATION_DIR, LEDGER_NAME, PROMPTS_DIR, prompt_shard_name
from store.verify import verify
from store.warehouse import WarehouseWriter
from tests.store.guards import ledger_untouched

ray = pytest.importorskip("ray", reason="Ray is an optional extra; scripts/setup.sh installs it")

from extract.executors.ray_pool import RayConfig, RayError, RayExecutor, Worker  # noqa: E402

WORDS = ("cat", "dog", "extraordinarily", "blue")  # x 2 templates = 8 prompts, 4+ batches of 2


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    # Ray runs workers at nice 15 by default: on a machine shared with other jobs they would
    # starve; the local run they are compared with runs at nice 0.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    yield
    ray.shutdown()


def _cfg(model: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(out=out, model=str(model), words=WORDS, ablation=("zero", "mean"), ablate_layers=(0, 2),
                batch_size=2, progress=False, device="cpu")
    return ExtractConfig(**{**base, **kw})


def extract_ray(cfg: ExtractConfig, rc: RayConfig, log=print, on_result=None):
    return extract(cfg, RayExecutor(rc, on_result=on_result), log=log)


def _local(cfg: ExtractConfig):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors run one thread each: same BLAS reductions
    try:
        return extract(cfg, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_run(tiny_qwen2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "w"
    assert not _local(_cfg(tiny_qwen2_dir, out)).failed
    return out


def _contents(path: Path) -> dict[str, object]:
    """Every dataset and attribute of one shard, by name."""
    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        for k, v in f.attrs.items():
            out[f"@{k}"] = v
        for k in f:
            if isinstance(f[k], h5py.Dataset):
                out[k] = f[k][()]
    return out


def assert_same_shards(a: Path, b: Path) -> int:
    """The two warehouses hold the same shards with bit-identical contents; returns the count."""
    n = 0
    folders = sorted({p.parent.relative_to(a).as_posix() for p in a.rglob("*.h5")} - {"."})
    assert folders == sorted({p.parent.relative_to(b).as_posix() for p in b.rglob("*.h5")} - {"."})
    for sub in folders:
        names_a = sorted(p.name for p in (a / sub).glob("*.h5"))
        names_b = sorted(p.name for p in (b / sub).glob("*.h5"))
        assert names_a == names_b, sub
        for name in names_a:
            ca, cb = _contents(a / sub / name), _contents(b / sub / name)
            assert ca.keys() == cb.keys(), name
            for k in ca:
                va, vb = np.asarray(ca[k]), np.asarray(cb[k])
                assert va.dtype == vb.dtype and va.shape == vb.shape, (name, k)
                same = va.tolist() == vb.tolist() if va.dtype.kind == "O" else va.tobytes() == vb.tobytes()
                assert same, f"{sub}/{name}:{k} differs"
            n += 1
    assert not list(b.rglob("*.partial"))
    return n


def assert_ledger_exact(root: Path) -> None:
    """One ledger line per file under a final name (no duplicates, no strays), each that file's
    SHA-256 computed here; and `echowh verify` passes."""
    lines = (root / LEDGER_NAME).read_text().splitlines()
    entries = [line.split("  ", 1) for line in lines]
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.h5"))
    assert sorted(rel for _, rel in entries) == files
    for digest, rel in entries:
        assert sha256_file(root / rel) == digest, rel
    report = verify(root)
    assert report.ok, report.lines()


def test_ray_run_equals_local_run_shard_for_shard(cluster, local_run, tiny_qwen2_dir, tmp_path):
    out = tmp_path / "ray"
    summary = extract_ray(_cfg(tiny_qwen2_dir, out), RayConfig(workers=2), log=lambda m: None)
    assert not summary.failed and summary.n_extracted == 8
    assert assert_same_shards(local_run, out) == 16  # 8 prompt + 8 ablation shards
    m = json.loads((out / "manifest.json").read_text())
    local = json.loads((local_run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["fingerprint"] == local["fingerprint"]
    assert m["validation"].keys() == local["validation"].keys()
    # where each group ran: every prompt once per phase, on a recorded node/actor/host/process
    for phase in ("extract", "ablation"):
        recs = [r for r in m["placement"] if r["phase"] == phase]
        assert sorted(i for r in recs for i in r["prompts"]) == list(range(8))
        for r in recs:
            assert r["node_id"] and r["actor_id"] and r["hostname"] and r["pid"] > 0
    assert len({r["actor_id"] for r in m["placement"]}) == 2  # both actors got work
    assert m["ray"]["workers"] == 2 and m["ray"]["cpus_per_worker"] == 1
    # written by the driver: every shard the actors sealed has its one entry (and model.h5)
    assert_ledger_exact(out)
    assert len((out / LEDGER_NAME).read_text().splitlines()) == 17
    assert all("staged" not in r for r in m["placement"])  # digests go to the ledger, not the manifest


def test_actor_killed_mid_run_still_gives_a_complete_identical_warehouse(cluster, local_run, tiny_qwen2_dir,
                                                                          tmp_path):
    out = tmp_path / "killed"
    killed: dict[str, object] = {}

    def kill_first(r: dict) -> None:
        # The pool hands this actor its next batch as soon as it reports: kill it while it works.
        if not killed:
            killed.update(pid=r["pid"], actor=r["actor_id"])
            os.kill(r["pid"], signal.SIGKILL)

    summary = extract_ray(_cfg(tiny_qwen2_dir, out), RayConfig(workers=2), log=lambda m: None,
                          on_result=kill_first)
    assert killed and not summary.failed
    assert assert_same_shards(local_run, out) == 16
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    # Ray restarted the killed actor (same actor id, a new process) and it finished work
    restarted = [r for r in m["placement"] if r["actor_id"] == killed["actor"] and r["pid"] != killed["pid"]]
    assert restarted, "the killed actor never came back"
    # every shard written once: the dead attempt's sealed files were never published (the
    # retry rewrote them), so each shard is in the one result the driver published it from
    extracted = [i for r in m["placement"] if r["phase"] == "extract" for i in r["written"]]
    assert sorted(extracted) == list(range(8))
    # and has one ledger entry, appended by the driver
    assert_ledger_exact(out)
    assert len((out / LEDGER_NAME).read_text().splitlines()) == 17


def _drop(out: Path, keep: int) -> None:
    """Remove all but the first ``keep`` shards of each folder: a run stopped part-way."""
    for sub in (PROMPTS_DIR, ABLATION_DIR):
        for p in sorted((out / sub).glob("*.h5"))[keep:]:
            p.unlink()


def test_resume_across_modes(cluster, local_run, tiny_qwen2_dir, tmp_path):
    # started on Ray, finished locally
    a = tmp_path / "ray_then_local"
    extract_ray(_cfg(tiny_qwen2_dir, a), RayConfig(workers=1), log=lambda m: None)
    _drop(a, 3)
    s = _local(_cfg(tiny_qwen2_dir, a, resume=True))
    assert (s.n_extracted, s.n_skipped) == (5, 3) and not s.failed
    assert assert_same_shards(local_run, a) == 16
    m = json.loads((a / "manifest.json").read_text())
    assert m["placement"] and m["timings"]["sessions"] == 2  # the Ray session's record is kept
    assert_ledger_exact(a)
    # started locally, finished on Ray
    b = tmp_path / "local_then_ray"
    _local(_cfg(tiny_qwen2_dir, b))
    _drop(b, 5)
    s = extract_ray(_cfg(tiny_qwen2_dir, b, resume=True), RayConfig(workers=2), log=lambda m: None)
    assert (s.n_extracted, s.n_skipped) == (3, 5) and not s.failed
    assert assert_same_shards(local_run, b) == 16
    m = json.loads((b / "manifest.json").read_text())
    assert sorted(i for r in m["placement"] for i in r["written"] if r["phase"] == "extract") == [5, 6, 7]
    assert_ledger_exact(b)


def _remove(out: Path, rels: list[str]) -> None:
    """Shards lost to a run stopped part-way, and the ledger compacted as a resume's start does."""
    for rel in rels:
        (out / rel).unlink()
    Ledger(out).compact()


def test_the_actor_seals_and_only_the_driver_records_and_renames(cluster, local_run, tiny_qwen2_dir, tmp_path):
    """The actor's code path (Worker, in this process so that it can be watched) opens no ledger
    and names no shard; a kill before the driver publishes loses nothing a resume does not redo;
    the driver's publish gives the local run's warehouse, verified."""
    out = tmp_path / "w"
    shutil.copytree(local_run, out)
    fp = json.loads((out / "manifest.json").read_text())["fingerprint"]
    threads = torch.get_num_threads()
    try:
        cfg = _cfg(tiny_qwen2_dir, out)
        worker = Worker(lambda: load(cfg, fp), 1, stages_for(cfg))  # sets this process's torch threads to 1
        batch = [p.index for p in batches(worker.prompts, 2)[0]]
        group = [p.index for p in grid_groups(worker.prompts)[0]]
        lost = [f"{PROMPTS_DIR}/{prompt_shard_name(i)}" for i in batch]
        lost_abl = [f"{ABLATION_DIR}/{prompt_shard_name(i)}" for i in group]

        # killed after the actor sealed, before the driver published: partials, no entries
        _remove(out, lost)
        with ledger_untouched(out):
            r = worker.run(Job("extract", tuple(batch), tuple(batch), len(batch)))
        assert sorted(rel for rel, _ in r["staged"]) == sorted(lost) and r["written"] == sorted(batch)
        for rel, digest in r["staged"]:
            assert not (out / rel).exists() and sha256_file(out / f"{rel}.partial") == digest
        problems = {(p.path, p.message.split(" (")[0]) for p in verify(out).problems}
        assert problems >= {(rel, "missing") for rel in lost} | {(f"{rel}.partial", "a partial write left by a killed run")
                                                                 for rel in lost}
        s = _local(_cfg(tiny_qwen2_dir, out, resume=True))  # the resume drops the partials, redoes the batch
        assert s.n_extracted == len(batch) and not s.failed
        assert assert_same_shards(local_run, out) == 16
        assert_ledger_exact(out)

        # the normal course: the actor seals, the driver publishes (extraction, then ablation)
        _remove(out, lost + lost_abl)
        m = json.loads((out / "manifest.json").read_text())  # as during a (resumed) run: readers accept
        (out / "manifest.json").write_text(json.dumps({**m, "status": "running"}))  # missing shards then
        driver = WarehouseWriter(out)
        with ledger_untouched(out):
            r = worker.run(Job("extract", tuple(batch), tuple(batch), len(batch)))
        assert sorted(driver.publish(r["staged"])) == sorted(lost)
        with ledger_untouched(out):
            r = worker.run(Job("ablation", tuple(group), tuple(group), len(group)))
        assert sorted(rel for rel, _ in r["staged"]) == sorted(lost_abl) and r["written"] == sorted(group)
        assert sorted(driver.publish(r["staged"])) == sorted(lost_abl)
        (out / "manifest.json").write_text(json.dumps(m))  # the run completes: every shard is back
    finally:
        torch.set_num_threads(threads)
    assert assert_same_shards(local_run, out) == 16
    assert_ledger_exact(out)


def test_bad_settings_are_one_line_errors(tiny_qwen2_dir, tmp_path):
    with pytest.raises(RayError, match="--workers and --cpus-per-worker must be >= 1"):
        extract_ray(_cfg(tiny_qwen2_dir, tmp_path / "w"), RayConfig(workers=0))
    assert not (tmp_path / "w").exists()


def test_cli_without_ray_installed_is_one_line(tmp_path):
    # Ray hidden from this interpreter (sys.modules entry None makes `import ray` fail)
    code = ("import sys; sys.modules['ray'] = None; from echowh.cli import main; "
            "sys.argv = ['echowh', 'extract', '--ray', '--out', sys.argv[1]]; main()")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "Error: --ray needs Ray, an optional extra: pip install 'echo-warehouse[ray]' (or pip install 'ray==2.*')"]
    assert not (tmp_path / "w").exists()


def test_cli_worker_options_need_ray(tmp_path):
    from click.testing import CliRunner

    from echowh.cli import main

    r = CliRunner().invoke(main, ["extract", "--workers", "2", "--out", str(tmp_path / "w")])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (
        "Error: --workers, --gpus-per-worker and --cpus-per-worker need --ray")
    assert not (tmp_path / "w").exists()


def test_unreachable_cluster_is_one_line_before_any_work(tiny_qwen2_dir, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RayError, match=rf"^cannot reach the Ray cluster at 127.0.0.1:{port}: "):
        extract_ray(_cfg(tiny_qwen2_dir, tmp_path / "w"), RayConfig(address=f"127.0.0.1:{port}"))
    with pytest.raises(RayError, match=r"give auto, HOST:PORT or ray://HOST:PORT"):
        extract_ray(_cfg(tiny_qwen2_dir, tmp_path / "w"), RayConfig(address="nowhere"))
    assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def local_patching(tiny_qwen2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local_patching") / "w"
    assert not _local(_cfg(tiny_qwen2_dir, out, ablation=("zero",), patching=True)).failed
    return out


def test_patching_on_ray_with_a_killed_actor_equals_local_and_resumes_across(cluster, local_patching,
                                                                            tiny_qwen2_dir, tmp_path):
    """--patching --ray: the same shards as the local run, bit for bit, with an actor killed while
    it patches; then a run stopped part-way in every stage is finished by the other executor."""
    out = tmp_path / "ray"
    killed: dict[str, object] = {}

    def kill_while_patching(r: dict) -> None:
        if r["phase"] == "patching" and not killed:  # this actor now works on the next pair
            killed.update(pid=r["pid"], actor=r["actor_id"])
            os.kill(r["pid"], signal.SIGKILL)

    cfg = _cfg(tiny_qwen2_dir, out, ablation=("zero",), patching=True)
    summary = extract_ray(cfg, RayConfig(workers=2), log=lambda m: None, on_result=kill_while_patching)
    assert killed and not summary.failed
    assert assert_same_shards(local_patching, out) == 8 + 8 + 4  # prompts, ablation, 4 words x pair 0-1
    m = json.loads((out / "manifest.json").read_text())
    pairs = [r for r in m["placement"] if r["phase"] == "patching"]
    assert sorted(i for r in pairs for i in r["written"]) == [0, 1, 2, 3]  # each pair published once
    assert any(r["actor_id"] == killed["actor"] and r["pid"] != killed["pid"] for r in m["placement"])
    assert_ledger_exact(out)
    for first, then in (("ray", "local"), ("local", "ray")):
        w = tmp_path / f"{first}_then_{then}"
        shutil.copytree(local_patching if first == "local" else out, w)
        stopped = [p for sub in (PROMPTS_DIR, ABLATION_DIR, "patching/0-1")
                   for p in sorted((w / sub).glob("*.h5"))[2:]]
        _remove(w, [p.relative_to(w).as_posix() for p in stopped])
        c = _cfg(tiny_qwen2_dir, w, ablation=("zero",), patching=True, resume=True)
        s = _local(c) if then == "local" else extract_ray(c, RayConfig(workers=2), log=lambda m: None)
        assert (s.n_extracted, s.n_skipped) == (6, 2) and not s.failed
        assert s.timings["patching_pairs"] == 2 and s.timings["ablation_prompts"] == 6
        assert assert_same_shards(local_patching, w) == 20
        assert_ledger_exact(w)
