"""Attention-sink views and analyses on real extractions, against independent numpy.

A tiny Llama (GQA, biases) and the embedded SmolLM2 are extracted with the sink ablation
modes; then, from the stored tensors and the model's weights only:
- norm-weighted attention: each key's part of the head's output, a_ij * (W_O^h v_j) as a
  D-vector from numpy (v from the stored residual and the weights), its norm over the sum;
- Gu et al.'s sink share from the stored attention patterns;
- first-token norms per layer from the stored norms (themselves checked in
  tests/extract/test_sink_captures.py) and massive activations from the stored residuals;
- the sink-ablation summary from the ablation view; the lens at position 0 from the shard.
Tolerance: 1e-4 relative (1e-5 absolute on shares in [0, 1]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from extract.config import ExtractConfig
from extract.models.loading import load_model
from extract.pipeline.run import extract
from query import Warehouse
from store import F, WarehouseReader

MODES = ("zero", "sink", "sink_norenorm")


@pytest.fixture(scope="module")
def tiny_wh(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sinkwh") / "w"
    s = extract(ExtractConfig(out=out, model=str(tiny_llama_dir), words=("cat", "dog", "xylophone"),
                              ablation=MODES, progress=False), log=lambda m: None)
    assert not s.failed, s.validation
    return out


@pytest.fixture(scope="module")
def smol_wh(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sinkwh_smol") / "w"
    s = extract(ExtractConfig(out=out, words=("cat", "dog"), ablation=("sink", "sink_norenorm"),
                              ablate_positions="last", ablate_layers=(0, 1, 2), progress=False),
                log=lambda m: None)
    assert not s.failed, s.validation
    return out


def _stored(path: Path):
    with WarehouseReader(path) as r:
        out = {}
        for p in r.prompt_indices():
            out[p] = {f.name: r.read(f, p) for f in (F.RESID, F.ATTN_PATTERN, F.VALUE_OUT_NORM, F.VALUE_NORM,
                                                     F.KEY_NORM, F.QUERY_NORM, F.POSITION_ROLE,
                                                     F.LENS_FIRST_TOPK_IDS, F.LENS_FIRST_TOPK_PROBS)}
        return out


def _shares_numpy(model, resid: np.ndarray, pattern: np.ndarray, layer: int) -> np.ndarray:
    """(H, T, T) share of each key in the norm of head h's output: ||a_ij W_O^h v_j|| / sum_j."""
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // H
    lay = model.model.layers[layer]
    ln = lay.input_layernorm
    x = resid[layer].astype(np.float64)
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + ln.variance_epsilon) * ln.weight.detach().double().numpy()
    v = x @ lay.self_attn.v_proj.weight.detach().double().numpy().T
    if lay.self_attn.v_proj.bias is not None:
        v = v + lay.self_attn.v_proj.bias.detach().double().numpy()
    w_o = lay.self_attn.o_proj.weight.detach().double().numpy()
    out = np.zeros((H, x.shape[0], x.shape[0]))
    for h in range(H):
        g = h // (H // KV)
        vec = v[:, g * hd : (g + 1) * hd] @ w_o[:, h * hd : (h + 1) * hd].T  # (T, D) = W_O^h v_j
        parts = np.linalg.norm(pattern[layer, h][:, :, None] * vec[None], axis=-1)  # (T q, T k)
        out[h] = parts / parts.sum(-1, keepdims=True)
    return out


