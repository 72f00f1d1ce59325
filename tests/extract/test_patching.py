"""extract.stages.patching.metrics == one-patch-at-a-time hooked HF forwards; attribution == finite differences.

The reference is written from the Hugging Face forward only (hooks on the decoder layers, the
final norm, o_proj and the attention/MLP outputs), never from the engine: the source run's
activations are captured with hooks, then each patch is one hooked forward of the destination.
Tolerance: 1e-4 on float32 logits relative to max(1, max |logit|), the project's invariant
tolerance. Tiny Qwen2 (GQA 6:1, q/k/v biases) and Llama (o_proj bias) with words of different
token lengths, and a sample of the embedded SmolLM2's grid.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import h5py
import numpy as np
import pytest
import torch

from extract.config import ConfigError, ExtractConfig
from extract.models.loading import Adapter, load_model
from extract.stages.base import Loaded, PlanInput, write_shard
from extract.stages.patching.grid import Patch, attribute, plan, record, run_patches
from extract.stages.patching.metrics import ld_tokens, patch_direction
from extract.stages.patching.pairs import UNPATCHABLE, Pair, align, build_pairs, parse_pairs
from extract.stages.patching.stage import PatchingStage, pair_shard
from extract.stages.prompts import Prompt, build_prompts
from store.schema import PATCHING_DIR, PT, prompt_shard_name
from store.schema import PatchKind as K
from store.warehouse import WarehouseWriter

TOL = 1e-4
WORDS = ["cat", "xylophone"]
TEMPLATES = ("repeat the following word: {word}", "echo the following word: {word}",
             "please say the word {word}")


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) / max(1.0, float(b.abs().max()))


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model, tok, _ = load_model(str(tiny_model_dir), device="cpu", progress=False)
    return Adapter(model), build_prompts(tok, WORDS, TEMPLATES)


# -- the independent reference: hooked HF forwards ------------------------------------------


def _point(ad: Adapter, kind: K, layer: int):
    """(module, hook type) where a kind's activation is read and written in the HF model."""
    L = ad.arch.n_layers
    if kind in (K.RESID, K.RESID_ALL):
        return (ad.final_norm if layer == L else ad.layers[layer]), "pre"
    if kind in (K.HEAD, K.HEAD_ALL):
        return ad.o_proj(layer), "pre_o"
    if kind == K.ATTN:
        mod, is_tuple = ad.attn_point(layer)
        return mod, "post_tuple" if is_tuple else "post"
    return ad.mlp_point(layer), "post"


@contextmanager
def _hook(ad: Adapter, kind: K, layer: int, fn):
    """fn(x (1, T, X)) -> x' applied at the point; fn may also just read x."""
    mod, how = _point(ad, kind, layer)
    if how == "pre":
        h = mod.register_forward_pre_hook(lambda m, args, kw: ((fn(args[0]), *args[1:]), kw) if args
                                          else (args, {**kw, "hidden_states": fn(kw["hidden_states"])}),
                                          with_kwargs=True)
    elif how == "pre_o":
        h = mod.register_forward_pre_hook(lambda m, args: (fn(args[0]),))
    elif how == "post_tuple":
        h = mod.register_forward_hook(lambda m, args, out: (fn(out[0]), *out[1:]))
    else:
        h = mod.register_forward_hook(lambda m, args, out: fn(out))
    try:
        yield
    finally:
        h.remove()


_CAPTURED: dict[tuple, torch.Tensor] = {}


@torch.no_grad()
def _capture(ad: Adapter, p: Prompt, kind: K, layer: int) -> torch.Tensor:
    """The source's activation at a point, (T, X), from a hooked HF forward (cached)."""
    key = (id(ad), p.input_ids, _point(ad, kind, layer)[1], layer)
    if key not in _CAPTURED:
        got = {}

        def read(x):
            got["x"] = x[0].clone()
            return x

        with _hook(ad, kind, layer, read):
            ad.model(torch.tensor([p.input_ids]), logits_to_keep=1)
        _CAPTURED[key] = got["x"]
    return _CAPTURED[key]


