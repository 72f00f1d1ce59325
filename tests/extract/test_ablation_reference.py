"""One clean reference for every ablation number (issue 8, item 2).

Every number of an ablation shard (logit_diff, KL, top-1 flips, rank changes) is relative to
the ablation engine's own clean forward, stored in the shard (``clean_*``). In bfloat16 that
forward differs from the extraction's HF forward (``prompts.top1_id``/``target_logit``), so
comparing an ablated top-1 with the HF top-1 could count a unit that changes nothing as a
flip. Here every unit is a do-nothing unit (GridSpec's identity hook) in a bfloat16 run: no
flip, no rank change, logit_diff and KL exactly 0. The analyses are checked against the raw
shard arrays.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from extract.config import ExtractConfig
from extract.pipeline.run import extract
from extract.stages.ablation import metrics as abl
from extract.stages.ablation import stage as abl_stage
from query import Warehouse
from store import A, WarehouseReader
from store.schema import ABLATION_DIR

WORDS = ("cat", "dog", "house", "xylophone", "tree", "sun")


def _extract(model_dir, out, monkeypatch=None, **kw):
    extract(ExtractConfig(out=out, model=str(model_dir), words=WORDS, progress=False, max_new_tokens=1,
                          **kw), log=lambda m: None)
    return out


def _raw(r: WarehouseReader, i: int, fld) -> np.ndarray:
    return np.asarray(r.read(fld, i, subdir=ABLATION_DIR))


@pytest.mark.parametrize("positions", ["all", "last"])
def test_bf16_do_nothing_units_never_flip(tiny_model_dir, tmp_path, monkeypatch, positions):
    monkeypatch.setattr(abl_stage, "GridSpec", functools.partial(abl.GridSpec, identity=True))
    out = _extract(tiny_model_dir, tmp_path / "w", dtype="bfloat16", ablation=("zero", "mean"),
                   ablate_positions=positions)
    with Warehouse(out) as wh:
        n = wh.sql("SELECT count(*) AS n FROM ablation")["n"][0]
        assert n > 0
        assert wh.run_analysis("ablation_flips").height == 0
        assert wh.sql("SELECT count(*) AS n FROM ablation WHERE top1_changed OR rank_change <> 0 "
                      "OR logit_diff <> 0 OR kl > 1e-6")["n"][0] == 0
        blocks = wh.run_analysis("block_ablation", mode="mean")
        assert blocks.height > 0 and blocks["frac_top1_changed"].max() == 0.0
        assert blocks["mean_logit_diff"].abs().max() == 0.0
        # the two clean forwards really differ in bfloat16: this is what the reference fixes
        gap = wh.sql("SELECT max(abs(a.clean_target_logit - p.target_logit)) AS g FROM "
                     "(SELECT DISTINCT prompt, clean_target_logit FROM ablation) a "
                     "JOIN prompts p USING (prompt)")["g"][0]
    assert gap > 0, "the engine's and HF's bfloat16 clean logits are expected to differ"


def test_analyses_match_the_raw_arrays(tiny_qwen2_dir, tmp_path):
    out = _extract(tiny_qwen2_dir, tmp_path / "w", ablation=("zero", "mean"), ablate_layers=(0, 2))
    with Warehouse(out) as wh, WarehouseReader(out) as r:
        flips = wh.run_analysis("ablation_flips")
        blocks = {m: wh.run_analysis("block_ablation", mode=m) for m in ("zero", "mean")}
        view = wh.sql("SELECT * FROM ablation")
        expect_flips = set()
        per_block: dict[tuple, list] = {}
        H = int(r.model_attrs()["n_heads"])
        for i in r.ablation_indices():
            f = r.shard(i, ABLATION_DIR)
            modes = [m.decode() if isinstance(m, bytes) else str(m) for m in f.attrs["modes"]]
            layers = list(f.attrs["layers"])
            top1, c_top1 = _raw(r, i, A.TOP1_ID), int(_raw(r, i, A.CLEAN_TOP1_ID))
            tl, ctl = _raw(r, i, A.TARGET_LOGIT), float(_raw(r, i, A.CLEAN_TARGET_LOGIT))
            rank, crank = _raw(r, i, A.TARGET_RANK), int(_raw(r, i, A.CLEAN_TARGET_RANK))
            diff, kl = _raw(r, i, A.LOGIT_DIFF), _raw(r, i, A.KL)
            # one reference: logit_diff is exactly clean_target_logit - target_logit (float32)
            np.testing.assert_array_equal(diff, np.float32(ctl) - tl)
            # the clean reference is the engine's own: rank 0 <=> the clean top-1 is the target
            assert (crank == 0) == (c_top1 == int(r.prompt_attrs(i)["target_id"]))
            for m, mode in enumerate(modes):
                for li, layer in enumerate(layers):
                    for u in range(H + 2):
                        if top1[m, li, u] != c_top1:
                            expect_flips.add((i, mode, int(layer), u))
                        if u >= H:
                            per_block.setdefault((mode, int(layer), "attn" if u == H else "mlp"), []).append(
                                (diff[m, li, u], kl[m, li, u], top1[m, li, u] != c_top1))
                        row = view.filter((view["prompt"] == i) & (view["mode"] == mode)
                                          & (view["layer"] == int(layer)) & (view["unit"] == u)).row(0, named=True)
                        assert row["rank_change"] == rank[m, li, u] - crank
                        assert row["top1_changed"] == (top1[m, li, u] != c_top1)
                        assert row["clean_target_logit"] == ctl and row["clean_top1_id"] == c_top1
    got = {(p, m, la, u) for p, m, la, u in flips.select("prompt", "mode", "layer", "unit").rows()}
    assert got == expect_flips and len(got) > 0, "the random tiny model must flip something"
    for mode, df in blocks.items():
        for row in df.iter_rows(named=True):
            vals = per_block[(mode, row["layer"], row["unit_kind"])]
            assert row["n_prompts"] == len(vals)
            assert row["mean_logit_diff"] == pytest.approx(np.mean([v[0] for v in vals], dtype=np.float64), rel=1e-6)
            assert row["mean_kl"] == pytest.approx(np.mean([v[1] for v in vals], dtype=np.float64), rel=1e-6)
            assert row["frac_top1_changed"] == pytest.approx(np.mean([v[2] for v in vals]))