def test_norm_weighted_attention_equals_numpy(tiny_wh, tiny_llama_dir):
    model, _, _ = load_model(str(tiny_llama_dir), device="cpu", progress=False)
    st = _stored(tiny_wh)
    with Warehouse(tiny_wh) as wh:
        an = wh.sql("SELECT * FROM attention_norm ORDER BY prompt, layer, head, query_pos, key_pos")
        fs = wh.sql("SELECT * FROM first_token_share ORDER BY prompt, layer, head, query_pos")
        one = wh.sql("SELECT * FROM first_token_share WHERE layer = 1 AND head = 2 AND query_role = 4")
    L = model.config.num_hidden_layers
    for p, s in st.items():
        T = s["resid"].shape[1]
        for layer in range(L):
            share = _shares_numpy(model, s["resid"], s["attn_pattern"], layer)  # (H, T, T)
            rows = an.filter((an["prompt"] == p) & (an["layer"] == layer))
            qi, ki = np.tril_indices(T)
            np.testing.assert_allclose(rows["norm_share"].to_numpy(), share[:, qi, ki].reshape(-1), atol=1e-5)
            np.testing.assert_allclose(rows["weight"].to_numpy(), s["attn_pattern"][layer][:, qi, ki].reshape(-1),
                                       atol=1e-7)
            f = fs.filter((fs["prompt"] == p) & (fs["layer"] == layer))
            np.testing.assert_allclose(f["norm_share_first"].to_numpy(), share[:, :, 0].reshape(-1), atol=1e-5)
            np.testing.assert_allclose(f["weight_first"].to_numpy(), s["attn_pattern"][layer][:, :, 0].reshape(-1))
    assert one.height == len(st)  # pushed-down filters: one row per prompt
    # shares of one query sum to 1
    sums = an.group_by(["prompt", "layer", "head", "query_pos"]).agg(pl.col("norm_share").sum().alias("s"))
    np.testing.assert_allclose(sums["s"].to_numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.3, None])
def test_sink_share_equals_numpy(tiny_wh, threshold):
    st = _stored(tiny_wh)
    alpha = np.stack([s["attn_pattern"][..., 0].mean(-1) for s in st.values()])  # (N, L, H)
    median = threshold is None
    if median:  # the tiny random model has no 0.3-sinks: a threshold that splits its heads
        threshold = float(np.median(alpha))
    with Warehouse(tiny_wh) as wh:
        got = wh.run_analysis("sink_share", threshold=threshold)
    per_layer = (alpha > threshold).mean(-1).mean(0)  # (L,)
    overall = (alpha > threshold).reshape(alpha.shape[0], -1).mean(-1).mean()
    layers = got.filter(got["layer"].is_not_null()).sort("layer")
    np.testing.assert_allclose(layers["sink_share"].to_numpy(), per_layer, atol=1e-12)
    np.testing.assert_allclose(layers["mean_alpha"].to_numpy(), alpha.mean((0, 2)), atol=1e-6)
    total = got.filter(got["layer"].is_null())
    np.testing.assert_allclose(total["sink_share"][0], overall, atol=1e-12)
    assert 0 < overall < 1 or not median


def test_sink_heads_and_norms_equal_numpy(tiny_wh):
    st = _stored(tiny_wh)
    with Warehouse(tiny_wh) as wh:
        heads = wh.run_analysis("sink_heads").sort(["layer", "head"])
        every = wh.run_analysis("sink_heads", query_role=None, per_prompt=True)
        norms = wh.run_analysis("sink_norms").sort("layer")
    w_last = np.stack([s["attn_pattern"][:, :, -1, 0] for s in st.values()])  # (N, L, H)
    np.testing.assert_allclose(heads["weight_first"].to_numpy(), w_last.mean(0).reshape(-1), atol=1e-6)
    n0 = np.stack([s["value_out_norm"][:, :, 0] for s in st.values()])
    np.testing.assert_allclose(heads["value_out_norm_first"].to_numpy(), n0.mean(0).reshape(-1), rtol=1e-5)
    assert every["prompt"].null_count() == 0 and every.height == len(st) * w_last.shape[1] * w_last.shape[2]
    for r in every.iter_rows(named=True):  # per prompt, every query position
        a = st[r["prompt"]]["attn_pattern"][r["layer"], r["head"], :, 0].mean()
        assert abs(r["weight_first"] - a) < 1e-6
    for name in ("key_norm", "value_norm", "value_out_norm", "query_norm"):
        first = np.mean([s[name][:, :, 0].mean(-1) for s in st.values()], axis=0)  # (L,)
        other = np.concatenate([s[name][:, :, 1:].reshape(s[name].shape[0], -1) for s in st.values()], axis=1)
        np.testing.assert_allclose(norms[f"{name}_first"].to_numpy(), first, rtol=1e-5)
        np.testing.assert_allclose(norms[f"{name}_other"].to_numpy(), other.mean(-1), rtol=1e-5)


