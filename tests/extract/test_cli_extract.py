"""`echowh extract` from the outside: bad input gives one clear line and a non-zero exit and
damages nothing; a run killed with SIGKILL resumes to exactly the tensors of a clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from echowh.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, ["extract", "--quiet", "--ablation", "none", *args])


def _words(tmp_path: Path, text: str, name: str = "words.txt") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    return lines[-1]


def test_missing_word_file(tmp_path):
    r = _run("--words", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "w"))
    assert r.exit_code != 0
    assert _error_line(r) == f"Error: word file {tmp_path / 'nope.txt'} does not exist"
    assert not (tmp_path / "w").exists()


def test_empty_word_file(tmp_path):
    f = _words(tmp_path, "# only a comment\n\n")
    r = _run("--words", f, "--out", str(tmp_path / "w"))
    assert r.exit_code == 1
    assert _error_line(r) == f"Error: {f} holds no words (one word per line)"


def test_duplicate_words(tmp_path):
    f = _words(tmp_path, "cat\ndog\ncat\n")
    r = _run("--words", f, "--out", str(tmp_path / "w"))
    assert r.exit_code == 1
    assert _error_line(r) == f"Error: {f} repeats cat; each word must appear once"


def test_malformed_word_line(tmp_path):
    f = _words(tmp_path, "cat\nhot dog\n")
    r = _run("--words", f, "--out", str(tmp_path / "w"))
    assert r.exit_code == 1
    assert _error_line(r) == f"Error: {f}:2: 'hot dog' is not a single word (one word per line)"


def test_template_without_word(tiny_qwen2_dir, tmp_path):
    r = _run("--model", str(tiny_qwen2_dir), "--template", "repeat after me", "--out", str(tmp_path / "w"))
    assert r.exit_code == 1
    assert _error_line(r) == "Error: template 'repeat after me' must contain {word} exactly once"
    assert not (tmp_path / "w").exists()


def test_unknown_model_type(tmp_path):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(d)
    r = _run("--model", str(d), "--out", str(tmp_path / "w"))
    assert r.exit_code == 1
    assert _error_line(r) == ("Error: model type 'gpt2' is not supported; supported types: "
                              "llama, qwen2, qwen3, mistral, phi3, gemma2, gemma3_text")


@pytest.mark.parametrize(("layers", "code", "line"), [
    ("3,99", 1, "Error: --ablate-layers 3,99 is outside this model's layers 0-2"),
    ("2-1", 2, "Error: Invalid value for '--ablate-layers': 2-1: the range starts after it ends (write 1-2)"),
    ("x", 2, "Error: Invalid value for '--ablate-layers': use all, or 0-based layer numbers like 20,21,22 or 18-25"),
])
def test_bad_ablate_layers_before_any_work(tiny_qwen2_dir, tmp_path, layers: str, code: int, line: str):
    out = tmp_path / "w"
    r = _run("--model", str(tiny_qwen2_dir), "--words", _words(tmp_path, "cat\n"), "--out", str(out),
             "--ablation", "zero", "--ablate-layers", layers)
    assert r.exit_code == code, r.output
    assert _error_line(r) == line
    assert "Traceback" not in r.output and not out.exists()


def test_unknown_model_name(tmp_path):
    r = _run("--model", "no-such-model", "--out", str(tmp_path / "w"))
    assert r.exit_code == 1
    assert _error_line(r) == (
        "Error: unknown model 'no-such-model': pass a hub id (org/name), a local model folder, "
        "or smollm2-135m-instruct, gemma3-270m"
    )


def test_refuses_foreign_directory(tiny_qwen2_dir, tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    r = _run("--model", str(tiny_qwen2_dir), "--words", _words(tmp_path, "cat\n"), "--out", str(d))
    assert r.exit_code == 1
    assert _error_line(r) == (
        f"Error: {d} exists and is not an echo-warehouse (no manifest.json); "
        "choose an empty or new --out directory"
    )
    assert (d / "notes.txt").read_text() == "mine" and len(list(d.iterdir())) == 1


def test_existing_warehouse_and_resume_with_another_model(tiny_qwen2_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "w"
    words = _words(tmp_path, "cat\ndog\n")
    r = _run("--model", str(tiny_qwen2_dir), "--words", words, "--out", str(out))
    assert r.exit_code == 0, r.output
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    r = _run("--model", str(tiny_qwen2_dir), "--words", words, "--out", str(out))
    assert r.exit_code == 1
    assert _error_line(r) == (
        f"Error: {out} already holds a warehouse; pass --resume to continue it, "
        "or choose a new --out directory"
    )
    r = _run("--model", str(tiny_llama_dir), "--words", words, "--out", str(out), "--resume")
    assert r.exit_code == 1
    assert _error_line(r).startswith(f"Error: cannot resume {out}: it was made with a different ")
    assert "model" in _error_line(r)
    r = _run("--model", str(tiny_qwen2_dir), "--words", _words(tmp_path, "cat\nbird\n", "other.txt"), "--out", str(out), "--resume")
    assert r.exit_code == 1 and "words" in _error_line(r)
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before  # nothing damaged

    r = _run("--model", str(tiny_qwen2_dir), "--words", words, "--out", str(out), "--resume")
    assert r.exit_code == 0, r.output
    assert "4 prompts (0 extracted, 4 already stored)" in r.output


def test_every_command_has_help():
    from echowh.cli import COMMANDS

    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for name in COMMANDS:
        assert name in top.output
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert "Usage:" in r.output
        # every option explains itself: no option is listed without a help text
        cmd = main.get_command(None, name)
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"echowh {name} {param.opts[0]} has no help"
                assert param.opts[-1] in r.output, (name, param.opts)


def _tensors(root: Path) -> dict[str, np.ndarray]:
    out = {}
    for sub in ("prompts", "ablation"):
        for p in sorted((root / sub).glob("*.h5")):
            with h5py.File(p, "r") as f:
                for k in f:
                    if isinstance(f[k], h5py.Dataset):
                        out[f"{sub}/{p.name}/{k}"] = f[k][()]
                for k, v in f.attrs.items():
                    out[f"{sub}/{p.name}@{k}"] = v
    return out


@pytest.mark.slow
def test_kill_minus_nine_then_resume_gives_identical_tensors(tiny_qwen2_dir, tmp_path):
    words = _words(tmp_path, "\n".join(f"w{i}" for i in range(30)) + "\n")
    args = [sys.executable, "-m", "echowh.cli", "extract", "--quiet", "--model", str(tiny_qwen2_dir),
            "--words", words, "--batch-size", "1", "--ablation", "zero", "--ablate-layers", "0-1"]
    clean = tmp_path / "clean"
    subprocess.run([*args, "--out", str(clean)], check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "prompts").glob("*.h5"))) < 10:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted((killed / "prompts").glob("*.h5"))
    assert 10 <= len(finished) < 60, "the run was not killed mid-way"
    mtimes = {p: p.stat().st_mtime_ns for p in finished}
    for p in killed.rglob("*.h5"):  # every complete-named file opens: no torn shards
        h5py.File(p, "r").close()

    r = subprocess.run([*args, "--out", str(killed), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming {killed}: {len(finished)} of 60 prompts already stored" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in finished} == mtimes  # finished work not redone
    assert not list(killed.rglob("*.partial"))

    a, b = _tensors(clean), _tensors(killed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    m = json.loads((killed / "manifest.json").read_text())
    assert m["status"] == "complete"


def test_resume_recomputes_only_missing_shards_bit_for_bit(tiny_qwen2_dir, tmp_path):
    """A run stopped during extraction or the ablation grid (shards missing, a stale .partial)
    resumes to exactly the clean run's numbers at the default batch size, mean ablation
    included: batches and groups are cut from the whole prompt set, means from every prompt."""
    words = _words(tmp_path, "cat\ndog\nhouse\ntree\n")
    args = ["extract", "--quiet", "--model", str(tiny_qwen2_dir), "--words", words,
            "--ablation", "zero,mean", "--ablate-layers", "1,2"]
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    for out in (clean, cut):
        r = CliRunner().invoke(main, [*args, "--out", str(out)])
        assert r.exit_code == 0, r.output
    kept = {p: p.stat().st_mtime_ns for p in (cut / "ablation").glob("*.h5")}
    kept.update({p: p.stat().st_mtime_ns for p in (cut / "prompts").glob("*.h5")})
    for name in ("ablation/p00001.h5", "ablation/p00006.h5", "prompts/p00002.h5", "ablation/p00002.h5"):
        (cut / name).unlink()
        kept.pop(cut / name)
    (cut / "ablation" / "p00006.h5.partial").write_bytes(b"torn")
    (cut / "prompts" / "p00002.h5.partial").write_bytes(b"torn")
    r = CliRunner().invoke(main, [*args, "--out", str(cut), "--resume"])
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output and "7 of 8 prompts already stored" in r.output
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished shards untouched
    assert not list(cut.rglob("*.partial"))
    a, b = _tensors(clean), _tensors(cut)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the record of the run keeps both sessions: the resume adds its time, it does not replace
    t = json.loads((cut / "manifest.json").read_text())["timings"]
    assert t["sessions"] == 2 and len(t["runs"]) == 2
    assert t["total_s"] == pytest.approx(sum(r["total_s"] for r in t["runs"]), abs=1e-3)
    assert [r["extract_prompts"] for r in t["runs"]] == [8, 1] and t["extract_prompts"] == 9


def test_failing_invariant_exits_non_zero(tiny_qwen2_dir, tmp_path, monkeypatch):
    """A tolerance no float computation meets: the run says so loudly and exits 1."""
    import store.schema

    monkeypatch.setitem(store.schema.TOLERANCE, "float32", 0.0)
    out = tmp_path / "w"
    r = _run("--model", str(tiny_qwen2_dir), "--words", _words(tmp_path, "cat\n"), "--out", str(out))
    assert r.exit_code == 1
    assert "FAIL (2 prompts)" in r.output
    assert _error_line(r).startswith("Error: validation FAILED for ")
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed-validation"


def test_ablation_engine_drift_fails_the_run(tiny_qwen2_dir, tmp_path, monkeypatch):
    """Every run checks the ablation engine against the model (removing nothing == the model's
    logits): a bug in the engine's forward is caught on real data, not only by the tests."""
    import extract.stages.ablation.grid

    real = extract.stages.ablation.grid._logits
    monkeypatch.setattr(extract.stages.ablation.grid, "_logits", lambda ad, h: real(ad, h) + 0.01)  # a subtle bug
    out = tmp_path / "w"
    r = _run("--model", str(tiny_qwen2_dir), "--words", _words(tmp_path, "cat\n"), "--out", str(out),
             "--ablation", "zero", "--ablate-layers", "0")
    assert r.exit_code == 1
    assert _error_line(r) == (f"Error: validation FAILED for ablation_clean_is_model: see the table above; "
                              f"the warehouse at {out} is kept for inspection")
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed-validation"
    assert m["validation"]["ablation_clean_is_model"]["failed_prompts"] == [0, 1]
    assert all(v["passed"] for k, v in m["validation"].items() if k != "ablation_clean_is_model")


