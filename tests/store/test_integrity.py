"""Readers check what `verify` checks (issue 19): damage made in code on the synthetic
warehouse gives a one-line error naming the file, from the reader, `query` and `verify`,
never a NULL, a skipped prompt or a wrong word."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from echowh.cli import main
from query import QueryError, Warehouse
from store import WarehouseError, WarehouseReader
from store.verify import verify
from tests.store.synthetic import build

WORDS = ("cat", "dog", "bird")


def _flip_header(path: Path, name: str, at: int = 20) -> None:
    """Flip one byte inside the object header of dataset ``name`` (checksummed metadata)."""
    with h5py.File(path, "r") as f:
        addr = h5py.h5o.get_info(f[name].id).addr
    b = bytearray(path.read_bytes())
    b[addr + at] ^= 0x5A
    path.write_bytes(bytes(b))


def _edit_manifest(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


def _one_line_error(root: Path, *argv: str) -> str:
    r = CliRunner().invoke(main, [argv[0], "-w", str(root), *argv[1:]])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    return r.output.strip()


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return build(tmp_path / "w", WORDS)


@pytest.mark.parametrize("name", ["final_logits", "final_scale"])
def test_a_damaged_object_header_is_an_error_not_null(root: Path, name: str) -> None:
    """Issue 19.1: `Group.get` turned the failed open into None, so target_logit read NULL."""
    shard = root / "prompts/p00001.h5"
    _flip_header(shard, name)
    with pytest.raises(QueryError) as e, Warehouse(root) as wh:
        wh.sql("SELECT prompt, target_logit, final_scale FROM prompts")
    msg = str(e.value)
    assert msg.startswith(f"{shard}: object {name} is damaged") and "\n" not in msg
    assert msg.endswith(f"`echowh verify -w {root}` lists every damaged file")
    line = _one_line_error(root, "query", "SELECT prompt, target_logit FROM prompts")
    assert line.startswith(f"Error: {shard}: object {name} is damaged")
    with WarehouseReader(root) as r, pytest.raises(WarehouseError, match="is damaged"):
        r.shard(1).get(name)  # get never hides a listed, damaged object as None
    assert any(ln.startswith(f"{shard}: ") for ln in verify(root).lines())


@pytest.mark.parametrize("rel", ["prompts/p00001.h5", "ablation/p00002.h5"])
def test_a_missing_shard_of_a_complete_warehouse_is_an_error(root: Path, rel: str) -> None:
    """Issue 19.2: a deleted shard was skipped and the analysis answered from the rest."""
    (root / rel).unlink()
    with pytest.raises(WarehouseError) as e:
        WarehouseReader(root)
    assert str(e.value).startswith(f"{root / rel}: missing (the manifest lists it)")
    line = _one_line_error(root, "query", "-a", "echo_behaviour")
    assert line.startswith(f"Error: {root / rel}: missing")
    assert f"{root / rel}: missing" in "\n".join(verify(root).lines())


def test_an_unfinished_warehouse_reads_what_is_there_and_says_what_is_missing(root: Path) -> None:
    (root / "prompts/p00002.h5").unlink()
    (root / "ablation/p00002.h5").unlink()
    _edit_manifest(root, lambda m: m.update(status="running"))
    with WarehouseReader(root) as r:
        assert r.missing == ["ablation/p00002.h5", "prompts/p00002.h5"]
        assert r.note is not None and "2 shard(s) not written yet" in r.note and "--resume" in r.note
    with Warehouse(root) as wh:
        assert sorted(wh.sql("SELECT prompt FROM prompts")["prompt"]) == [0, 1]
    r = CliRunner().invoke(main, ["query", "-w", str(root), "SELECT count(*) AS n FROM prompts"])
    assert r.exit_code == 0 and "not written yet" in r.output, r.output


@pytest.mark.parametrize("kind", ["extra", "foreign", "stray-folder"])
def test_an_extra_or_foreign_shard_is_an_error_naming_it(root: Path, tmp_path: Path, kind: str) -> None:
    if kind == "extra":
        bad = root / "prompts/p00009.h5"
        shutil.copy(root / "prompts/p00000.h5", bad)
    elif kind == "foreign":  # another warehouse's shard under a listed name: named on open
        other = build(tmp_path / "other", ("tree", "house", "lamp"), fingerprint="fp-b", seed=1)
        bad = root / "prompts/p00001.h5"
        shutil.copy(other / "prompts/p00001.h5", bad)
    else:
        bad = root / "patching/0-1/p00000.h5"
        bad.parent.mkdir(parents=True)
        shutil.copy(root / "prompts/p00000.h5", bad)
    with pytest.raises(QueryError) as e, Warehouse(root) as wh:
        wh.sql("SELECT count(*) FROM prompts")
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value)
    assert any(ln.startswith(f"{bad}: ") for ln in verify(root).lines())


@pytest.mark.parametrize(("edit", "says"), [
    (lambda m: m["prompts"][1].update(word="cow"), "word 'dog' in the shard, the manifest says 'cow' for prompt 1"),
    (lambda m: m["prompts"][2].update(template_index=1), "template_index 0 in the shard, the manifest says 1"),
    (lambda m: m["prompts"][0].update(n_tokens=9), "n_tokens 5, the manifest says 9 for prompt 0"),
    (lambda m: m.update(templates=["echo {word}"]), "template 'say {word}' in the shard"),
])
def test_a_manifest_that_disagrees_with_its_shards(root: Path, edit, says: str) -> None:
    """Issue 19.8: verify passed and queries showed the shard's word."""
    _edit_manifest(root, edit)
    lines = verify(root).lines()
    assert any(says in ln and "prompts/p0000" in ln for ln in lines), lines
    with pytest.raises(QueryError, match=says.replace("{", r"\{").replace("(", r"\(")), Warehouse(root) as wh:
        wh.sql("SELECT prompt, word, template_index FROM prompts")


