"""The "Which paths carry the word" section on a real tiny warehouse with circuit shards
(tests/conftest.py's ``circuits_wh``): the diagram's edges and positions, the faithfulness
chart's rows and the findings' numbers are recomputed from the raw HDF5 arrays (h5py, numpy);
without circuits the section and its question are absent."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from query import Warehouse
from reports.context import Ctx
from reports.report import build, render_html
from reports.sections import circuits
from store.circuits_schema import INPUT_KINDS, METHODS, SELECTIONS

TOL = 1e-9


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


@pytest.fixture(scope="module")
def rep(circuits_wh):
    return build(circuits_wh, words=("cat",))


def _section(rep):
    return next(s for s in rep.sections if s.title == circuits.TITLE)


def _layers(spec: dict) -> list[dict]:
    return spec.get("layer", [spec])


def test_diagram_draws_the_top_edges_at_their_nodes(rep, circuits_wh) -> None:
    with h5py.File(circuits_wh / "circuits" / "graph.h5", "r") as g:
        up, down = g["edge_up"][()], g["edge_down"][()]
        up_layer, up_head = g["up_layer"][()], g["up_head"][()]
        d_kind, d_layer, d_head = g["down_kind"][()], g["down_layer"][()], g["down_head"][()]
        group = int(g.attrs["n_heads"]) // int(g.attrs["n_kv_heads"])
        H = int(g.attrs["n_heads"])
    mean = {}
    for kind in ("template", "word"):
        arr = []
        for p in sorted((circuits_wh / "circuits" / kind).glob("p*.h5")):
            with h5py.File(p, "r") as f:
                arr.append(f["scores"][METHODS.index(circuits.METHOD), 0].astype(np.float64))
        mean[kind] = np.mean(arr, axis=0)
    diagrams = [c.to_dict() for c in _section(rep).charts[:2]]
    for kind, spec in zip(("template", "word"), diagrams, strict=True):
        assert kind in spec["title"]
        rules, dots, text = _layers(spec)
        assert (rules["mark"]["type"], dots["mark"]["type"], text["mark"]["type"]) == ("rule", "circle", "text")
        assert rules["encoding"]["strokeWidth"]["field"] == "abs_score"
        assert rules["encoding"]["color"]["field"] == "input_kind"
        rows = rules["data"]["values"]
        want = sorted(range(up.size), key=lambda e: (-abs(mean[kind][e]), e))[:circuits.TOP]
        assert len(rows) == circuits.TOP
        for e, r in zip(want, rows, strict=True):
            u, d = up[e], down[e]
            assert abs(r["mean_score"] - mean[kind][e]) <= TOL
            ux = -1 if up_layer[u] < 0 else up_layer[u] + (0.5 if up_head[u] < 0 else 0)
            uy = (H - 1) / 2 if up_layer[u] < 0 else (H if up_head[u] < 0 else up_head[u])
            k = INPUT_KINDS[d_kind[d]]
            dx = d_layer[d] + (0.5 if k == "mlp" else 0)
            dy = {"q": d_head[d], "k": d_head[d] * group + (group - 1) / 2, "v": d_head[d] * group + (group - 1) / 2,
                  "mlp": H, "logits": (H - 1) / 2}[k]
            assert (r["x"], r["y"], r["x2"], r["y2"]) == (ux, uy, dx, dy), (kind, e)


def test_faithfulness_chart_and_cpr_table(rep, circuits_wh) -> None:
    sec = _section(rep)
    spec = sec.charts[2].to_dict()
    assert spec["mark"]["type"] == "line" and spec["encoding"]["color"]["field"] == "method"
    with Warehouse(circuits_wh) as wh:
        n = wh.run_analysis("circuit_faithfulness_curve").height
    assert len(spec["data"]["values"]) == n
    table = dict(sec.tables)["CPR and CMD per method (circuit_faithfulness_curve; metric ld, patch)"]
    for r in table.iter_rows(named=True):
        cpr = []
        for p in sorted((circuits_wh / "circuits" / r["pair_kind"]).glob("p*.h5")):
            with h5py.File(p, "r") as f:
                cpr.append(f["cpr"][METHODS.index(r["method"]), 0, SELECTIONS.index(r["selection"]), 0])
        assert abs(r["mean_cpr"] - np.mean(cpr)) <= TOL and r["n_pairs"] == len(cpr)


def test_findings_state_the_numbers(rep, circuits_wh) -> None:
    answer = next(a for a in rep.findings.answers if a.question == circuits.PATHS)
    best, cpr = None, -np.inf
    for m, method in enumerate(METHODS):
        vals = []
        for p in sorted((circuits_wh / "circuits" / "word").glob("p*.h5")):
            with h5py.File(p, "r") as f:
                vals.append(f["cpr"][m, 0, 0, 0])
        if np.mean(vals) > cpr:
            best, cpr = method, float(np.mean(vals))
    assert answer.headline.startswith(f"For the word pairs (6 pairs) {best} gives the most faithful circuits "
                                      f"(CPR {cpr:.3f}")
    texts = " ".join(answer.supporting)
    assert "first-token head" in texts and "small DLA" in texts and "Jaccard" in texts
    html = render_html(rep)
    assert circuits.TITLE in html and circuits.PATHS.text in html


def test_absent_without_circuits(planted) -> None:
    with Warehouse(planted) as wh:
        ctx = Ctx.open(wh, ())
        assert circuits.sections(ctx) == []
        assert all(a.question != circuits.PATHS for a in ctx.findings.answers)
