"""The HTML report: built from a real (tiny-model) warehouse, with and without ablation data;
chart specs checked structurally; no external URL; rendered by a real headless Chromium with
networking off."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from echowh.cli import main
from extract.config import ExtractConfig
from extract.run import extract
from query import Warehouse
from reports import build, render_html, write_report

WORDS = ("cat", "dog", "house")


@pytest.fixture(scope="module")
def warehouses(tiny_qwen2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    full, bare = root / "full", root / "bare"
    extract(ExtractConfig(out=full, model=str(tiny_qwen2_dir), words=WORDS, progress=False,
                          ablation=("zero",)), log=lambda m: None)
    extract(ExtractConfig(out=bare, model=str(tiny_qwen2_dir), words=WORDS, progress=False,
                          ablation=()), log=lambda m: None)
    return full, bare


def _marks(spec: dict) -> list[str]:
    out = []
    if "mark" in spec:
        m = spec["mark"]
        out.append(m["type"] if isinstance(m, dict) else m)
    for sub in spec.get("layer", []):
        out += _marks(sub)
    return out


def _fields(spec: dict) -> set[str]:
    found = set()
    for enc in [spec.get("encoding", {})] + [s.get("encoding", {}) for s in spec.get("layer", [])]:
        for ch in enc.values():
            if isinstance(ch, dict) and "field" in ch:
                found.add(ch["field"])
    return found


def test_sections_charts_and_findings_come_from_the_data(warehouses):
    full, _ = warehouses
    rep = build(full, words=("cat",))
    titles = [s.title for s in rep.sections]
    for t in ("Run summary", "Echo behaviour", "Emergence layer", "Logit lens", "Direct logit attribution per head",
              "DLA vs ablation", "Top-head consistency", "Attention vs MLP blocks", "Ablation flips",
              "Attention to the first token", "Residual cosine similarity"):
        assert t in titles
    specs = rep.chart_specs()
    assert len(specs) >= 10
    by_title = {(s.get("title") or s.get("layer", [{}])[0].get("title", "")): s for s in specs}
    lens = next(s for t, s in by_title.items() if "target probability" in str(t))
    assert _marks(lens) == ["rect"] and {"layer", "prompt_label", "target_prob"} <= _fields(lens)
    # the heatmap holds exactly the analysis' rows: prompts x (L + 1) boundaries
    with Warehouse(full) as wh:
        n = wh.sql("SELECT count(*) AS n FROM logit_lens")["n"][0]
        cons = wh.run_analysis("top_heads_consistency")
        eb = wh.run_analysis("echo_behaviour")
    assert len(lens["data"]["values"]) == n
    scatter = next(s for s in specs if "layer" in s and "ablation" in str(s["layer"][0].get("title", "")))
    assert _marks(scatter) == ["circle", "text", "line"]
    # findings quote the analyses' own numbers
    c = cons.sort("n_top_ablation", descending=True).row(0, named=True)
    assert any(f"Head {c['head']} " in f and f"{c['n_top_ablation']} of {c['n_prompts_ablation']}" in f for f in rep.findings)
    r = eb.row(0, named=True)
    assert any(f"{r['n_echo_first_token']} of {r['n_prompts']} prompts" in f for f in rep.findings)
    assert any("invariants hold" in f for f in rep.findings)


def test_html_is_self_contained(warehouses, tmp_path):
    full, _ = warehouses
    out = write_report(full, tmp_path / "r.html")
    text = out.read_text()
    assert out.stat().st_size < 5_000_000
    # nothing the browser would fetch: no remote src/href, CSS url() or @import
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", text, re.I)
    # the report's own part (everything but the inlined library bundle) names no schema/import
    own = re.sub(r"<head>.*</head>", "", text, flags=re.S)
    assert "@import" not in own and "$schema" not in own and "http" not in own
    assert "vegaEmbed" in text and text.count("class='chart'") >= 10


def test_without_ablation_the_sections_become_notes(warehouses):
    _, bare = warehouses
    rep = build(bare)
    notes = {s.title: s.note for s in rep.sections}
    assert "no ablation data" in notes["DLA vs ablation"]
    assert "no ablation data" in notes["Ablation flips"]
    assert all("ablation" not in str(c.to_dict().get("title", "")).lower() for s in rep.sections for c in s.charts)
    html = render_html(rep)
    assert "no ablation data" in html


def test_cli_report_and_errors(warehouses, tmp_path):
    full, _ = warehouses
    r = CliRunner().invoke(main, ["report", "-w", str(full), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.html").exists()
    r = CliRunner().invoke(main, ["report", "-w", str(tmp_path / "none"), "-o", str(tmp_path / "y.html")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (
        f"Error: no warehouse at {tmp_path / 'none'}; run `echowh extract --out {tmp_path / 'none'}` first")
    assert not (tmp_path / "y.html").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup.sh --browser installs it)")
def test_renders_in_headless_chromium_with_network_off(warehouses, tmp_path):
    full, _ = warehouses
    out = write_report(full, tmp_path / "r.html")
    n_charts = out.read_text().count("class='chart'")
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=127.0.0.1:9", "--virtual-time-budget=15000"]
    dom = subprocess.run([*args, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    rendered = len(re.findall(r'<svg[^>]*class="marks"', dom))
    assert rendered == n_charts, (rendered, n_charts)
    assert 'data-failed="yes"' not in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*args, "--window-size=1200,3000", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000  # a blank page compresses to a few KB
