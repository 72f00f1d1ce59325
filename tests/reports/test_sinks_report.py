"""The "Attention sinks" report section on a real SmolLM2 extraction: its findings state the
numbers the analyses return (recomputed here from the stored arrays where they are simple), and
a warehouse without the captures gets a note, not an error."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from extract.config import ExtractConfig
from extract.pipeline.run import extract
from query import Warehouse
from reports.report import build, render_html
from store import F, WarehouseReader


@pytest.fixture(scope="module")
def smol(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sinkreport") / "w"
    s = extract(ExtractConfig(out=out, words=("cat", "dog"), ablation=("zero", "sink", "sink_norenorm"),
                              ablate_positions="last", ablate_layers=(0, 1, 2, 3), progress=False),
                log=lambda m: None)
    assert not s.failed
    return out


def test_sink_section_findings_come_from_the_data(smol):
    rep = build(smol)
    titles = [s.title for s in rep.sections]
    for t in ("Attention sinks", "Sink share", "First-token keys and values", "Massive activations",
              "Logit lens at position 0", "Removing the sink"):
        assert t in titles
    text = "\n".join(rep.findings)
    # the top first-token head: weight and norm share from the stored pattern and norms
    with WarehouseReader(smol) as r:
        pat = np.stack([r.read(F.ATTN_PATTERN, p)[:, :, -1, 0] for p in r.prompt_indices()])  # (N, L, H)
        resid = [r.read(F.RESID, p) for p in r.prompt_indices()]
    w = pat.mean(0)
    layer, head = np.unravel_index(np.argmax(w), w.shape)
    m = re.search(rf"Head L{layer}H{head} puts ([0-9.]+) of its last-position attention but ([0-9.]+) of its output", text)
    assert m, text
    assert abs(float(m.group(1)) - w[layer, head]) < 0.006
    with Warehouse(smol) as wh:
        share = wh.run_analysis("sink_share")
        share = share.filter(share["layer"].is_null())
        heads = wh.run_analysis("sink_heads")
    row = heads.filter((heads["layer"] == int(layer)) & (heads["head"] == int(head))).row(0, named=True)
    assert abs(float(m.group(2)) - row["norm_share_first"]) < 0.006
    assert f"{share['sink_share'][0]:.1%} of this model's heads" in text
    # the massive dimension: the largest |value| at position 0 over every boundary, from the residuals
    big = max(float(np.abs(x[:, 0]).max()) for x in resid)
    dim = int(np.argmax(np.abs(resid[0][:, 0]).max(0)))
    assert f"Dimension {dim} at position 0" in text and f"{big:.4g}" in text
    assert "sink_norenorm" in text and "Gu et al. 2025" in text
    html = render_html(rep)
    assert "92.5%" in html and "Sun et al. 2024" in html and "Kobayashi et al. 2020" in html


def test_planted_warehouse_without_captures_gets_a_note(tmp_path):
    from tests.reports.conftest import build as build_planted

    root = build_planted(tmp_path / "w")
    rep = build(root)
    sec = next(s for s in rep.sections if s.title == "Attention sinks")
    assert "before the attention-sink captures" in sec.note
