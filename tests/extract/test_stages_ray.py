"""Circuits and task vectors on a real local Ray cluster: the same shards as the local run, bit
for bit, with an actor killed mid-stage (Ray restarts it and retries its job)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.extract.test_distributed import (  # noqa: F401  (cluster: a module fixture)
    _cfg,
    _local,
    assert_ledger_exact,
    assert_same_shards,
    cluster,
    extract_ray,
)

ray = pytest.importorskip("ray", reason="Ray is an optional extra; scripts/setup.sh installs it")

from extract.executors.ray_pool import RayConfig  # noqa: E402

WORDS = ("cat", "dog", "sun", "red", "hat")  # train cat sun hat; held out dog red
KW = dict(words=WORDS, ablation=(), circuits=("word",), circuit_methods=("eap",), task_vectors=True,
          tv_demos=2, tv_coefficients=(0.0, 1.0))


@pytest.fixture(scope="module")
def local_stages(tiny_qwen2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local_stages") / "w"
    assert not _local(_cfg(tiny_qwen2_dir, out, **KW)).failed
    return out


@pytest.mark.usefixtures("cluster")
def test_circuits_and_taskvec_on_ray_with_a_killed_actor_equal_local(local_stages, tiny_qwen2_dir, tmp_path):
    out = tmp_path / "ray"
    killed: dict[str, object] = {}

    def kill_in_stages(r: dict) -> None:
        if r["phase"] in ("circuits_word", "taskvec_aie") and not killed:
            killed.update(pid=r["pid"], actor=r["actor_id"])
            os.kill(r["pid"], signal.SIGKILL)

    summary = extract_ray(_cfg(tiny_qwen2_dir, out, **KW), RayConfig(workers=2), log=lambda m: None,
                          on_result=kill_in_stages)
    assert killed and not summary.failed
    n_word_pairs = len(json.loads((out / "manifest.json").read_text())["circuits"]["word"]["pairs"])
    # prompts, the graph and the word pairs, 2 AIE + vectors.h5 + 2 interventions
    assert assert_same_shards(local_stages, out) == 10 + 1 + n_word_pairs + 5
    assert_ledger_exact(out)