def _massive_numpy(st, abs_min: float, ratio_min: float) -> dict[tuple[int, int], dict]:
    out: dict[tuple[int, int], dict] = {}
    for p, s in st.items():
        r = s["resid"].astype(np.float64)  # (B, T, D)
        med = np.median(np.abs(r).reshape(r.shape[0], -1), axis=-1)  # (B,) whole hidden state
        rank = np.argsort(np.argsort(-np.abs(r), axis=-1, kind="stable"), axis=-1)  # 0 = largest |value|
        hit = (np.abs(r) > abs_min) & (np.abs(r) > ratio_min * med[:, None, None]) & (rank < 8)
        for b, t, d in zip(*np.nonzero(hit), strict=True):
            o = out.setdefault((int(d), int(t)), {"layers": set(), "prompts": set(), "max_abs": 0.0})
            o["layers"].add(int(b) - 1)
            o["prompts"].add(p)
            o["max_abs"] = max(o["max_abs"], abs(float(r[b, t, d])))
    return out


def test_massive_activations_tiny(tiny_wh):
    st = _stored(tiny_wh)
    ref = _massive_numpy(st, 0.5, 4.0)
    assert ref, "choose thresholds that select something"
    with Warehouse(tiny_wh) as wh:
        got = wh.run_analysis("massive_activations", abs_min=0.5, ratio_min=4.0)
    assert {(r["dim"], r["position"]) for r in got.iter_rows(named=True)} == set(ref)
    for r in got.iter_rows(named=True):
        o = ref[(r["dim"], r["position"])]
        assert r["first_layer"] == min(o["layers"]) and r["last_layer"] == max(o["layers"])
        assert r["n_prompts"] == len(o["prompts"]) and r["n_layers"] == len(o["layers"])
        assert abs(r["max_abs"] - o["max_abs"]) <= 1e-4 * max(1.0, o["max_abs"])


def test_sink_ablation_summary(tiny_wh):
    with Warehouse(tiny_wh) as wh:
        abl = wh.sql("SELECT a.*, a.clean_top1_id AS clean_top1 FROM ablation a WHERE mode = 'sink'")
        got = wh.run_analysis("sink_ablation", mode="sink")
        kinds = set(wh.sql("SELECT DISTINCT mode, unit_kind FROM ablation").iter_rows())
    assert ("sink", "mlp") not in kinds and ("sink", "all_heads") in kinds and ("zero", "attn") in kinds
    for r in got.iter_rows(named=True):
        sel = abl.filter((abl["layer"] == r["layer"]) & (
            abl["head"].is_null() if r["head"] is None else abl["head"] == r["head"]))
        assert sel.height == r["n_prompts"] > 0
        assert abs(sel["logit_diff"].mean() - r["mean_logit_diff"]) < 1e-5
        assert abs(sel["kl"].mean() - r["mean_kl"]) < 1e-6
        changed = (sel["top1_id"] != sel["clean_top1"]).mean()  # the engine's clean run is the reference
        assert abs(changed - r["top1_changed"]) < 1e-12
    assert got["mean_logit_diff"].abs().max() > 1e-3


def test_smollm2_massive_activation_and_lens(smol_wh):
    st = _stored(smol_wh)
    ref = _massive_numpy(st, 100.0, 1000.0)
    with Warehouse(smol_wh) as wh:
        got = wh.run_analysis("massive_activations")
        lens = wh.sql("SELECT * FROM lens_first ORDER BY prompt, boundary, k")
        share = wh.run_analysis("sink_share")
        abl = wh.run_analysis("sink_ablation", mode="sink_norenorm")
    assert {(r["dim"], r["position"]) for r in got.iter_rows(named=True)} == set(ref)
    assert ref and all(pos == 0 for _, pos in ref), "SmolLM2's massive activations sit on position 0"
    top = got.row(0, named=True)
    assert top["max_abs"] > 1e4 and top["role_name"] == "first"
    for p, s in st.items():
        rows = lens.filter(lens["prompt"] == p)
        np.testing.assert_array_equal(rows["token_id"].to_numpy(), s["lens_first_topk_ids"].reshape(-1))
        np.testing.assert_allclose(rows["prob"].to_numpy(), s["lens_first_topk_probs"].reshape(-1))
    assert share.filter(share["layer"].is_null())["sink_share"][0] > 0.3
    assert set(abl["layer"].to_list()) == {0, 1, 2}
