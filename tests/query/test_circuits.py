"""The circuits views and analyses against the raw HDF5 arrays (h5py + numpy, read here
independently of query/) on a real tiny warehouse with circuit shards (tests/conftest.py's
``circuits_wh``). Tolerances: float32 scores compared exactly (the view casts nothing);
means and sums over pairs 1e-9 relative (float64 accumulation order)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from query import Warehouse, get_analysis
from store.circuits_schema import INPUT_KINDS, METHODS, METRICS, SELECTIONS, SIZES

KINDS = ("template", "word")


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class Raw:
    """Every circuits array of the warehouse, read with h5py alone."""

    def __init__(self, root: Path) -> None:
        with h5py.File(root / "circuits" / "graph.h5", "r") as g:
            self.up, self.down = g["edge_up"][()], g["edge_down"][()]
            self.up_name = [_s(x) for x in g["up_name"][()]]
            self.down_name = [_s(x) for x in g["down_name"][()]]
            self.up_layer, self.up_head = g["up_layer"][()], g["up_head"][()]
            self.down_kind, self.down_layer, self.down_head = g["down_kind"][()], g["down_layer"][()], g["down_head"][()]
        self.pairs: dict[tuple[str, int], dict] = {}
        for kind in KINDS:
            for path in sorted((root / "circuits" / kind).glob("p*.h5")):
                with h5py.File(path, "r") as f:
                    d = {k: f[k][()] for k in f}
                    d["attrs"] = {k: f.attrs[k] for k in f.attrs}
                self.pairs[(kind, int(path.stem[1:]))] = d
        self.E = self.up.size

    def edge_names(self, e: int) -> tuple[str, str, str]:
        return self.up_name[self.up[e]], self.down_name[self.down[e]], INPUT_KINDS[self.down_kind[self.down[e]]]

    def mean_scores(self, kind: str, method: str, metric: str) -> np.ndarray:
        mi, ki = METHODS.index(method), METRICS.index(metric)
        return np.mean([d["scores"][mi, ki].astype(np.float64) for (k, _), d in self.pairs.items() if k == kind], axis=0)


@pytest.fixture(scope="module")
def raw(circuits_wh) -> Raw:
    return Raw(circuits_wh)


@pytest.fixture(scope="module")
def wh(circuits_wh):
    with Warehouse(circuits_wh) as w:
        yield w


def _close(a, b, tol: float = 1e-9) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and float(np.abs(a - b).max(initial=0)) <= tol * max(1.0, float(np.abs(b).max(initial=0)))


# -- views ---------------------------------------------------------------------------------------


def test_both_pair_kinds_were_extracted(raw: Raw) -> None:
    assert {k for k, _ in raw.pairs} == set(KINDS) and len(raw.pairs) == 12


def test_graph_view_is_the_graph_file(wh: Warehouse, raw: Raw) -> None:
    df = wh.sql("SELECT * FROM circuit_graph ORDER BY edge")
    assert df["edge"].to_list() == list(range(raw.E))
    for e in (0, 1, raw.E // 2, raw.E - 1):
        r = df.row(e, named=True)
        up, down, kind = raw.edge_names(e)
        assert (r["upstream"], r["downstream"], r["input_kind"]) == (up, down, kind)
        assert r["up_layer"] == raw.up_layer[raw.up[e]] and r["down_layer"] == raw.down_layer[raw.down[e]]
        assert r["up_head"] == (raw.up_head[raw.up[e]] if raw.up_head[raw.up[e]] >= 0 else None)
        assert r["down_head"] == (raw.down_head[raw.down[e]] if raw.down_head[raw.down[e]] >= 0 else None)
    assert df.filter(pl.col("input_kind") == "logits").height == len(raw.up_name)  # every sender feeds the logits


def test_nodes_view_is_the_graph_file(wh: Warehouse, raw: Raw) -> None:
    df = wh.sql("SELECT * FROM circuit_nodes")
    up, down = df.filter(pl.col("side") == "upstream"), df.filter(pl.col("side") == "downstream")
    assert up["node"].to_list() == raw.up_name and down["node"].to_list() == raw.down_name
    assert up["n_edges"].to_list() == [int((raw.up == u).sum()) for u in range(len(raw.up_name))]
    assert down["n_edges"].to_list() == [int((raw.down == d).sum()) for d in range(len(raw.down_name))]
    assert down["input_kind"].to_list() == [INPUT_KINDS[k] for k in raw.down_kind]
    assert up["input_kind"].null_count() == up.height and up["layer"].to_list() == raw.up_layer.tolist()
    assert down["head"].to_list() == [int(h) if h >= 0 else None for h in raw.down_head]
    assert up["n_edges"].sum() == down["n_edges"].sum() == raw.E


def test_edges_view_is_every_stored_score(wh: Warehouse, raw: Raw) -> None:
    df = wh.sql("SELECT pair_kind, clean_prompt, method, metric, edge, score FROM circuit_edges")
    assert df.height == len(raw.pairs) * len(METHODS) * len(METRICS) * raw.E
    for (kind, p), d in raw.pairs.items():
        one = df.filter((pl.col("pair_kind") == kind) & (pl.col("clean_prompt") == p))
        for mi, me in enumerate(METHODS):
            for ki, mt in enumerate(METRICS):
                got = one.filter((pl.col("method") == me) & (pl.col("metric") == mt)).sort("edge")["score"].to_numpy()
                assert np.array_equal(got, d["scores"][mi, ki]), (kind, p, me, mt)


def test_edges_view_filters_like_numpy(wh: Warehouse, raw: Raw) -> None:
    """A filter on graph and pair columns returns exactly the numpy selection."""
    got = wh.sql("SELECT edge, score, word, template, direction FROM circuit_edges WHERE pair_kind = 'word' "
                 "AND clean_prompt = 1 AND method = 'eap' AND metric = 'ld' AND up_layer = 0 AND input_kind = 'v' "
                 "ORDER BY edge")
    d = raw.pairs[("word", 1)]
    want = [e for e in range(raw.E) if raw.up_layer[raw.up[e]] == 0 and raw.edge_names(e)[2] == "v"]
    assert want and got["edge"].to_list() == want
    assert np.array_equal(got["score"].to_numpy(), d["scores"][0, 0, want])
    assert set(got["word"]) == {_s(d["attrs"]["clean_word"])} and set(got["direction"]) == {None}
    tmpl = wh.sql("SELECT DISTINCT clean_prompt, template, direction FROM circuit_edges WHERE pair_kind = 'template' "
                  "ORDER BY clean_prompt").rows()
    assert tmpl == [(p, int(p >= 3), int(raw.pairs[("template", p)]["attrs"]["direction"])) for p in range(6)]


def test_pairs_view(wh: Warehouse, raw: Raw) -> None:
    df = wh.sql("SELECT * FROM circuit_pairs")
    assert df.height == len(raw.pairs)
    for r in df.iter_rows(named=True):
        d = raw.pairs[(r["pair_kind"], r["clean_prompt"])]
        assert r["corrupted_prompt"] == d["prompts"][1] and r["clean_prompt"] == d["prompts"][0]
        assert (r["t_clean"], r["t_corr"]) == tuple(d["answer_tokens"])
        assert (r["ld_clean"], r["ld_corrupted"], r["kl_corrupted"]) == (
            d["metric_clean"][0], d["metric_corrupted"][0], d["metric_corrupted"][1])
        assert r["corrupted_word"] == _s(d["attrs"]["corrupted_word"]) and r["ig_steps"] == 2


def test_faithfulness_and_summary_views(wh: Warehouse, raw: Raw) -> None:
    f = wh.sql("SELECT * FROM circuit_faithfulness")
    s = wh.sql("SELECT * FROM circuit_summary")
    assert f.height == len(raw.pairs) * len(METHODS) * len(METRICS) * len(SELECTIONS) * len(SIZES)
    for (kind, p), d in raw.pairs.items():
        for mi, me in enumerate(METHODS):
            for ki, mt in enumerate(METRICS):
                for si, se in enumerate(SELECTIONS):
                    key = ((pl.col("pair_kind") == kind) & (pl.col("clean_prompt") == p) & (pl.col("method") == me)
                           & (pl.col("metric") == mt) & (pl.col("selection") == se) & (pl.col("replacement") == "patch"))
                    c = f.filter(key).sort("fraction")
                    assert c["fraction"].to_list() == list(SIZES)
                    assert np.array_equal(c["faithfulness"].to_numpy(), d["faithfulness"][mi, ki, si, 0])
                    assert np.array_equal(c["circuit_metric"].to_numpy(), d["circuit_metric"][mi, ki, si, 0])
                    assert c["n_edges"].to_list() == d["circuit_edges"].tolist()
                    r = s.filter(key).row(0, named=True)
                    assert (r["cpr"], r["cmd"]) == (d["cpr"][mi, ki, si, 0], d["cmd"][mi, ki, si, 0])
                    # CPR and CMD are the trapezoids of the curve the view shows (independent numpy)
                    x, y = np.array(SIZES), c["faithfulness"].to_numpy()
                    assert _close(r["cpr"], np.trapezoid(y, x), 1e-12)
                    assert _close(r["cmd"], np.trapezoid(np.abs(1 - y), x), 1e-12)
                    assert r["metric_ref"] == d["metric_ref"][ki, 0]


def test_exact_and_validation_views(wh: Warehouse, raw: Raw) -> None:
    ex = wh.sql("SELECT * FROM circuit_exact")
    val = wh.sql("SELECT * FROM circuit_validation")
    for (kind, p), d in raw.pairs.items():
        one = ex.filter((pl.col("pair_kind") == kind) & (pl.col("clean_prompt") == p))
        assert one.height == len(METHODS) * len(METRICS) * d["sample_edges"].size
        for r in one.filter(pl.col("method") == "eap_ig_inputs").iter_rows(named=True):
            j = int(np.flatnonzero(d["sample_edges"] == r["edge"])[0])
            ki = METRICS.index(r["metric"])
            assert r["exact_effect"] == d["sample_effect"][ki, j]
            assert r["score"] == d["scores"][1, ki, r["edge"]]
            assert r["input_kind"] == raw.edge_names(r["edge"])[2]
            rho = d["sample_spearman"][1, ki, INPUT_KINDS.index(r["input_kind"])]
            assert (r["spearman"] is None) if np.isnan(rho) else r["spearman"] == rho
        v = val.filter((pl.col("pair_kind") == kind) & (pl.col("clean_prompt") == p))
        assert v["invariant"].to_list() == [_s(x) for x in d["validation"]["invariant"]]
        assert v["passed"].all()


def test_views_are_empty_without_circuits(wh_path) -> None:
    with Warehouse(wh_path) as w:
        for v in ("circuit_pairs", "circuit_graph", "circuit_nodes", "circuit_scores", "circuit_edges", "circuit_faithfulness",
                  "circuit_summary", "circuit_exact", "circuit_validation"):
            assert w.sql(f"SELECT count(*) AS n FROM {v}")["n"][0] == 0, v
        for name in ("circuit_top_edges", "circuit_paths", "circuit_agreement", "circuit_faithfulness_curve"):
            df = w.run_analysis(name)
            assert df.height == 0 and df.columns == [c[0] for c in get_analysis(name).columns]


# -- analyses --------------------------------------------------------------------------------------


def test_top_edges_are_the_numpy_means(wh: Warehouse, raw: Raw) -> None:
    df = wh.run_analysis("circuit_top_edges", method="eap_ig_activations", metric="kl", top=7)
    for kind in KINDS:
        m = raw.mean_scores(kind, "eap_ig_activations", "kl")
        order = sorted(range(raw.E), key=lambda e: (-abs(m[e]), e))[:7]
        got = df.filter(pl.col("pair_kind") == kind)
        assert got["edge"].to_list() == order and got["edge_rank"].to_list() == list(range(1, 8))
        assert _close(got["mean_score"].to_numpy(), m[order])
        assert got["upstream"].to_list() == [raw.edge_names(e)[0] for e in order]


def test_head_inputs_are_the_numpy_sums(wh: Warehouse, raw: Raw) -> None:
    df = wh.run_analysis("circuit_head_inputs", method="eap", metric="ld", top=1000)
    for kind in KINDS:
        rows = {}
        for d in raw.down_name:
            if d.endswith(("<q>", "<k>", "<v>")):
                edges = [e for e in range(raw.E) if raw.down_name[raw.down[e]] == d]
                per = np.array([v["scores"][0, 0, edges].astype(np.float64) for (k, _), v in raw.pairs.items()
                                if k == kind])  # (pairs, edges into d)
                rows[d] = (per.sum(1).mean(), np.abs(per).sum(1).mean())
        got = df.filter(pl.col("pair_kind") == kind)
        assert got.height == len(rows)
        for r in got.iter_rows(named=True):
            want = rows[f"a{r['layer']}.h{r['head']}<{r['input_kind']}>"]
            assert _close([r["mean_in_score"], r["mean_in_abs"]], want)
        assert got["mean_in_abs"].to_list() == sorted(got["mean_in_abs"].to_list(), reverse=True)


def _bfs_paths(raw: Raw, m: np.ndarray, threshold: float) -> set[str]:
    """Every path input -> logits over edges with |mean| >= threshold, by breadth-first search."""
    n_q = sum(1 for d in raw.down_name if d.endswith("<q>")) // (max(raw.down_layer) or 1)
    n_kv = sum(1 for d in raw.down_name if d.endswith("<k>")) // (max(raw.down_layer) or 1)
    group = n_q // n_kv
    out_of: dict[str, list[int]] = {}
    for e in range(raw.E):
        if abs(m[e]) >= threshold:
            out_of.setdefault(raw.edge_names(e)[0], []).append(e)

    def next_nodes(e: int) -> list[str | None]:
        down = raw.down_name[raw.down[e]]
        kind, layer, head = raw.edge_names(e)[2], raw.down_layer[raw.down[e]], raw.down_head[raw.down[e]]
        if kind == "logits":
            return [None]
        if kind == "mlp":
            return [down]
        if kind == "q":
            return [f"a{layer}.h{head}"]
        return [f"a{layer}.h{head * group + i}" for i in range(group)]

    done, queue = set(), [("input", [])]
    while queue:
        node, path = queue.pop(0)
        for e in out_of.get(node, []):
            step = [*path, "->".join(raw.edge_names(e)[:2])]
            for nxt in next_nodes(e):
                if nxt is None:
                    done.add(", ".join(step))
                else:
                    queue.append((nxt, step))
    return done


def test_recursive_paths_are_the_bfs_paths(wh: Warehouse, raw: Raw) -> None:
    for kind in KINDS:
        m = raw.mean_scores(kind, "eap_ig_inputs", "ld")
        threshold = float(np.sort(np.abs(m))[-40])  # the 40 strongest edges: a handful of paths
        want = _bfs_paths(raw, m, threshold)
        got = wh.run_analysis("circuit_paths", threshold=threshold, top=100000).filter(pl.col("pair_kind") == kind)
        assert want and set(got["path"]) == want and got.height == len(want)
        for r in got.iter_rows(named=True):
            edges = [next(e for e in range(raw.E) if "->".join(raw.edge_names(e)[:2]) == s) for s in r["path"].split(", ")]
            assert r["n_edges"] == len(edges) and _close(r["weakest"], np.abs(m[edges]).min())
            assert _close(r["total"], m[edges].sum())


def test_faithfulness_curve_is_the_mean_over_pairs(wh: Warehouse, raw: Raw) -> None:
    df = wh.run_analysis("circuit_faithfulness_curve", metric="kl")
    for kind in KINDS:
        ds = [d for (k, _), d in raw.pairs.items() if k == kind]
        for mi, me in enumerate(METHODS):
            for si, se in enumerate(SELECTIONS):
                got = df.filter((pl.col("pair_kind") == kind) & (pl.col("method") == me) & (pl.col("selection") == se))
                f = np.array([d["faithfulness"][mi, 1, si, 0] for d in ds])  # (pairs, X)
                assert got["fraction"].to_list() == list(SIZES)
                assert _close(got["mean_faithfulness"].to_numpy(), f.mean(0))
                assert _close(got["min_faithfulness"].to_numpy(), f.min(0))
                assert _close(got["mean_cpr"][0], np.mean([d["cpr"][mi, 1, si, 0] for d in ds]))
                assert _close(got["mean_cmd"][0], np.mean([d["cmd"][mi, 1, si, 0] for d in ds]))


def _avg_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (Spearman's convention)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(1, x.size + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def test_agreement_is_jaccard_and_spearman(wh: Warehouse, raw: Raw) -> None:
    df = wh.run_analysis("circuit_agreement", method="eap", metric="ld", top=15)
    assert df.height == 6
    for r in df.iter_rows(named=True):
        t = raw.pairs[("template", r["clean_prompt"])]["scores"][0, 0].astype(np.float64)
        w = raw.pairs[("word", r["clean_prompt"])]["scores"][0, 0].astype(np.float64)
        top_t = set(sorted(range(raw.E), key=lambda e: (-abs(t[e]), e))[:15])
        top_w = set(sorted(range(raw.E), key=lambda e: (-abs(w[e]), e))[:15])
        assert r["n_shared"] == len(top_t & top_w)
        assert _close(r["jaccard"], len(top_t & top_w) / len(top_t | top_w))
        assert _close(r["spearman"], np.corrcoef(_avg_ranks(t), _avg_ranks(w))[0, 1], 1e-9)


def test_head_rankings_against_the_views(wh: Warehouse, raw: Raw) -> None:
    df = wh.run_analysis("circuit_head_rankings", pair_kind="template", method="eap", metric="ld")
    heads = [i for i, n in enumerate(raw.up_name) if n.startswith("a")]
    per = np.array([[np.abs(d["scores"][0, 0][raw.up == u].astype(np.float64)).sum() for u in heads]
                    for (k, _), d in raw.pairs.items() if k == "template"])  # (pairs, heads)
    want = dict(zip((raw.up_name[u] for u in heads), per.mean(0), strict=True))
    assert df.height == len(heads)
    for r in df.iter_rows(named=True):
        assert _close(r["circuit_out"], want[f"a{r['layer']}.h{r['head']}"])
    assert df["circuit_rank"].to_list() == sorted(df["circuit_rank"].to_list())
    dla = (wh.sql("SELECT layer, head, avg(dla::DOUBLE) AS m FROM dla WHERE component = 'head' GROUP BY ALL")
           .with_columns(pl.col("m").rank("min", descending=True).alias("r")))
    got = df.join(dla, on=["layer", "head"])
    assert got.height == len(heads) and (got["dla_rank"] == got["r"]).all() and _close(got["mean_dla"], got["m"])
    abl = (wh.sql("SELECT layer, head, avg(logit_diff::DOUBLE) AS m FROM ablation WHERE unit_kind = 'head' AND "
                  "mode = 'zero' GROUP BY ALL").with_columns(pl.col("m").rank("min", descending=True).alias("r")))
    got = df.join(abl, on=["layer", "head"])
    assert got.height == len(heads) and (got["ablation_rank"] == got["r"]).all()
    assert df["sink_rank"].null_count() == 0 and sorted(df["sink_rank"])[0] == 1


def test_parquet_export_holds_the_same_circuits(circuits_wh, tmp_path) -> None:
    """`echowh export --parquet` keeps every circuits view (circuit_edges, derived and without a
    prompt column, as one whole file) and every circuits analysis gives the same rows on it."""
    from query.export import export_parquet

    export_parquet(circuits_wh, tmp_path / "x", progress=False)
    with Warehouse(circuits_wh) as a, Warehouse(tmp_path / "x") as b:
        for v in ("circuit_pairs", "circuit_graph", "circuit_edges", "circuit_summary", "circuit_exact"):
            x, y = (w.sql(f"SELECT * FROM {v}") for w in (a, b))
            assert x.height > 0 and x.sort(x.columns).equals(y.sort(x.columns)), v
        for name in ("circuit_top_edges", "circuit_paths", "circuit_agreement", "circuit_faithfulness_curve"):
            # DuckDB's parallel sums and corr() may differ in the last bits between scans
            assert_frame_equal(a.run_analysis(name), b.run_analysis(name), rel_tol=1e-9, abs_tol=1e-12)


def test_a_damaged_circuits_shard_is_a_one_line_error(circuits_wh, tmp_path) -> None:
    """Shards are read through the warehouse reader, which checks them against the schema."""
    import shutil

    from query import QueryError

    copy = tmp_path / "w"
    shutil.copytree(circuits_wh, copy)
    bad = copy / "circuits" / "word" / "p00002.h5"
    with h5py.File(bad, "r+") as f:
        scores = f["scores"][()]
        del f["scores"]
        f["scores"] = scores[:, :, :-1]  # one edge short
    with Warehouse(copy) as w:
        assert w.sql("SELECT count(*) AS n FROM circuit_graph")["n"][0] > 0
        with pytest.raises(QueryError, match=r"p00002\.h5: .*scores has shape \(3, 2, 789\), the graph has 790 edges") as e:
            w.sql("SELECT count(*) FROM circuit_scores")
        assert "\n" not in str(e.value)