@torch.no_grad()
def _hooked(ad: Adapter, src: Prompt, dst: Prompt, pt: Patch) -> torch.Tensor:
    """The destination's last-position logits with one patch, from one hooked HF forward."""
    ids = torch.tensor([dst.input_ids])
    if pt.kind == K.NOTHING:
        return ad.model(ids, logits_to_keep=1).logits[0, -1].float()
    s = _capture(ad, src, pt.kind, pt.layer)
    hd = ad.arch.head_dim
    sl = slice(pt.head * hd, (pt.head + 1) * hd) if pt.head >= 0 else slice(None)

    def write(x):
        x = x.clone()
        for t, j in zip(pt.dst, pt.src, strict=True):
            x[0, t, sl] = s[j, sl]
        return x

    with _hook(ad, pt.kind, pt.layer, write):
        return ad.model(ids, logits_to_keep=1).logits[0, -1].float()


# -- alignment ------------------------------------------------------------------------------


def test_alignment_by_role(setup):
    _, prompts = setup
    by = {(p.template_index, p.word): p for p in prompts}
    for w in WORDS:
        a, b, c = by[(0, w)], by[(1, w)], by[(2, w)]
        al = align(b, a)
        P = al.shared_prefix
        assert a.input_ids[:P] == b.input_ids[:P] and a.input_ids[P] != b.input_ids[P]
        for t, j in enumerate(al.dst_to_src):
            if j >= 0 and t >= P:
                assert b.roles[t] == a.roles[j]
        # the tail (word, chat end) aligns from the end: identical tokens
        assert all(b.input_ids[-k] == a.input_ids[al.dst_to_src[-k]] for k in range(1, 4))
        # a template of another shape: the middles differ in length -> unpatchable, never guessed
        al2 = align(c, a)
        if c.n_tokens != a.n_tokens:
            assert al2.unpatchable and all(al2.dst_to_src[t] == UNPATCHABLE for t in al2.unpatchable)
        assert all(c.input_ids[t] == a.input_ids[j] for t, j in enumerate(al2.dst_to_src)
                   if j >= 0 and t >= len(c.input_ids) - 3)


def test_parse_pairs():
    assert parse_pairs(None, 2) == ((0, 1),)
    assert parse_pairs("0:1,0:2", 3) == ((0, 1), (0, 2))
    for bad in ("0:0", "0:3", "x", "0:1,1:0"):
        with pytest.raises(ConfigError, match="^`patch_pairs`: "):
            parse_pairs(bad, 3)
    with pytest.raises(ConfigError, match="needs at least two templates"):
        parse_pairs(None, 1)


# -- the grid against hooked forwards ----------------------------------------------------------


@pytest.mark.parametrize("tpl", [(0, 1), (0, 2)])
def test_batched_grid_equals_hooked_forwards(setup, tpl):
    """Every patch of both directions: "cat" for 0:1 (equal lengths), "xylophone" for 0:2 (the
    middles differ in length: unpatchable positions, a shifted tail)."""
    ad, prompts = setup
    pairs = [p for p in build_pairs(prompts, [tpl]) if p.word == ("cat" if tpl == (0, 1) else "xylophone")]
    rope = ad.rope(max(p.n_tokens for p in prompts))
    worst = 0.0
    for pr in pairs:
        for r in (0, 1):
            s, d = pr.direction(r)
            al = align(d, s)
            src, _ = record(ad, s.input_ids, rope)
            dst, _ = record(ad, d.input_ids, rope)
            pts = plan(ad.arch.n_layers, ad.arch.n_heads, al.dst_to_src, al.shared_prefix, d.input_ids,
                       s.input_ids)
            kinds = {p.kind for p in pts}
            assert kinds >= {K.NOTHING, K.RESID, K.ATTN, K.MLP, K.HEAD, K.HEAD_ALL}
            got = run_patches(ad, dst, src, pts, rope)
            for i, pt in enumerate(pts):
                worst = max(worst, _err(got[i], _hooked(ad, s, d, pt)))
    assert worst <= TOL, worst


def test_invariants_nothing_and_embeddings(setup):
    """Patching nothing is the destination; every position at boundary 0 is the source (equal
    lengths), or a hybrid that is neither (different lengths: the check does not apply)."""
    ad, prompts = setup
    rope = ad.rope(max(p.n_tokens for p in prompts))
    for pr in build_pairs(prompts, [(0, 1)]):
        s, d = pr.direction(0)
        assert s.n_tokens == d.n_tokens
        res = patch_direction(ad, s.input_ids, d.input_ids, align(d, s), d.candidates[0][1], rope)
        kinds = [p.kind for p in res["patches"]]
        with torch.no_grad():
            ref_s = ad.model(torch.tensor([s.input_ids])).logits[0, -1].float()
            ref_d = ad.model(torch.tensor([d.input_ids])).logits[0, -1].float()
        assert _err(res["checks"][K.RESID_ALL], ref_s) <= TOL
        assert _err(res["checks"][K.NOTHING], ref_d) <= TOL
        m = res["metrics"]
        i_all = kinds.index(K.RESID_ALL)
        assert abs(float(m[PT.RECOVERY][i_all]) - 1) < 1e-3
        assert float(m[PT.KL_SOURCE][i_all]) < 1e-6
        assert abs(float(m[PT.RECOVERY][kinds.index(K.NOTHING)])) < 1e-3
        # the residual at the last position and boundary L is the source's final residual
        i_last = next(i for i, p in enumerate(res["patches"])
                      if p.kind == K.RESID and p.layer == ad.arch.n_layers and p.dst == (d.n_tokens - 1,))
        assert abs(float(m[PT.RECOVERY][i_last]) - 1) < 1e-3 and float(m[PT.KL_SOURCE][i_last]) < 1e-6


