"""extract.stages.ablation.metrics == the naive one-unit-at-a-time hooked HF forward (invariant 6).

On the tiny Qwen2 (GQA 6:1, q/k/v biases) and Llama (o_proj bias) models, zero and mean
ablation, all positions and last position; ablating nothing reproduces the clean logits; the
means equal a hook-based computation; the shards hold what the schema says. One SmolLM2 check
on a few layers. Tolerance: 1e-4 on float32 logits, relative to max(1, max |logit|).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from extract.config import ExtractConfig
from extract.models.loading import Adapter, load_model
from extract.stages.ablation import metrics as abl
from extract.stages.ablation.stage import AblationStage, ablate_group
from extract.stages.base import Loaded, PlanInput, write_shard
from extract.stages.prompts import Prompt, build_prompts
from store.schema import ABLATION_DIR, A, prompt_shard_name
from store.warehouse import WarehouseWriter
from tests.extract.hooked import hf_logits, one_unit

TOL = 1e-4
# "xylophone" splits into several tokens: prompts of one template get different lengths.
WORDS = ["cat", "dog", "xylophone"]
TEMPLATES = ("repeat the following word: {word}", "echo the following word: {word}")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    scale = max(1.0, float(b.abs().max()))
    err = float((a.double() - b.double()).abs().max()) / scale
    assert err <= tol, err
    return err


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model, tok, _ = load_model(str(tiny_model_dir), device="cpu", progress=False)
    adapter = Adapter(model)
    prompts = build_prompts(tok, WORDS, TEMPLATES)
    assert len({p.n_tokens for p in prompts if p.template_index == 0}) > 1, "want unequal lengths"
    return adapter, prompts


def _one_unit(adapter: Adapter, layer: int, unit: int, mode: str, means, p: Prompt, last: bool):
    """Hooks removing ONE unit from an unmodified HF forward of p (tests/extract/hooked.py)."""
    return one_unit(adapter, layer, unit, mode, means, [p], last)


def _grid(adapter, prompts, spec, means) -> dict[int, torch.Tensor]:
    """Engine logits per prompt: (L', C, V)."""
    out: dict[int, dict[int, torch.Tensor]] = {}

    def sink(p, li, logits, clean):
        out.setdefault(p.index, {})[li] = logits.clone()

    abl.iter_grid(adapter, prompts, spec, means, sink=sink)
    return {i: torch.stack([d[li] for li in range(len(spec.layers))]) for i, d in out.items()}


def _hf_logits(adapter: Adapter, p: Prompt) -> torch.Tensor:
    return hf_logits(adapter, [p])[0]


def test_ablating_nothing_is_the_clean_run(setup):
    adapter, prompts = setup
    L = adapter.arch.n_layers
    for positions in ("all", "last"):
        spec = abl.GridSpec(("zero",), positions, tuple(range(L)), identity=True)
        got = _grid(adapter, prompts, spec, None)
        for p in prompts:
            ref = _hf_logits(adapter, p)
            assert got[p.index].shape[:2] == (L, adapter.arch.n_heads + 2)
            _close(got[p.index], ref.expand_as(got[p.index]))


def test_means_equal_hooked_capture(setup):
    adapter, prompts = setup
    means = abl.compute_means(adapter, prompts)
    layer = 1
    z_all, a_all, m_all = {}, {}, {}
    point, is_tuple = adapter.attn_point(layer)
    hs = [adapter.o_proj(layer).register_forward_pre_hook(lambda mod, args: z_all.__setitem__("x", args[0][0])),
          point.register_forward_hook(
              lambda mod, args, out: a_all.__setitem__("x", (out[0] if is_tuple else out)[0])),
          adapter.mlp_point(layer).register_forward_hook(lambda mod, args, out: m_all.__setitem__("x", out[0]))]
    try:
        rows: dict[tuple, list] = {}
        for p in prompts:
            _hf_logits(adapter, p)
            km = means.maps[p.template_index]
            for pos, key in enumerate(km.keys(p)):
                rows.setdefault((p.template_index, key), []).append(
                    (z_all["x"][pos], a_all["x"][pos], m_all["x"][pos]))
    finally:
        for h in hs:
            h.remove()
    for (t, key), vals in rows.items():
        for j, table in enumerate((means.z, means.attn, means.mlp)):
            ref = torch.stack([v[j] for v in vals]).double().mean(0)
            _close(table[t][layer][key], ref)
    # the word's tokens are pooled: the multi-token word contributes several rows to one key
    p = next(p for p in prompts if p.word == "xylophone" and p.template_index == 0)
    km = means.maps[0]
    assert len(rows[(0, km.n_pre)]) == sum(1 for q in prompts if q.template_index == 0 for k in km.keys(q)
                                            if k == km.n_pre)
    assert sum(1 for k in km.keys(p) if k == km.n_pre) > 1


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_batched_equals_one_unit_at_a_time(setup, positions, mode):
    adapter, prompts = setup
    a = adapter.arch
    U = a.n_heads + 2
    L = a.n_layers
    means = abl.compute_means(adapter, prompts) if mode == "mean" else None
    spec = abl.GridSpec((mode,), positions, tuple(range(L)))
    got = _grid(adapter, prompts, spec, means)
    # every prompt of one template, every layer, every unit: template 0 in full,
    # template 1 on one prompt (its own prefix group) to keep the loop short
    check = [p for p in prompts if p.template_index == 0] + [prompts[-1]]
    moved = 0.0
    for p in check:
        clean = _hf_logits(adapter, p)
        for layer in range(L):
            for u in range(U):
                with _one_unit(adapter, layer, u, mode, means, p, positions == "last"):
                    ref = _hf_logits(adapter, p)
                _close(got[p.index][layer, u], ref)
                moved = max(moved, float((ref - clean).abs().max()))
    assert moved > 1e-2, "ablations must change the logits, or this test proves nothing"


def test_modes_are_stacked_mode_major(setup):
    adapter, prompts = setup
    L = adapter.arch.n_layers
    U = adapter.arch.n_heads + 2
    means = abl.compute_means(adapter, prompts)
    both = _grid(adapter, prompts[:2], abl.GridSpec(("zero", "mean"), "all", (L - 1,)), means)
    zero = _grid(adapter, prompts[:2], abl.GridSpec(("zero",), "all", (L - 1,)), None)
    mean = _grid(adapter, prompts[:2], abl.GridSpec(("mean",), "all", (L - 1,)), means)
    for i in both:
        _close(both[i][:, :U], zero[i])
        _close(both[i][:, U:], mean[i])


def test_shared_prefix_stops_at_the_word(setup):
    _, prompts = setup
    g = [p for p in prompts if p.template_index == 0]
    P = abl.shared_prefix(g)
    first_word = min(p.roles.index(2) for p in g)
    assert 0 < P <= first_word
    assert len({p.input_ids[:P] for p in g}) == 1
    assert abl.shared_prefix(g[:1]) == g[0].n_tokens - 1  # one prompt: all but the last position


def test_ablation_stage_writes_shards(setup, tmp_path):
    adapter, prompts = setup
    L = adapter.arch.n_layers
    U = adapter.arch.n_heads + 2
    w = WarehouseWriter(tmp_path)
    targets = {p.index: int(p.candidates[0][1]) for p in prompts}
    layers = (0, L - 1)
    cfg = ExtractConfig(out=tmp_path, templates=TEMPLATES, ablation=("zero", "mean"), ablate_positions="all",
                        ablate_layers=layers, top_k=5, progress=False)
    model = Loaded(cfg, adapter, None, prompts[:2], "fp")
    stage = AblationStage()
    plan = PlanInput(cfg, prompts[:2], adapter.arch, 32, w.done)
    jobs = stage.plan(plan)
    assert sorted(i for j in jobs for i in j.todo) == [0, 1]
    reference = {p.index: _hf_logits(adapter, p).numpy() for p in prompts[:2]}  # the model's own
    spec = abl.GridSpec(cfg.ablation, "all", layers)
    for job in jobs:
        for shard in ablate_group(model, job, spec, stage.means(model), targets, reference.__getitem__,
                                  lambda n: None):
            write_shard(w, shard)
    assert stage.plan(plan) == []  # resumable: every shard is on disk
    with h5py.File(tmp_path / ABLATION_DIR / prompt_shard_name(0)) as f:
        for fld in (A.TARGET_LOGIT, A.TARGET_PROB, A.TARGET_RANK, A.LOGIT_DIFF, A.TOP1_ID, A.TOP1_PROB, A.KL):
            assert f[fld.name].shape == (2, len(layers), U), fld.name
        assert f[A.TOPK_IDS.name].shape == (2, len(layers), U, 5)
        assert list(f.attrs["layers"]) == list(layers) and int(f.attrs["n_heads"]) == U - 2
        assert [s.decode() if isinstance(s, bytes) else s for s in f.attrs["modes"]] == ["zero", "mean"]
        kl = f[A.KL.name][()]
        rank = f[A.TARGET_RANK.name][()]
        tl = f[A.TARGET_LOGIT.name][()]
        topk = f[A.TOPK_LOGITS.name][()]
        (check,) = f[A.VALIDATION.name][()]  # invariant 6, first half: removing nothing == model
    assert check["invariant"] == b"ablation_clean_is_model" and check["passed"]
    assert check["rel_err"] <= TOL and check["tolerance"] == 1e-4
    assert (kl >= 0).all() and kl.max() > 0
    assert ((rank == 0) == (tl >= topk[..., 0])).all()
    # the stored numbers are the summary of the engine's logits
    means = abl.compute_means(adapter, prompts)
    g = _grid(adapter, prompts[:1], abl.GridSpec(("zero",), "all", layers), means)[0]  # (L', U, V)
    s = abl.summarise(g[1], _hf_logits(adapter, prompts[0]), targets[0], 5)
    np.testing.assert_allclose(kl[0, 1], s[A.KL].numpy(), rtol=1e-3, atol=1e-6)


def test_smollm2_few_layers(smollm2_dir):
    model, tok, _ = load_model(str(smollm2_dir), device="cpu", progress=False)
    adapter = Adapter(model)
    prompts = build_prompts(tok, ["cat", "dog"], TEMPLATES[:1])
    L = adapter.arch.n_layers
    layers = (L - 8, L - 1)
    for positions in ("all", "last"):
        got = _grid(adapter, prompts, abl.GridSpec(("zero",), positions, layers), None)
        p = prompts[1]
        for li, layer in enumerate(layers):
            for u in (0, adapter.arch.n_heads - 1, adapter.arch.n_heads, adapter.arch.n_heads + 1):
                with _one_unit(adapter, layer, u, "zero", None, p, positions == "last"):
                    ref = _hf_logits(adapter, p)
                _close(got[p.index][li, u], ref)