def _hub_cache_with(model_dir: Path, root: Path, repo: str, commit: str = "0123456789abcdef") -> Path:
    """A Hugging Face hub cache (models--org--name/snapshots/<commit>) holding ``model_dir``."""
    import shutil

    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    shutil.copytree(model_dir, snap)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return root


@pytest.mark.slow
def test_hub_id_loads_from_the_local_cache_offline(tiny_qwen2_dir, tmp_path):
    """`--model org/name` (how Qwen/Qwen2.5-1.5B-Instruct is given) from the HF cache, no network;
    a hub id missing from the cache with HF_HUB_OFFLINE set fails at once with what to do."""
    cache = _hub_cache_with(tiny_qwen2_dir, tmp_path / "hub", "Qwen/Tiny-Test")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "echowh.cli", "extract", "--quiet", "--ablation", "none",
            "--words", _words(tmp_path, "cat\n")]
    r = subprocess.run([*base, "--model", "Qwen/Tiny-Test", "--out", str(tmp_path / "w")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert m["model"]["model"] == "Qwen/Tiny-Test" and m["model"]["source"] == "hub"
    assert m["model"]["revision"] == "0123456789abcdef" and m["model"]["model_type"] == "qwen2"
    assert m["status"] == "complete"

    r = subprocess.run([*base, "--model", "Qwen/Not-Cached", "--out", str(tmp_path / "w2")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "Error: 'Qwen/Not-Cached' is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it "
        "where there is network (`hf download Qwen/Not-Cached`) or pass a local model folder")
    assert not (tmp_path / "w2").exists()


def _stderr_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_resume_refused_when_weights_change_in_place(tiny_qwen2_dir, tmp_path):
    """Retrained weights of the same shape are another model: the revision hashes contents."""
    import shutil

    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2_dir, model)
    out, words = tmp_path / "w", _words(tmp_path, "cat\n")
    r = _run("--model", str(model), "--words", words, "--out", str(out))
    assert r.exit_code == 0, r.output
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3  # same names, shapes and file size
    size = weights.stat().st_size
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    r = _run("--model", str(model), "--words", words, "--out", str(out), "--resume")
    assert r.exit_code == 1
    assert _error_line(r) == (f"Error: cannot resume {out}: it was made with a different model_revision; "
                              "use a new --out directory or the original settings")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_resume_in_another_environment_is_refused_unless_allowed(tiny_qwen2_dir, tmp_path, monkeypatch):
    import extract.pipeline.manifest

    out, words = tmp_path / "w", _words(tmp_path, "cat\n")
    args = ("--model", str(tiny_qwen2_dir), "--words", words, "--out", str(out))
    r = _run(*args)
    assert r.exit_code == 0, r.output
    (out / "prompts" / "p00001.h5").unlink()  # something left to do
    real = extract.pipeline.manifest.library_versions
    monkeypatch.setattr(extract.pipeline.manifest, "library_versions", lambda: {**real(), "torch": "9.9.9"})
    r = _run(*args, "--resume")
    assert r.exit_code == 1
    torch_now = real()["torch"]
    assert _error_line(r) == (
        f"Error: cannot resume {out}: the environment differs from the run that made it (torch {torch_now} "
        "-> 9.9.9); numbers would mix environments: pass --allow-env-change to resume anyway "
        "(both environments are recorded)")
    assert not (out / "prompts" / "p00001.h5").exists()
    r = _run(*args, "--resume", "--allow-env-change")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert [e["torch"] for e in m["environments"]] == [torch_now, "9.9.9"]
    for e in m["environments"]:
        assert e["device"] == "cpu" and e["dtype"] == "float32" and e["torch_threads"] >= 1
    assert m["timings"]["sessions"] == 2


def test_a_second_concurrent_writer_is_refused_in_one_line(tiny_qwen2_dir, tmp_path):
    """Two real `echowh extract` processes on one --out: the second is refused at once naming
    the first, which finishes intact (verify passes). The first is paused (SIGSTOP) while it
    holds the lock, so the test does not depend on how fast either process runs."""
    out = tmp_path / "w"
    words = _words(tmp_path, "\n".join(f"w{i}" for i in range(6)) + "\n")
    args = [sys.executable, "-m", "echowh.cli", "extract", "--quiet", "--model", str(tiny_qwen2_dir),
            "--words", words, "--batch-size", "1", "--ablation", "zero", "--out", str(out)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((out / "prompts").glob("*.h5")) and first.poll() is None:
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # mid-run, holding the lock
        assert first.poll() is None and list((out / "prompts").glob("*.h5")), "the first run did not start writing"
        for extra in ([], ["--resume"]):
            second = subprocess.run([*args, *extra], capture_output=True, text=True, timeout=300)
            assert second.returncode == 1
            lines = _stderr_lines(second.stderr)
            assert len(lines) == 1, second.stderr
            assert lines[0].startswith(f"Error: {out} is being written by another extraction (pid {first.pid} on ")
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert "Traceback" not in err
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert len(list((out / "prompts").glob("*.h5"))) == 12
    r = CliRunner().invoke(main, ["verify", "-q", "-w", str(out)])
    assert r.exit_code == 0, r.output


def test_verify_and_readers_on_a_damaged_real_warehouse(tiny_qwen2_dir, tmp_path):
    """A flipped byte, a truncated shard and a shard from a warehouse made with other words:
    verify names all three, the reader refuses each in one line naming the file."""
    import shutil

    from store import WarehouseError, WarehouseReader
    from store.schema import F

    out, other = tmp_path / "w", tmp_path / "other"
    base = ("--model", str(tiny_qwen2_dir), "--ablation", "zero", "--ablate-layers", "0")
    for o, text in ((out, "cat\ndog\n"), (other, "tree\nlamp\n")):
        r = _run(*base, "--words", _words(tmp_path, text, f"{o.name}.txt"), "--out", str(o))
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["verify", "-q", "-w", str(out)])
    assert r.exit_code == 0, r.output
    p0, p1, p2 = (out / "prompts" / f"p0000{i}.h5" for i in range(3))
    with h5py.File(p0, "r") as f:
        offset = f["attn_pattern"].id.get_chunk_info(0).byte_offset + 5
    data = bytearray(p0.read_bytes())
    data[offset] ^= 0x01
    p0.write_bytes(bytes(data))
    p1.write_bytes(p1.read_bytes()[:4096])
    shutil.copy(other / "prompts" / "p00002.h5", p2)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    r = CliRunner().invoke(main, ["verify", "-q", "-w", str(out)])
    assert r.exit_code == 1
    named = {ln.split(": ", 1)[0] for ln in r.output.splitlines()[:-1]}
    assert named == {str(p0), str(p1), str(p2)}, r.output
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before
    for i, p in enumerate((p0, p1, p2)):
        with WarehouseReader(out) as wr, pytest.raises(WarehouseError) as e:
            wr.read(F.ATTN_PATTERN, i)
        assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)
