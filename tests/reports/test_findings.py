"""The findings open the report grouped under the five questions, each with a headline whose
numbers are recomputed here from the planted warehouse's raw HDF5 arrays (store.WarehouseReader,
not the query layer); the comparison report groups the same way; the Findings container."""

from __future__ import annotations

import html
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from reports import build, render_html
from reports.compare import build_comparison
from reports.model import ECHO, HEADS, SINK, TEMPLATES, WHERE, Findings
from store import A, F, WarehouseReader
from store.schema import ABLATION_DIR

QUESTIONS = [ECHO, WHERE, HEADS, SINK, TEMPLATES]


def _blocks(page: str) -> dict[str, tuple[str, str]]:
    """anchor -> (heading, headline) of every question block, in page order."""
    found = re.findall(r"<div class='question' id='([\w-]+)'>\s*<h3>(.*?)</h3>\s*<p class='headline'>(.*?)</p>",
                       page, re.S)
    return {a: (html.unescape(h), html.unescape(p)) for a, h, p in found}


def _raw(root: Path) -> dict:
    """The numbers each headline states, computed from the stored arrays and attributes."""
    with WarehouseReader(root) as r:
        idx = r.prompt_indices()
        attrs = [r.prompt_attrs(i) for i in idx]
        ranks = np.stack([r.read(F.LENS_TARGET_RANK, i) for i in idx])  # (N, L + 1), boundaries -1..L-1
        dla = np.stack([r.read(F.DLA_HEAD, i) for i in idx]).mean(0)  # (L, H)
        att = np.stack([r.read(F.ATTN_PATTERN, i)[:, :, -1, 0] for i in idx]).mean(0)  # (L, H)
        abl = [r.read(A.LOGIT_DIFF, i, subdir=ABLATION_DIR) for i in r.ablation_indices()]  # (modes, L, H + 2)
    n_heads = dla.shape[1]
    emergence = []
    for row in ranks:
        zero = row == 0
        if not zero[-1]:
            emergence.append(None)
            continue
        b = len(row) - int(np.argmin(zero[::-1])) if not zero.all() else 0  # first boundary of the final run of 0s
        emergence.append(b - 1)
    out = {"n": len(idx), "echo": sum(bool(a["echo_correct"]) for a in attrs),
           "emergence": Counter(e for e in emergence if e is not None).most_common(1)[0],
           "never": sum(e is None for e in emergence),
           "dla": (*np.unravel_index(np.argmax(dla), dla.shape), float(dla.max())),
           "att_half": int((att > 0.5).sum()), "att_top": (*np.unravel_index(np.argmax(att), att.shape),
                                                           float(att.max())), "n_heads": att.size}
    by_word: dict[str, set[int]] = {}
    for a in attrs:
        by_word.setdefault(a["word"], set()).add(int(a["top1_id"]))
    out["differ"], out["n_words"] = sum(len(v) > 1 for v in by_word.values()), len(by_word)
    if abl:
        zero_heads = np.stack(abl)[:, 0, :, :n_heads].mean(0)  # (L, H), mode 0 = zero
        out["abl"] = (*np.unravel_index(np.argmax(zero_heads), zero_heads.shape), float(zero_heads.max()))
    return out