def test_metrics_against_numpy(setup):
    ad, prompts = setup
    pr = build_pairs(prompts, [(0, 1)])[0]
    s, d = pr.direction(1)
    rope = ad.rope(max(p.n_tokens for p in prompts))
    tgt = d.candidates[1][1]
    res = patch_direction(ad, s.input_ids, d.input_ids, align(d, s), tgt, rope)
    lg = run_patches(ad, res["dst"], res["src"], res["patches"], rope).double().numpy()
    ls, ldd = res["src"].logits.double().numpy(), res["dst"].logits.double().numpy()
    t0, t1 = res["toks"]
    if res["rule"] == "top1":
        assert (t0, t1) == (ls.argmax(), ldd.argmax())
    else:
        assert t0 == tgt and ls.argmax() == ldd.argmax()

    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    m = res["metrics"]
    ld = lg[:, t0] - lg[:, t1]
    rec = (ld - (ldd[t0] - ldd[t1])) / ((ls[t0] - ls[t1]) - (ldd[t0] - ldd[t1]))
    np.testing.assert_allclose(m[PT.RECOVERY].numpy(), rec, rtol=1e-4, atol=1e-4)
    kl = (np.exp(logp(ls)) * (logp(ls) - logp(lg))).sum(-1)
    np.testing.assert_allclose(m[PT.KL_SOURCE].numpy(), np.maximum(kl, 0), atol=1e-5)
    np.testing.assert_allclose(m[PT.TARGET_PROB].numpy(), np.exp(logp(lg))[:, tgt], atol=1e-6)
    assert (m[PT.TOP1_ID].numpy() == lg.argmax(-1)).all()


# -- attribution ------------------------------------------------------------------------------


def test_attribution_equals_finite_difference(tiny_qwen2_dir):
    """grad . delta == d/de LD(dest + e * delta) at e = 0, central differences in float64."""
    model, tok, _ = load_model(str(tiny_qwen2_dir), device="cpu", progress=False)
    model = model.double()
    ad = Adapter(model)
    prompts = build_prompts(tok, ["cat"], TEMPLATES[:2])
    pr = build_pairs(prompts, [(0, 1)])[0]
    s, d = pr.direction(0)
    al = align(d, s)
    rope = ad.rope(d.n_tokens)
    src, _ = record(ad, s.input_ids, rope)
    dst0, _ = record(ad, d.input_ids, rope)
    t0, t1, _ = ld_tokens(src.logits, dst0.logits, d.candidates[0][1])
    dst, grads = record(ad, d.input_ids, rope, grad=True, ld=lambda lg: lg[t0] - lg[t1])
    pts = plan(ad.arch.n_layers, ad.arch.n_heads, al.dst_to_src, al.shared_prefix, d.input_ids, s.input_ids)
    att = attribute(ad, dst, src, grads, pts)
    rng = random.Random(0)
    sample = [i for i, p in enumerate(pts) if p.kind != K.NOTHING]
    sample = sorted(rng.sample(sample, 24))
    hd = ad.arch.head_dim
    eps = 4e-2
    for i in sample:
        pt = pts[i]
        xs = _capture(ad, s, pt.kind, pt.layer)
        sl = slice(pt.head * hd, (pt.head + 1) * hd) if pt.head >= 0 else slice(None)

        def ld_at(e, pt=pt, xs=xs, sl=sl):
            def write(x):
                x = x.clone()
                for t, j in zip(pt.dst, pt.src, strict=True):
                    x[0, t, sl] = x[0, t, sl] + e * (xs[j, sl] - x[0, t, sl])
                return x
            with torch.no_grad(), _hook(ad, pt.kind, pt.layer, write):
                lg = ad.model(torch.tensor([d.input_ids]), logits_to_keep=1).logits[0, -1]
            return float(lg[t0] - lg[t1])

        # Richardson-extrapolated central differences: O(eps^4) truncation, while the float32
        # softmax inside HF's (and our) attention keeps the rounding noise at ~1e-7 / eps
        d1 = (ld_at(eps) - ld_at(-eps)) / (2 * eps)
        d2 = (ld_at(eps / 2) - ld_at(-eps / 2)) / eps
        fd = (4 * d2 - d1) / 3
        assert abs(float(att[i]) - fd) <= 1e-4 * max(1.0, abs(fd)), (pt, float(att[i]), fd)


