"""Every named analysis on a real extraction (tiny Qwen2, with an ablation grid), checked
against numbers computed straight from the HDF5 arrays."""

from __future__ import annotations

import numpy as np
import pytest

from extract.config import ExtractConfig
from extract.pipeline.run import extract
from query import Comparison, Warehouse, is_comparison, list_analyses
from store import INVARIANTS, A, F, WarehouseReader


@pytest.fixture(scope="module")
def real(tiny_qwen2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "w"
    extract(ExtractConfig(out=out, model=str(tiny_qwen2_dir), words=("cat", "dog", "house"),
                          ablation=("zero", "mean", "sink"), progress=False), log=lambda m: None)
    return out


def test_every_analysis_gives_rows_on_a_real_warehouse(real):
    """With a layer every prompt has (block 1), every analysis returns its declared columns and
    rows; ablation_flips counts exactly the stored top-1 tokens that differ from the engine's
    own clean top-1 (the shard's clean reference)."""
    with WarehouseReader(real) as r:
        flips = sum(int((r.read(A.TOP1_ID, i, subdir="ablation")
                         != r.read(A.CLEAN_TOP1_ID, i, subdir="ablation")).sum())
                    for i in r.ablation_indices())
    with Warehouse(real) as wh, Comparison([real]) as one:
        for a in list_analyses():
            params = {p.name: 1 for p in a.params if p.name == "layer" and a.name != "ablation_flips"}
            if a.name == "massive_activations":  # a tiny random model has none at the published thresholds
                params = {"abs_min": 0.0, "ratio_min": 1.0}
            df = (one if is_comparison(a) else wh).run_analysis(a.name, **params)
            assert df.columns == [c[0] for c in a.columns], a.name
            if a.name == "ablation_flips":
                assert df.height == flips
            elif a.name.startswith(("patching_", "circuit_", "taskvec_")):  # no --patching/--circuits/--task-vectors: empty
                assert df.height == 0, a.name
            else:
                assert df.height > 0, a.name


def test_every_invariant_is_in_the_validation_view(real):
    with Warehouse(real) as wh:
        rows = wh.sql("SELECT invariant, count(*) AS n, bool_and(passed) AS ok FROM validation "
                      "GROUP BY invariant ORDER BY invariant").rows()
        summary = wh.run_analysis("validation_summary")
    # the 5 of the extraction + the ablation engine's (the patching ones need --patching)
    checked = sorted(k for k in INVARIANTS if not k.startswith("patch_"))
    assert [r[0] for r in rows] == checked
    assert all(n == 6 and ok for _, n, ok in rows)
    assert summary["n_passed"].to_list() == [6] * len(checked)


def test_numbers_match_the_raw_arrays(real):
    with Warehouse(real) as wh, WarehouseReader(real) as r:
        # emergence: first layer from which the stored target rank stays 0
        em = dict(wh.run_analysis("emergence_layer").select("prompt", "emergence_layer").rows())
        for i in r.prompt_indices():
            ranks = r.read(F.LENS_TARGET_RANK, i)
            if ranks[-1] != 0:
                assert em[i] is None
                continue
            b = len(ranks) - 1
            while b > 0 and ranks[b - 1] == 0:
                b -= 1
            assert em[i] == b - 1
        # cross-template cosine of the last-position residual, per word and layer
        cos = wh.run_analysis("resid_cosine_templates", word="dog")
        pa, pb = cos["prompt_a"][0], cos["prompt_b"][0]
        ra, rb = r.read(F.RESID, pa)[:, -1], r.read(F.RESID, pb)[:, -1]
        expect = (ra * rb).sum(-1) / np.linalg.norm(ra, axis=-1) / np.linalg.norm(rb, axis=-1)
        np.testing.assert_allclose(cos.sort("layer")["cosine"].to_numpy(), expect, rtol=1e-5)
        # ablation view == the shard's arrays (zero mode, layer 1, head 3 of prompt 2)
        got = wh.sql("SELECT logit_diff, kl, target_rank FROM ablation WHERE prompt = 2 AND mode = 'zero' "
                     "AND layer = 1 AND unit = 3").row(0)
        modes = [x.decode() if isinstance(x, bytes) else x for x in r.shard(2, "ablation").attrs["modes"]]
        m = modes.index("zero")
        assert got[0] == pytest.approx(float(r.read(A.LOGIT_DIFF, 2, subdir="ablation")[m, 1, 3]), rel=1e-6)
        assert got[1] == pytest.approx(float(r.read(A.KL, 2, subdir="ablation")[m, 1, 3]), rel=1e-6)
        assert got[2] == int(r.read(A.TARGET_RANK, 2, subdir="ablation")[m, 1, 3])
        # attention mass on position 0 from the last position
        att = wh.run_analysis("first_token_attention_grid").sort(["layer", "head"])
        pats = np.stack([r.read(F.ATTN_PATTERN, i)[:, :, -1, 0] for i in r.prompt_indices()])  # (P, L, H)
        np.testing.assert_allclose(att["mean_mass_first"].to_numpy(), pats.mean(0).reshape(-1), rtol=1e-5)
