"""`echowh query` / `echowh analyses` through CliRunner: exit codes and exact error text."""

from __future__ import annotations

import json
import os

import polars as pl
import pytest
from click.testing import CliRunner

from echowh.cli import main

VIEWS_LINE = ("views: prompts, tokens, generations, logit_lens, lens_topk, dla, ablation, ablation_topk, "
              "validation, manifest, models, heads, vocab, emergence, resid, attn_out, mlp_out, head_out, head_out_all, "
              "attention, patching, patching_pairs, patching_positions, patching_validation, head_norms, resid_top, "
              "lens_first, attention_norm, first_token_share, circuit_pairs, circuit_graph, circuit_nodes, "
              "circuit_scores, circuit_edges, circuit_faithfulness, circuit_summary, circuit_exact, "
              "circuit_validation, taskvec_interventions, taskvec_clean, taskvec_aie, taskvec_vectors, "
              "taskvec_split, taskvec_validation")


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("cmd", [["query"], ["analyses"], []])
def test_help(cmd: list[str]) -> None:
    r = run(*cmd, "--help")
    assert r.exit_code == 0
    assert "Usage:" in r.output


def test_sql_table_csv_json(wh_path) -> None:
    r = run("query", "-w", str(wh_path), "SELECT prompt, word FROM prompts ORDER BY prompt")
    assert r.exit_code == 0 and "cat" in r.output and "shape: (4, 2)" in r.output
    r = run("query", "-w", str(wh_path), "--format", "csv", "SELECT prompt, word FROM prompts ORDER BY prompt")
    assert r.output == "prompt,word\n0,cat\n1,cat\n2,dog\n3,dog\n"
    r = run("query", "-w", str(wh_path), "--format", "json", "SELECT prompt FROM prompts WHERE prompt < 2")
    assert json.loads(r.output) == [{"prompt": 0}, {"prompt": 1}]


def test_vectors_in_csv(wh_path) -> None:
    r = run("query", "-w", str(wh_path), "--format", "csv", "SELECT vec FROM resid WHERE layer = 0 AND position = 0 AND prompt = 0")
    assert r.exit_code == 0
    assert r.output.startswith('vec\n"[') and r.output.count("\n") == 2


def test_analysis_with_params_to_parquet(wh_path, tmp_path) -> None:
    out = tmp_path / "dla.parquet"
    r = run("query", "-w", str(wh_path), "-a", "head_dla", "-p", "layer=0", "--format", "parquet", "-o", str(out))
    assert r.exit_code == 0
    assert pl.read_parquet(out).height == 12


def test_analyses_lists_names_descriptions_and_params() -> None:
    r = run("analyses")
    assert r.exit_code == 0
    assert "\nhead_dla\n" in r.output
    assert ("    -p layer=<INTEGER>  default NULL: block index; NULL = each prompt's emergence layer (prompts "
            "with no emergence block, NULL or -1, are left out: give a layer to include every prompt)\n") in r.output
    assert "    -p mode=<zero|mean>  default 'zero': ablation mode\n" in r.output


@pytest.mark.parametrize(("args", "code", "text"), [
    (["SELEC 1"], 1, 'Error: Parser Error: syntax error at or near "SELEC"'),
    (["SELECT * FROM nosuch"], 1, "Error: Catalog Error: Table with name nosuch does not exist!\n" + VIEWS_LINE),
    (["DROP VIEW prompts"], 1, "Error: refused: DROP statements are not allowed; the warehouse is read-only"),
    (["-a", "head_dl"], 1, "Error: no analysis named 'head_dl'; did you mean 'head_dla'? (`echowh analyses` lists them)"),
    (["-a", "head_dla", "-p", "layer=x"], 1, "Error: parameter layer takes INTEGER, got 'x'"),
    (["-a", "head_dla", "-p", "nolayer"], 2, "Error: -p takes key=value, got 'nolayer'"),
    (["-p", "layer=1", "SELECT 1"], 2, "Error: -p only applies to -a NAME"),
    ([], 2, "Error: give SQL or -a NAME (`echowh analyses` lists the names)"),
    (["SELECT 1", "-a", "head_dla"], 2, "Error: give SQL or -a NAME, not both"),
    (["--format", "parquet", "SELECT 1"], 2, "Error: --format parquet needs -o FILE"),
])
def test_errors(wh_path, args: list[str], code: int, text: str) -> None:
    r = run("query", "-w", str(wh_path), *args)
    assert r.exit_code == code, r.output
    assert text in r.output
    assert "Traceback" not in r.output