def test_findings_open_with_one_headline_per_question(planted):
    page = render_html(build(planted, words=("cat",)))
    blocks = _blocks(page)
    assert list(blocks) == [q.anchor for q in QUESTIONS]
    assert [h for h, _ in blocks.values()] == [f"{i}. {q.text}" for i, q in enumerate(QUESTIONS, 1)]
    assert page.index("id='q-templates'") < page.index("<h2 id='s0'>")  # the findings come first
    raw = _raw(planted)
    n = raw["n"]

    m = re.fullmatch(r"The continuation starts with the word for (\d+) of (\d+) prompts \((\d+)%\) over 2 templates\.",
                     blocks["q-echo"][1])
    assert m and (int(m[1]), int(m[2])) == (raw["echo"], n) and int(m[3]) == round(100 * raw["echo"] / n)

    m = re.match(r"The target emerges at layer (-?\d+) for (\d+) of (\d+) prompts .*; for (\d+) of \d+ it never",
                 blocks["q-where"][1])
    assert m and (int(m[1]), int(m[2])) == raw["emergence"] and (int(m[3]), int(m[4])) == (n, raw["never"])

    m = re.fullmatch(r"By zero ablation, L(\d+)H(\d+) \(mean target-logit drop ([-\d.]+)\); by direct logit "
                     r"attribution, L(\d+)H(\d+) \(mean DLA ([-\d.]+)\)\.", blocks["q-heads"][1])
    assert m, blocks["q-heads"][1]
    la, ha, va = raw["abl"]
    ld, hd, vd = raw["dla"]
    assert (int(m[1]), int(m[2])) == (la, ha) and abs(float(m[3]) - va) < 5e-4 + 1e-6  # printed with 3 decimals
    assert (int(m[4]), int(m[5])) == (ld, hd) and abs(float(m[6]) - vd) < 5e-4 + 1e-6

    m = re.fullmatch(r"(\d+) of (\d+) heads put more than half of the last position's attention on position 0; "
                     r"the most, L(\d+)H(\d+), puts ([\d.]+)% there\.", blocks["q-sink"][1])
    assert m, blocks["q-sink"][1]
    lt, ht, vt = raw["att_top"]
    assert (int(m[1]), int(m[2])) == (raw["att_half"], raw["n_heads"]) and (int(m[3]), int(m[4])) == (lt, ht)
    assert abs(float(m[5]) / 100 - vt) < 5e-4 + 1e-6  # printed as a percentage with 1 decimal

    m = re.match(r"The templates give different first tokens for (\d+) of (\d+) words", blocks["q-templates"][1])
    assert m and (int(m[1]), int(m[2])) == (raw["differ"], raw["n_words"])


def test_the_planted_numbers_are_what_the_fixture_planted(planted):
    """The independent computation above, against the fixture's own plan (tests/reports/conftest.py)."""
    from tests.reports.conftest import EMERGENCE, TOP_DLA
    from tests.reports.conftest import SINK as SINK_HEAD

    raw = _raw(planted)
    assert raw["echo"] == sum(e is not None for e in EMERGENCE) == 7
    assert raw["emergence"] == (2, 6) and raw["never"] == 1
    assert raw["abl"][:2] == SINK_HEAD and abs(raw["abl"][2] - 7 / 8) < 1e-6
    assert raw["dla"][:2] == TOP_DLA and abs(raw["dla"][2] - 0.5) < 1e-6
    assert raw["att_top"][:2] == SINK_HEAD and raw["differ"] == 1


def test_without_ablation_the_heads_headline_says_dla_only(planted_no_ablation):
    blocks = _blocks(render_html(build(planted_no_ablation)))
    ld, hd, vd = _raw(planted_no_ablation)["dla"]
    assert blocks["q-heads"][1] == (f"By direct logit attribution, L{ld}H{hd} (mean DLA {vd:.3f}); this warehouse "
                                    "has no unit ablation to check it against.")


