"""The batched ablation engine equals the naive one-unit-at-a-time hooked full forward
(invariant 6), on tiny Qwen2 (GQA 6:1, q/k/v biases) and Llama (o_proj bias) models, for zero
and mean ablation at all positions and at the last one; and ablating nothing is the clean run.

Tolerance: 1e-4 on logits relative to max(1, |logit|), float32.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from extract.ablate import (
    KV,
    GridSpec,
    ablate_group,
    clean_run,
    compute_means,
    position_keys,
    prompt_groups,
    run_layers,
    shared_prefix,
)
from extract.models import Adapter, load_model
from extract.prompts import build_prompts

TOL = 1e-4
WORDS = ["cat", "dog", "house", "extraordinarily"]
TEMPLATES = ("repeat the following word: {word}", "echo the following word: {word}")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    scale = max(1.0, float(b.abs().max()))
    err = float((a.double() - b.double()).abs().max()) / scale
    assert err <= tol, err


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model, tok, _ = load_model(str(tiny_model_dir), progress=False)
    adapter = Adapter(model)
    prompts = build_prompts(tok, WORDS, TEMPLATES)
    return adapter, prompts


@contextmanager
def _naive_hooks(adapter: Adapter, layer: int, unit: int, mode: str, means, prompt, last_only: bool):
    """Hooks for ONE unit on an unmodified HF forward: what common tooling does."""
    a = adapter.arch
    H, hd = a.n_heads, a.head_dim
    keys = position_keys(prompt)
    T = prompt.n_tokens
    sel = slice(T - 1, T) if last_only else slice(0, T)
    if mode == "mean":
        z, at, ml = means.for_positions(prompt.template_index, keys, layer)
    else:
        z = torch.zeros(T, H * hd)
        at = torch.zeros(T, a.d_model)
        ml = torch.zeros(T, a.d_model)
    lay = adapter.layers[layer]
    hs = []
    if unit < H:
        def pre(mod, args):
            x = args[0].clone()
            x[0, sel, unit * hd:(unit + 1) * hd] = z[sel, unit * hd:(unit + 1) * hd]
            return (x,)
        hs.append(lay.self_attn.o_proj.register_forward_pre_hook(pre))
    elif unit == H:
        def post(mod, args, out):
            o = out[0].clone()
            o[0, sel] = at[sel]
            return (o, *out[1:])
        hs.append(lay.self_attn.register_forward_hook(post))
    else:
        def post_mlp(mod, args, out):
            o = out.clone()
            o[0, sel] = ml[sel]
            return o
        hs.append(lay.mlp.register_forward_hook(post_mlp))
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def _naive(adapter, prompt, layer, unit, mode, means, last_only) -> torch.Tensor:
    ids = torch.tensor(prompt.input_ids)[None]
    with torch.no_grad(), _naive_hooks(adapter, layer, unit, mode, means, prompt, last_only):
        return adapter.model(ids).logits[0, -1].float()


def test_ablating_nothing_is_the_clean_run(setup):
    adapter, prompts = setup
    for g in prompt_groups(prompts, 8):
        ids = torch.tensor([p.input_ids for p in g])
        clean = clean_run(adapter, ids)
        with torch.no_grad():
            ref = adapter.model(ids).logits[:, -1].float()
        _close(clean.logits, ref)
        # and running the later blocks from a stored residual with no unit removed
        layer = adapter.arch.n_layers - 2
        h = run_layers(adapter, clean.resid[:, layer], layer, 0, KV())
        _close(adapter.lm_head(adapter.final_norm(h[:, -1])).float(), ref)


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_batched_equals_one_unit_at_a_time(setup, positions, mode):
    adapter, prompts = setup
    a = adapter.arch
    means = compute_means(adapter, prompts, 8, progress=False) if mode == "mean" else None
    layers = tuple(range(a.n_layers))
    spec = GridSpec((mode,), positions, layers)
    checked = 0
    for g in prompt_groups(prompts, 8)[:2]:
        clean = clean_run(adapter, torch.tensor([p.input_ids for p in g]))
        grid = ablate_group(adapter, g, clean, spec, means)  # (1, L, G, U, V)
        assert grid.shape == (1, a.n_layers, len(g), a.n_heads + 2, a.vocab_size)
        for b, p in enumerate(g[:2]):
            for li, layer in enumerate(layers):
                for unit in range(a.n_heads + 2):
                    ref = _naive(adapter, p, layer, unit, mode, means, positions == "last")
                    _close(grid[0, li, b, unit], ref)
                    checked += 1
    assert checked >= 2 * a.n_layers * (a.n_heads + 2)


def test_ablation_changes_something(setup):
    """Guard against a hook that never fires: removing units must move the logits."""
    adapter, prompts = setup
    g = prompt_groups(prompts, 8)[0]
    clean = clean_run(adapter, torch.tensor([p.input_ids for p in g]))
    grid = ablate_group(adapter, g, clean, GridSpec(("zero",), "all", (0,)), None)
    moved = (grid[0, 0] - clean.logits[:, None]).abs().amax(-1)  # (G, U)
    assert bool((moved > 1e-3).all())


def test_prefix_is_shared_up_to_the_word(setup):
    adapter, prompts = setup
    for g in prompt_groups(prompts, 8):
        P = shared_prefix(g)
        first_word = g[0].roles.index(2)
        assert 0 < P <= first_word
        assert len({p.input_ids[:P] for p in g}) == 1


def test_mean_of_a_unit_over_its_template(setup):
    """Mean ablation's replacement is the average over the template's prompts (checked by hand)."""
    adapter, prompts = setup
    from extract.capture import capture

    means = compute_means(adapter, prompts, 8, progress=False)
    tpl = [p for p in prompts if p.template_index == 1]
    zs = []
    for p in tpl:
        cap = capture(adapter, torch.tensor([p.input_ids]))
        zs.append(cap.z[0, :, -1])  # last position: key ('post', 0)
    expect = torch.stack(zs).mean(0)
    _close(means.z[(1, ("post", 0))], expect, 1e-6)
    np.testing.assert_equal(len({position_keys(p)[-1] for p in tpl}), 1)