def test_bad_sql_lists_views(wh_path) -> None:
    r = run("query", "-w", str(wh_path), "SELEC 1")
    assert r.output.rstrip("\n").endswith(VIEWS_LINE)


def test_missing_and_foreign_warehouse(tmp_path) -> None:
    r = run("query", "-w", str(tmp_path / "nope"), "SELECT 1")
    assert r.exit_code == 1
    assert r.output == f"Error: no warehouse at {tmp_path / 'nope'}; run `echowh extract --out {tmp_path / 'nope'}` first\n"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("hi")
    r = run("query", "-w", str(tmp_path / "other"), "SELECT 1")
    assert r.exit_code == 1
    assert "is not an echo-warehouse (no manifest.json)" in r.output


@pytest.mark.parametrize("target", ["manifest.json", "prompts/p00000.h5", "notes.csv"])
def test_output_inside_the_warehouse_is_refused(wh_path, target: str) -> None:
    before = {p: p.read_bytes() for p in wh_path.rglob("*") if p.is_file()}
    out = wh_path / target
    r = run("query", "-w", str(wh_path), "--format", "json", "-o", str(out), "SELECT 1 AS x")
    assert r.exit_code == 1
    assert r.output == (f"Error: refusing to write {out} inside the warehouse {wh_path} (warehouses are "
                        "read-only after extraction); choose an -o outside it\n")
    assert {p: p.read_bytes() for p in wh_path.rglob("*") if p.is_file()} == before


def test_unwritable_output_is_a_one_line_error(wh_path, tmp_path) -> None:
    out = tmp_path / "no" / "such" / "dir.csv"
    r = run("query", "-w", str(wh_path), "--format", "csv", "-o", str(out), "SELECT 1 AS x")
    assert r.exit_code == 1
    assert r.output == f"Error: cannot write {out}: No such file or directory\n"


def test_an_empty_analysis_says_so(wh_no_ablation) -> None:
    r = CliRunner().invoke(main, ["query", "-w", str(wh_no_ablation), "-a", "head_ablation", "--format", "csv"])
    assert r.exit_code == 0
    assert r.stderr == ("note: no rows; the warehouse may not hold what the parameters ask for (its ablation "
                        "modes and layers are in the manifest's config)\n")
    assert r.stdout.startswith("prompt,word,")


@pytest.mark.parametrize("how", ["hard link", "symlink", "dot-dot"])
def test_output_that_resolves_into_the_warehouse_is_refused(wh_path, tmp_path, how: str) -> None:
    """Issue 19.5: `ln W/manifest.json /tmp/x; query -o /tmp/x` replaced the manifest."""
    before = {p: p.read_bytes() for p in wh_path.rglob("*") if p.is_file()}
    target = wh_path / "manifest.json"
    if how == "hard link":
        out = tmp_path / "x.json"
        os.link(target, out)
    elif how == "symlink":
        out = tmp_path / "x.json"
        out.symlink_to(target)
    else:
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / os.path.relpath(target, tmp_path)
    r = run("query", "-w", str(wh_path), "--format", "json", "-o", str(out), "SELECT 1 AS x")
    assert r.exit_code == 1, r.output
    assert r.output.startswith(f"Error: refusing to write {out} inside the warehouse {wh_path}")
    assert {p: p.read_bytes() for p in wh_path.rglob("*") if p.is_file()} == before


def test_an_unrelated_hard_linked_output_is_written(wh_path, tmp_path) -> None:
    out = tmp_path / "a.csv"
    out.write_text("old")
    os.link(out, tmp_path / "b.csv")
    r = run("query", "-w", str(wh_path), "--format", "csv", "-o", str(out), "SELECT 1 AS x")
    assert r.exit_code == 0, r.output
    assert out.read_text() == "x\n1\n"