# -- shards -------------------------------------------------------------------------------------


def test_patching_stage_writes_shards_and_resumes(setup, tmp_path):
    ad, prompts = setup
    if ad.arch.model_type != "llama":
        pytest.skip("shards are family-independent: written once (the engine is checked on both families)")
    w = WarehouseWriter.create(tmp_path / "w", {"fingerprint": "x", "fingerprint_parts": {}}, resume=False)
    targets = {p.index: p.candidates[0][1] for p in prompts}
    refs = {p.index: ad.model(torch.tensor([p.input_ids])).logits[0, -1].float().detach()
            for p in prompts}
    cfg = ExtractConfig(out=tmp_path / "w", templates=TEMPLATES, ablation=(), patching=True,
                        patch_pairs=parse_pairs("0:1,0:2", 3), progress=False)
    model = Loaded(cfg, ad, None, prompts, "x")
    stage = PatchingStage()
    plan = PlanInput(cfg, prompts, ad.arch, 32, w.done)
    jobs = stage.plan(plan)
    assert len(jobs) == 4
    pairs = stage.pairs(cfg, prompts)
    rope = ad.rope(max(max(p.a.n_tokens, p.b.n_tokens) for p in pairs))
    for job in jobs:
        (pr,) = [p for p in pairs if (p.a.index, p.b.index) == job.members]
        write_shard(w, pair_shard(model, pr, targets, refs, rope, lambda n: None))
    pr: Pair = pairs[0]
    path = tmp_path / "w" / PATCHING_DIR / pr.name / prompt_shard_name(pr.a.index)
    with h5py.File(path, "r") as f:
        val = f[PT.VALIDATION.name][()]
        assert val["passed"].all() and len(val) == 3
        assert set(f[PT.DIRECTION.name][()]) == {0, 1}
        assert f.attrs["shared_prefix"] == align(pr.b, pr.a).shared_prefix
        mtime = path.stat().st_mtime_ns
    assert stage.plan(plan) == []  # resumable: a pair with its shard is not rerun
    assert path.stat().st_mtime_ns == mtime
    # pair 0:2 with lengths that differ: the source check is recorded as not applicable
    p2 = pairs[2]
    with h5py.File(tmp_path / "w" / PATCHING_DIR / p2.name / prompt_shard_name(p2.a.index), "r") as f:
        notes = [x.decode() if isinstance(x, bytes) else x for x in f.attrs["embed_all_check"]]
        if p2.a.n_tokens != p2.b.n_tokens:
            assert all(n.startswith("not applicable") for n in notes)


def test_smollm2_sample_equals_hooked_forwards(smollm2_dir):
    """The embedded model: 3 patches of every kind (random, fixed seed) in both directions."""
    model, tok, _ = load_model(str(smollm2_dir), device="cpu", progress=False)
    ad = Adapter(model)
    prompts = build_prompts(tok, ["cat"], TEMPLATES[:2])
    pr = build_pairs(prompts, [(0, 1)])[0]
    rope = ad.rope(max(p.n_tokens for p in prompts))
    rng = random.Random(1)
    worst = 0.0
    for r in (0, 1):
        s, d = pr.direction(r)
        al = align(d, s)
        src, _ = record(ad, s.input_ids, rope)
        dst, _ = record(ad, d.input_ids, rope)
        pts = plan(ad.arch.n_layers, ad.arch.n_heads, al.dst_to_src, al.shared_prefix, d.input_ids, s.input_ids)
        sample = []
        for kind in K:
            of = [p for p in pts if p.kind == kind]
            sample += rng.sample(of, min(3, len(of)))
        got = run_patches(ad, dst, src, sample, rope)
        for i, pt in enumerate(sample):
            worst = max(worst, _err(got[i], _hooked(ad, s, d, pt)))
    assert worst <= TOL, worst