def test_comparison_groups_its_findings_the_same_way(planted, planted_no_ablation):
    from query import WarehouseArg

    rep = build_comparison([WarehouseArg(planted, "full"), WarehouseArg(planted_no_ablation, "bare")], words=("cat",))
    page = render_html(rep)
    blocks = _blocks(page[:page.index("<h2 id='s0'>")])
    assert list(blocks) == [q.anchor for q in QUESTIONS[:4]]  # no comparison section answers the fifth yet
    full, bare = _raw(planted), _raw(planted_no_ablation)
    assert blocks["q-echo"][1].endswith(
        f"full {full['echo']}/{full['n']} ({full['echo'] / full['n']:.0%}); "
        f"bare {bare['echo']}/{bare['n']} ({bare['echo'] / bare['n']:.0%}).")
    la, ha, va = full["abl"]
    ld, hd, vd = bare["dla"]
    assert f"full L{la}H{ha} by ablation effect (mean {va:.3f}" in blocks["q-heads"][1]
    assert f"bare L{ld}H{hd} by DLA (mean {vd:.3f}" in blocks["q-heads"][1]
    # each model's own findings sit under the same questions, prefixed with its label
    echo = next(a for a in rep.findings.answers if a.question == ECHO)
    assert [label for label, _ in echo.models] == ["full", "bare"]
    assert echo.texts()[echo.texts().index("full: " + echo.models[0][1].headline) - 1] == echo.supporting[-1]
    assert echo.models[0][1].headline.startswith(f"The continuation starts with the word for {full['echo']} of 8")
    assert f"<summary><b>full</b>: {html.escape(echo.models[0][1].headline)}</summary>" in page
    templates = next(a for a in rep.findings.answers if a.question == TEMPLATES)
    assert templates.headline is None and templates.models[1][1].headline.startswith("The templates give")


def test_findings_container():
    f = Findings()
    f.add(WHERE, "b")
    f.headline(WHERE, "a")
    f.headline(ECHO, "c")
    f.run.append("ok")
    assert list(f) == ["ok", "a", "b", "c"] and len(f) == 4  # page order: run, then questions as first answered
    with pytest.raises(AssertionError, match="two headlines"):
        f.headline(WHERE, "again")
    g = Findings()
    g.headline(ECHO, "both")
    g.merge(f, "m")
    assert [a.question for a in g.answers] == [ECHO, WHERE] and g.answers[1].headline is None
    assert list(g) == ["m: ok", "both", "m: c", "m: a", "m: b"]


@pytest.fixture(scope="module")
def patched(tiny_llama_dir, tmp_path_factory) -> Path:
    from extract.config import ExtractConfig
    from extract.pipeline.run import extract

    out = tmp_path_factory.mktemp("patched") / "w"
    s = extract(ExtractConfig(out=out, model=str(tiny_llama_dir), device="cpu", words=("cat", "xylophone"),
                              templates=("repeat the following word: {word}", "echo the following word: {word}"),
                              patching=True, ablation=(), progress=False), log=lambda m: None)
    assert not s.failed
    return out


def test_templates_headline_from_patching(patched):
    """With patching data the fifth question's headline is the layer from which on (to the last)
    the last position's residual alone recovers >= 0.5 on average: recomputed from the patching view's
    per-word recoveries (not the patching_recovery_map analysis)."""
    from query import Warehouse

    blocks = _blocks(render_html(build(patched, words=())))
    with Warehouse(patched) as wh:
        per = wh.sql("SELECT pair, direction, layer, avg(recovery) AS r FROM patching WHERE kind = 'resid' "
                     "AND from_end = 0 GROUP BY ALL").rows()
    first: dict[tuple[str, int], int | None] = {}
    for key in {(p, d) for p, d, _, _ in per}:
        by_layer = sorted((layer, r) for p, d, layer, r in per if (p, d) == key)
        start = None  # the first layer of the final run of layers whose mean recovery is >= 0.5
        for layer, r in by_layer:
            start = (layer if start is None else start) if r >= 0.5 else None
        first[key] = start
    assert len(first) == 2  # one pair, both directions
    layers = set(first.values())
    text = blocks["q-templates"][1]
    assert text.startswith("The last position's residual alone carries at least half of the difference")
    if len(layers) == 1 and None not in layers:
        assert text.endswith(f"from layer {layers.pop()} on, in all 2 directions patched.")
    else:
        for (pair, direction), layer in first.items():
            a, b = pair.split("-")
            d = f"template {a} into {b}" if direction == 0 else f"template {b} into {a}"
            assert (f"from layer {layer} on for {d}" if layer is not None else f"at no layer for {d}") in text
