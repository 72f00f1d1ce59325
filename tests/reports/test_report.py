"""The HTML report: built from a real (tiny-model) warehouse, with and without ablation data;
chart specs checked structurally; no external URL; rendered by a real headless Chromium with
networking off."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from echowh.cli import main
from extract.config import ExtractConfig
from extract.pipeline.run import extract
from query import Warehouse
from reports import build, render_html, write_report
from store import WarehouseReader
from store.schema import ABLATION_DIR

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
    # findings quote the analyses' own numbers (the random tiny model never echoes: no emergence)
    assert cons["n_prompts_ablation"].max() == 0
    assert any("cannot be ranked" in f for f in rep.findings)
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
    inside = full / "report.html"
    r = CliRunner().invoke(main, ["report", "-w", str(full), "-o", str(inside)])
    assert r.exit_code == 1 and not inside.exists()
    assert r.output == (f"Error: refusing to write {inside} inside the warehouse {full} (warehouses are "
                        "read-only after extraction); choose an -o outside it\n")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
def test_renders_in_headless_chromium_with_network_off(warehouses, tmp_path):
    if CHROMIUM is None:
        msg = "chromium not installed (scripts/setup.sh --browser installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI must render the report")
        pytest.skip(msg)
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
    assert f'data-charts-rendered="{n_charts}"' in dom  # the page's own count of settled charts
    assert 'data-failed="yes"' not in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*args, "--window-size=1200,3000", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000  # a blank page compresses to a few KB
    _assert_screenshot_shows_charts(shot)


def _assert_screenshot_shows_charts(shot) -> None:
    """Charts paint colour (viridis/blues heatmaps, category bars); text alone is greys."""
    import numpy as np
    from PIL import Image as image

    px = np.asarray(image.open(shot).convert("RGB")).astype(int)
    non_white = (px.min(axis=2) < 245).mean()
    colourful = (px.max(axis=2) - px.min(axis=2) > 60)
    assert non_white > 0.05, f"screenshot nearly blank ({non_white:.1%} non-white)"
    assert colourful.mean() > 0.02, f"no coloured chart marks ({colourful.mean():.2%} of pixels)"


# -- the hand-made warehouse with planted findings (tests/reports/conftest.py) ---------------

def _spec_by_title(specs: list[dict], needle: str) -> dict:
    def title(s: dict) -> str:
        return str(s.get("title") or (s.get("layer") or [{}])[0].get("title", ""))
    found = [s for s in specs if needle in title(s)]
    assert len(found) == 1, (needle, [title(s) for s in specs])
    return found[0]


def _values(spec: dict) -> list[dict]:
    return spec["data"]["values"]


def test_findings_state_the_planted_numbers(planted):
    rep = build(planted, words=("cat", "nosuchword"))
    text = "\n".join(rep.findings)
    assert "At layer 2, head L2H4 is in the top 3 by ablation for 7 of 8 prompts" in text
    assert "Head 4 (at the emergence layer) is in the top 3 by ablation for 6 of 7 prompts" in text
    assert "the first token is the word for 3 of 4 prompts (75%)" in text
    assert "the target most often emerges at layer 2 (4 of 4 prompts" in text
    assert "The head with the largest mean DLA is L3H1 (0.500)" in text
    assert "Ablating L2H4 lowers the target logit most" in text
    assert "L2H4 puts 90.0% of its attention on position 0" in text and "1 of 24 heads" in text
    assert "2 single-head ablations change the model's answer (2 prompts affected)" in text
    assert "cosine ≥ 1.0000" in text


def test_chart_specs_hold_the_analyses_rows(planted):
    from tests.reports.conftest import H, L

    rep = build(planted, words=("cat",))
    specs = rep.chart_specs()
    lens = _spec_by_title(specs, "Logit lens: target probability")
    assert len(_values(lens)) == 8 * (L + 1)
    assert {v["layer"] for v in _values(lens)} == set(range(-1, L))
    dla = _spec_by_title(specs, "Mean DLA per head")
    assert dla["mark"]["type"] == "rect" and len(_values(dla)) == L * H
    assert dla["encoding"]["x"]["field"] == "head" and dla["encoding"]["y"]["field"] == "layer"
    best = max(_values(dla), key=lambda v: v["mean_dla"])
    assert (best["layer"], best["head"]) == (3, 1)
    sink = _spec_by_title(specs, "Attention on position 0")
    top = max(_values(sink), key=lambda v: v["mean_mass_first"])
    assert (top["layer"], top["head"]) == (2, 4)
    # the scatter labels the top heads by ablation, L2H4 first
    scatter = _spec_by_title(specs, "direct logit attribution vs zero-ablation")
    assert _marks(scatter) == ["circle", "text", "line"]
    pts = _values(scatter["layer"][0]) if "data" in scatter["layer"][0] else _values(scatter)
    assert any(p["label"] == "L2H4" and p["top"] for p in pts)
    assert scatter["layer"][1]["encoding"]["text"]["field"] == "label"
    # trajectories carry token text, one chart per template of the chosen word
    traj = [s for s in specs if "“cat”" in str((s.get("layer") or [{}])[0].get("title", s.get("title", "")))]
    assert len(traj) == 2
    tv = _values(traj[0]) if "data" in traj[0] else _values(traj[0]["layer"][0])
    assert {"layer", "k", "token_text", "prob"} <= set(tv[0]) and any(v["token_text"] == "cat" for v in tv)
    emerg = _spec_by_title(specs, "Emergence layer")
    assert {(v["emergence"], v["n_prompts"]) for v in _values(emerg)} >= {("2", 4), ("2", 2), ("3", 1), ("never", 1)}
    # consistency at the most common emergence layer: head 4 at 7/8
    at2 = _spec_by_title(specs, "each head of layer 2")
    assert any(v["head"] == 4 and v["measure"] == "ablation" and v["fraction"] == 7 / 8 for v in _values(at2))


def test_unknown_words_become_a_note(planted):
    rep = build(planted, words=("nosuchword",))
    lens = next(s for s in rep.sections if s.title == "Logit lens")
    assert lens.note == "Not in this prompt set: nosuchword." and len(lens.charts) == 2  # heatmaps only
    rep = build(planted, words=("cat", "zebra", "dog"))
    lens = next(s for s in rep.sections if s.title == "Logit lens")
    assert lens.note == "Not in this prompt set: zebra." and len(lens.charts) == 2 + 2 * 2


def test_a_warehouse_without_prompts_is_a_clear_error(tmp_path):
    import numpy as np

    from store import M, WarehouseWriter

    root = tmp_path / "w"
    w = WarehouseWriter.create(root, {"fingerprint": "x", "fingerprint_parts": {}, "config": {}}, resume=False)
    r = CliRunner().invoke(main, ["report", "-w", str(root), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and r.output == f"Error: {root} has no model.h5; the extraction did not start\n"
    with w.model_writer() as m:  # killed after the model file, before the first prompt
        m.put(M.VOCAB_TEXT, ["a", "b"])
        m.put(M.KV_GROUP, np.zeros(2))
        m.attrs({"n_layers": 1, "n_heads": 2, "d_model": 4})
    r = CliRunner().invoke(main, ["report", "-w", str(root), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output == (f"Error: {root} holds no finished prompt yet (was the extraction stopped early?); "
                        f"run `echowh extract --out {root} --resume` first\n")


def test_planted_without_ablation_has_notes_not_errors(planted_no_ablation, tmp_path):
    rep = build(planted_no_ablation)
    notes = {s.title: s.note for s in rep.sections}
    for t in ("DLA vs ablation", "Ablation flips", "Top-head consistency"):
        assert "no ablation data" in notes[t]
    assert not any("by ablation" in f for f in rep.findings)
    out = write_report(planted_no_ablation, tmp_path / "bare.html")
    assert "no ablation data" in out.read_text()


def test_token_text_shows_its_whitespace_and_nothing_is_escaped_twice(planted):
    rep = build(planted, words=("cat",))
    flips = next(s for s in rep.sections if s.title == "Ablation flips")
    assert flips.tables[0][1]["new_top1_text"].to_list()[:2] == [" X", " X"]  # the frame keeps the text
    text = render_html(rep)
    assert "<td>␣X</td>" in text  # the table shows the leading space
    assert "&amp;" not in text.split("<body>", 1)[1].split("<script>", 1)[0]  # no double escaping
    assert "(&#39;&lt;s&gt;&#39;)" in text  # position-0 token: escaped once (by the template)
    assert "&amp;lt;" not in text and "&amp;#39;" not in text


def test_lens_rank_heatmap(planted):
    from tests.reports.conftest import L

    specs = build(planted, words=()).chart_specs()
    rank = _spec_by_title(specs, "Logit lens: target rank")
    assert rank["encoding"]["color"]["scale"]["type"] == "log"
    values = _values(rank)
    assert len(values) == 8 * (L + 1) and min(v["rank1"] for v in values) == 1


# -- every ablation configuration (issue 8, item 3) --------------------------------------------

MATRIX = {
    "none": dict(ablation=()),
    "zero": dict(ablation=("zero",)),
    "mean": dict(ablation=("mean",)),
    "zero+mean": dict(ablation=("zero", "mean")),
    "last": dict(ablation=("mean",), ablate_positions="last"),
    "layers": dict(ablation=("zero", "mean"), ablate_layers=(1, 2)),
    "sinks": dict(ablation=("zero", "sink", "sink_norenorm"), ablate_positions="last"),
}


@pytest.fixture(scope="module")
def matrix(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    out = {}
    for name, kw in MATRIX.items():
        out[name] = root / name
        extract(ExtractConfig(out=out[name], model=str(tiny_llama_dir), words=WORDS, progress=False,
                              max_new_tokens=1, **kw), log=lambda m: None)
    return out


@pytest.mark.parametrize("name", list(MATRIX))
def test_report_builds_for_every_ablation_configuration(matrix, name, tmp_path):
    kw = MATRIX[name]
    r = CliRunner().invoke(main, ["report", "-w", str(matrix[name]), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    rep = build(matrix[name], words=("cat",))
    by_title = {s.title: s for s in rep.sections}
    summary = dict(by_title["Run summary"].tables[0][1].rows())
    if not kw["ablation"]:
        assert "no ablation data" in by_title["Ablation flips"].note and summary["ablation"] == "none"
        return
    modes = list(kw["ablation"])  # requested in the order the summary names them
    unit = [m for m in modes if m in ("zero", "mean")]  # the modes the head and block sections show
    shown = "zero" if "zero" in modes else "mean"
    assert not by_title["DLA vs ablation"].note and not by_title["Ablation flips"].note
    titles = [str(c.to_dict().get("title") or c.to_dict()["layer"][0].get("title")) for s in rep.sections
              for c in s.charts]
    assert sum(f"vs {shown}-ablation effect" in t for t in titles) == 1
    assert [t for t in titles if t.startswith("Whole-block")] == [
        f"Whole-block {m} ablation: KL(clean ‖ ablated) by layer" for m in unit]
    layers = kw.get("ablate_layers", (0, 1, 2))
    positions = kw.get("ablate_positions", "all")
    names = modes[0] if len(modes) == 1 else f"{', '.join(modes[:-1])} and {modes[-1]}"
    assert summary["ablation"].startswith(
        f"{names} ablation at {'all positions' if positions == 'all' else 'the last position only'}, "
        f"layers {layers[0]}-{layers[-1]} (")
    # every mode the shards hold (read from the HDF5 attributes, not through query) is named
    with WarehouseReader(matrix[name]) as r:
        stored = {m for i in r.ablation_indices() for m in r.shard(i, ABLATION_DIR).attrs["modes"]}
    assert stored == set(modes)
    assert all(f"{m}: " in summary["ablation"] for m in stored)
    # the block chart holds exactly the block_ablation rows of the ablated layers
    with Warehouse(matrix[name]) as wh:
        blocks = wh.run_analysis("block_ablation", mode=unit[-1])
    assert set(blocks["layer"].to_list()) == set(layers)
    chart = next(c.to_dict() for s in rep.sections for c in s.charts
                 if str(c.to_dict().get("title")).startswith(f"Whole-block {unit[-1]}"))
    assert len(chart["data"]["values"]) == blocks.height == 2 * len(layers)
    assert any(f"({shown} mode)" in f or f"{shown} mode)" in f for f in rep.findings)


def test_lens_trajectory_text_is_readable(planted):
    """Token texts are written horizontally at 12 px, one row per layer, one column per rank."""
    from tests.reports.conftest import L

    specs = build(planted, words=("cat",)).chart_specs()
    traj = _spec_by_title(specs, "“cat”, template 0")
    rect, text = traj["layer"]
    assert text["mark"]["type"] == "text" and text["mark"]["fontSize"] >= 11 and "angle" not in text["mark"]
    assert text["encoding"]["y"]["field"] == "layer" and text["encoding"]["x"]["field"] == "k"
    assert traj["height"] >= 18 * (L + 1)
    inks = {v["token_text"]: v["ink"] for v in (_values(traj) if "data" in traj else _values(rect))}
    assert inks["cat"] == "target"