@pytest.mark.parametrize(("edit", "says"), [
    (lambda m: m.update(words=["cat", "cow", "bird"]), "the word list ['cat', 'cow', 'bird'] is not the prompts' words"),
    (lambda m: m["fingerprint_parts"].update(words=["cat"]), "differs from the one the fingerprint was made from"),
    (lambda m: m.update(prompts={"0": "cat"}), "'prompts' is a dict, not a list"),
    (lambda m: m["prompts"].append("x"), "prompts[3] has no integer 'index'"),
    (lambda m: m["prompts"][0].update(index=1), "has index 1 (negative or repeated)"),
])
def test_a_malformed_manifest_is_one_line_everywhere(root: Path, edit, says: str) -> None:
    """Issue 19.6: a non-list `prompts` was a TypeError in verify, an AttributeError in query."""
    _edit_manifest(root, lambda m: m.update(words=list(WORDS)))
    _edit_manifest(root, edit)
    rep = verify(root)
    assert [ln.split(": ", 1)[0] for ln in rep.lines()] == [str(root / "manifest.json")], rep.lines()
    assert says in rep.lines()[0]
    assert says in _one_line_error(root, "query", "SELECT 1")
    r = CliRunner().invoke(main, ["verify", "-q", "-w", str(root)])
    assert r.exit_code == 1 and "Traceback" not in r.output and says in r.output


def test_the_hint_names_the_warehouse_for_the_model_file(tmp_path: Path) -> None:
    """Issue 19.7: the hint after damage to model.h5 named the warehouse's parent."""
    root = build(tmp_path / "dmg" / "X", WORDS)
    _flip_header(root / "model.h5", "vocab_text")
    line = _one_line_error(root, "query", "SELECT * FROM vocab")
    assert line.endswith(f"`echowh verify -w {root}` lists every damaged file"), line


def test_verify_passes_a_patching_warehouse_and_names_its_damage(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """Issue 19.3: verify said "patching: should be a directory" on every --patching warehouse."""
    from extract.config import ExtractConfig
    from extract.pipeline.run import extract

    out = tmp_path / "w"
    cfg = ExtractConfig(out=out, model=str(tiny_qwen2_dir), device="cpu", words=("cat", "dog"),
                        templates=("repeat the word {word}", "say the word {word}"), ablation=(),
                        patching=True, patch_pairs=((0, 1),), progress=False)
    assert not extract(cfg, log=lambda m: None).failed
    rep = verify(out)
    assert rep.ok, rep.lines()
    assert rep.files_checked == 1 + 4 + 2  # model, 4 prompts, 2 (pair, word) patching shards
    first = sorted((out / "patching/0-1").glob("*.h5"))[0]
    clean = first.read_bytes()
    with h5py.File(first, "r") as f:  # issue 19.7: the hint named W/patching, not W
        name = next(k for k in f if isinstance(f[k], h5py.Dataset) and f[k].chunks)
        at = f[name].id.get_chunk_info(0).byte_offset + 3
    b = bytearray(clean)
    b[at] ^= 0x5A
    first.write_bytes(bytes(b))
    line = _one_line_error(out, "query", "SELECT * FROM patching")
    assert line.startswith(f"Error: {first}: ") and line.endswith(f"`echowh verify -w {out}` lists every damaged file")
    first.write_bytes(clean)
    shard = sorted((out / "patching/0-1").glob("*.h5"))[1]
    shard.unlink()
    assert [ln.split(": ", 1) for ln in verify(out).lines()] == [[str(shard), "missing (the manifest lists this prompt)"]]
    line = _one_line_error(out, "query", "SELECT count(*) FROM patching")
    assert line.startswith(f"Error: {shard}: missing")


@pytest.mark.parametrize("damage", ["header", "missing", "word"])
def test_report_refuses_each_damage_in_one_line(root: Path, tmp_path: Path, damage: str) -> None:
    """Issue 19.1/2/8: `report` wrote a report from NULLs, from the remaining prompts, with the wrong word."""
    if damage == "header":
        _flip_header(root / "prompts/p00002.h5", "final_logits")
    elif damage == "missing":
        (root / "prompts/p00002.h5").unlink()
    else:
        _edit_manifest(root, lambda m: m["prompts"][2].update(word="fish"))
    out = tmp_path / "r.html"
    line = _one_line_error(root, "report", "-o", str(out))
    assert line.startswith(f"Error: {root}/prompts/p00002.h5: ") or line.startswith(f"Error: {root}/manifest.json: "), line
    assert not out.exists()


@pytest.mark.parametrize(("rel", "attr"), [("prompts/p00001.h5", "echo_correct"), ("prompts/p00002.h5", "target_id"),
                                           ("ablation/p00000.h5", "modes")])
def test_a_deleted_attribute_is_an_error_not_null(root: Path, rel: str, attr: str) -> None:
    """Damage the issue does not list: an attribute removed through h5py (the header checksum
    is rewritten, so only the ledger and this check see it) would read as NULL."""
    with h5py.File(root / rel, "a") as f:
        del f.attrs[attr]
    view = "ablation" if rel.startswith("ablation") else "prompts"
    with pytest.raises(QueryError) as e, Warehouse(root) as wh:
        wh.sql(f"SELECT * FROM {view}")
    assert str(e.value).startswith(f"{root / rel}: attribute {attr} missing"), str(e.value)
    assert any(ln.startswith(f"{root / rel}: attribute") for ln in verify(root).lines())
