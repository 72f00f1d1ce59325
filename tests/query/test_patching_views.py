"""Patching end to end on a tiny Llama: `extract --patching` -> shards -> views -> analyses -> report.

Views are checked against the raw shard arrays; analyses against Polars recomputations from
the view; the report section is built and its findings quote the analyses' numbers.
"""

from __future__ import annotations

import h5py
import numpy as np
import polars as pl
import pytest

from extract.config import ExtractConfig
from extract.pipeline.run import extract
from query import Warehouse
from store.schema import PATCHING_DIR, PT, prompt_shard_name

WORDS = ("cat", "xylophone")
TEMPLATES = ("repeat the following word: {word}", "echo the following word: {word}",
             "please say the word {word}")


@pytest.fixture(scope="module")
def wh_dir(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pw") / "w"
    cfg = ExtractConfig(out=out, model=str(tiny_llama_dir), device="cpu", words=WORDS, templates=TEMPLATES,
                        patching=True, patch_pairs=((0, 1), (0, 2)), progress=False)
    s = extract(cfg, log=lambda m: None)
    assert not s.failed, s.validation
    assert {"patch_clean_is_model", "patch_nothing_is_dest", "patch_embed_all_is_source"} <= set(s.validation)
    return out


def test_views_match_the_shards(wh_dir):
    with Warehouse(wh_dir) as wh:
        v = wh.sql("SELECT * FROM patching ORDER BY pair, word, direction")
        pairs = wh.sql("SELECT * FROM patching_pairs")
        pos = wh.sql("SELECT * FROM patching_positions")
        val = wh.sql("SELECT * FROM patching_validation")
        prompts = wh.sql("SELECT prompt, word, template_index, n_tokens FROM prompts")
    assert val["passed"].all()
    assert set(pairs["pair"]) == {"0-1", "0-2"} and pairs.height == 2 * 2 * len(WORDS)
    total = 0
    for pair in ("0-1", "0-2"):
        for word in WORDS:
            a = prompts.filter((pl.col("word") == word) & (pl.col("template_index") == 0))["prompt"][0]
            with h5py.File(wh_dir / PATCHING_DIR / pair / prompt_shard_name(a), "r") as f:
                rec = f[PT.RECOVERY.name][()]
                att = f[PT.ATTRIBUTION.name][()]
                total += rec.size
                sel = v.filter((pl.col("pair") == pair) & (pl.col("word") == word))
                np.testing.assert_array_equal(np.sort(sel["recovery"].to_numpy()), np.sort(rec))
                np.testing.assert_array_equal(np.sort(sel["attribution"].to_numpy()), np.sort(att))
                P = int(f.attrs["shared_prefix"])
            p = pos.filter((pl.col("pair") == pair) & (pl.col("word") == word))
            assert (p.filter(pl.col("dst_pos") < P)["status"] == "shared_prefix").all()
            # nothing at the shared prefix is patched
            assert sel.filter(pl.col("dst_pos") < P).height == 0
            # unpatchable positions are never patched
            un = p.filter(pl.col("status") == "unpatchable")
            for r, t in un.select("direction", "dst_pos").iter_rows():
                assert sel.filter((pl.col("direction") == r) & (pl.col("dst_pos") == t)).height == 0
    assert v.height == total
    # 0-2: "please say the word" differs in shape from "repeat the following word:"
    assert pos.filter((pl.col("pair") == "0-2") & (pl.col("status") == "unpatchable")).height > 0
    # check rows: nothing recovers 0, the full embedding patch recovers 1 (equal lengths)
    assert v.filter(pl.col("kind") == "nothing")["recovery"].abs().max() < 1e-3
    full = v.filter((pl.col("kind") == "resid_all") & (pl.col("pair") == "0-1"))
    assert (full["recovery"] - 1).abs().max() < 1e-3


def test_analyses_against_polars(wh_dir):
    with Warehouse(wh_dir) as wh:
        v = wh.sql("SELECT * FROM patching")
        m = wh.run_analysis("patching_recovery_map", kind="attn", direction=1)
        heads = wh.run_analysis("patching_top_heads", top=5)
        attr = wh.run_analysis("patching_attribution")
        worst = wh.run_analysis("patching_disagreements", top=5)
        one = wh.run_analysis("patching_recovery_map", kind="resid", word="cat")
    exp = (v.filter((pl.col("kind") == "attn") & (pl.col("direction") == 1))
           .group_by("pair", "layer", "from_end").agg(pl.col("recovery").mean().alias("e")))
    j = m.join(exp, on=["pair", "layer", "from_end"])
    assert j.height == m.height == exp.height
    np.testing.assert_allclose(j["mean_recovery"], j["e"], rtol=1e-6, atol=1e-6)
    # pooled recovery: each word's recovery weighted by |LD gap|, the gap from patching_pairs' clean LDs
    with Warehouse(wh_dir) as wh:
        pairs = wh.sql("SELECT pair, word, direction, ld_source - ld_dest AS gap FROM patching_pairs")
    pooled = (v.filter((pl.col("kind") == "attn") & (pl.col("direction") == 1)).join(pairs, on=["pair", "word", "direction"])
              .group_by("pair", "layer", "from_end")
              .agg(((pl.col("recovery") * pl.col("gap").abs()).sum() / pl.col("gap").abs().sum()).alias("pooled"),
                   pl.col("gap").abs().min().alias("g")))
    jp = m.join(pooled, on=["pair", "layer", "from_end"])
    assert jp.height == m.height
    np.testing.assert_allclose(jp["pooled_recovery"], jp["pooled"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jp["min_abs_ld_gap"], jp["g"], rtol=1e-6)
    assert set(one["n_words"]) == {1}
    # top heads: ranked by mean head_all recovery; ablation and DLA ranks present (zero ablation ran)
    hv = (v.filter(pl.col("kind") == "head_all").group_by("pair", "direction", "layer", "head")
          .agg(pl.col("recovery").mean().alias("r")))
    for (pair, r), g in heads.group_by("pair", "direction"):
        best = hv.filter((pl.col("pair") == pair) & (pl.col("direction") == r))["r"].max()
        assert abs(g.sort("patching_rank")["mean_recovery"][0] - best) < 1e-6
    assert heads["ablation_rank"].null_count() == 0 and heads["dla_rank"].null_count() == 0
    # attribution vs exact: Pearson recomputed with numpy for one group
    g = v.filter((pl.col("kind") == "head") & (pl.col("layer") == 1) & (pl.col("pair") == "0-1")
                 & (pl.col("direction") == 0))
    row = attr.filter((pl.col("kind") == "head") & (pl.col("layer") == 1) & (pl.col("pair") == "0-1")
                      & (pl.col("direction") == 0))
    assert row["n"][0] == g.height
    np.testing.assert_allclose(row["pearson"][0], np.corrcoef(g["attribution"], g["ld_change"])[0, 1], rtol=1e-4)
    # Spearman with average ranks for ties, every group (ties are common: exact zeros late on)
    ranked = (v.filter(pl.col("kind").is_in(["resid", "attn", "mlp", "head", "head_all"]))
              .with_columns(pl.col("attribution").rank("average").over("pair", "direction", "kind", "layer").alias("ra"),
                            pl.col("ld_change").rank("average").over("pair", "direction", "kind", "layer").alias("re"))
              .group_by("pair", "direction", "kind", "layer").agg(pl.corr("ra", "re").alias("rho")))
    js = attr.join(ranked, on=["pair", "direction", "kind", "layer"])
    assert js.height == attr.height
    both = js.filter(pl.col("rho").is_not_nan() & pl.col("spearman").is_not_null())
    np.testing.assert_allclose(both["spearman"], both["rho"], rtol=1e-6, atol=1e-9)
    err = (v.filter(pl.col("kind").is_in(["resid", "attn", "mlp", "head", "head_all"]))
           .select((pl.col("attribution") - pl.col("ld_change")).abs().max())).item()
    assert abs(abs(worst["error"][0]) - err) < 1e-5


def test_report_section(wh_dir, tmp_path):
    from reports.report import build

    rep = build(wh_dir, words=("cat",))
    sec = next(s for s in rep.sections if s.title == "What makes the templates differ")
    assert sec.charts and sec.tables and not sec.note
    assert any(f.startswith("Residual patching (") for f in rep.findings)
    assert any("Attribution patching vs exact" in f for f in rep.findings)
    with Warehouse(wh_dir) as wh:
        m = wh.run_analysis("patching_recovery_map", kind="resid")
    best = m.filter((pl.col("pair") == "0-1") & (pl.col("direction") == 0)).sort(
        "mean_recovery", descending=True).row(0, named=True)
    assert any(f"largest mean recovery is {best['mean_recovery']:.2f}" in f for f in rep.findings)


def test_resume_skips_finished_pairs(wh_dir, tiny_llama_dir):
    shard = next((wh_dir / PATCHING_DIR / "0-1").glob("p*.h5"))
    before = shard.stat().st_mtime_ns
    cfg = ExtractConfig(out=wh_dir, model=str(tiny_llama_dir), device="cpu", words=WORDS, templates=TEMPLATES,
                        patching=True, patch_pairs=((0, 1), (0, 2)), progress=False, resume=True)
    s = extract(cfg, log=lambda m: None)
    assert s.timings["patching_pairs"] == 0 and shard.stat().st_mtime_ns == before
    other = ExtractConfig(out=wh_dir, model=str(tiny_llama_dir), device="cpu", words=WORDS, templates=TEMPLATES,
                          patching=True, patch_pairs=((0, 1),), progress=False, resume=True)
    from store.warehouse import WarehouseError

    with pytest.raises(WarehouseError, match="patch_pairs"):
        extract(other, log=lambda m: None)
