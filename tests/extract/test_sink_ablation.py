"""Sink removal (``--ablation sink`` / ``sink_norenorm``) == a hooked one-at-a-time reference.

The reference runs the unmodified HF model twice per (prompt, layer, unit): a clean forward
records layer l's attention weights (HF's own eager softmax) and value-projection output, the
sink-removed o_proj input of the chosen heads is written out here in float64 -- weights on the
keys j >= 1 divided by their own sum (``sink``; a query whose only key is 0 writes 0) or left
as they are (``sink_norenorm``), times the head's KV-group values -- and a second forward has
an o_proj pre-hook put it in. Block l's input is clean in both passes, so this is exact.

Every family's tiny model (GQA, biases, fused qkv, q/k norms, sandwich norms, soft-caps,
sliding windows); all and last positions; every layer; heads 0 and H-1 and "every head".
Tolerance 1e-4 relative to max(1, max |logit|), as the other modes.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from extract.models.loading import Adapter, load_model
from extract.stages.ablation import metrics as abl
from extract.stages.prompts import Prompt, build_prompts
from tests.extract.test_ablation import TEMPLATES, WORDS, _close, _grid, _hf_logits


@pytest.fixture(scope="module")
def fam(tiny_family_dir):
    model, tok, _ = load_model(str(tiny_family_dir), device="cpu", progress=False)
    return Adapter(model), build_prompts(tok, WORDS, TEMPLATES)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = load_model(str(tiny_model_dir), device="cpu", progress=False)
    return Adapter(model), build_prompts(tok, WORDS, TEMPLATES)


@torch.no_grad()
def _clean_layer(adapter: Adapter, p: Prompt, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's attention weights (H, T, T) and value-projection output (T, KV*hd) at ``layer``."""
    rec: dict = {}
    att = adapter.attn(layer)
    hs = [att.register_forward_hook(lambda m, a, o: rec.__setitem__("w", o[1][0]))]
    if adapter.family.fused_qkv:
        a = adapter.arch
        nq, nk = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        hs.append(att.qkv_proj.register_forward_hook(lambda m, a_, o: rec.__setitem__("v", o[0, :, nq + nk:])))
    else:
        hs.append(att.v_proj.register_forward_hook(lambda m, a_, o: rec.__setitem__("v", o[0])))
    try:
        _hf_logits(adapter, p)
    finally:
        for h in hs:
            h.remove()
    return rec["w"].double(), rec["v"].double()


@contextmanager
def _sink_removed(adapter: Adapter, p: Prompt, layer: int, heads: list[int], renorm: bool, last: bool):
    """o_proj pre-hook putting in the chosen heads' o_proj input with key 0 removed."""
    a = adapter.arch
    hd, T = a.head_dim, p.n_tokens
    w, v = _clean_layer(adapter, p, layer)  # (H, T, T), (T, KV*hd)
    rows = range(T - 1, T) if last else range(T)
    new = {}
    for h in heads:
        g = a.kv_group[h]
        vh = v[:, g * hd : (g + 1) * hd]  # (T, hd)
        wh = w[h].clone()  # (T query, T key)
        wh[:, 0] = 0.0
        if renorm:
            tot = wh.sum(-1, keepdim=True)
            wh = torch.where(tot > 0, wh / torch.where(tot > 0, tot, 1.0), 0.0)
        new[h] = wh @ vh  # (T, hd)

    def pre(mod, args):
        x = args[0].clone()  # (1, T, H*hd)
        for h, zh in new.items():
            for i in rows:
                x[0, i, h * hd : (h + 1) * hd] = zh[i].to(x.dtype)
        return (x,)

    handle = adapter.o_proj(layer).register_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()


def _check(adapter: Adapter, prompts: list[Prompt], positions: str, units: list[int] | None = None) -> None:
    a = adapter.arch
    L, H = a.n_layers, a.n_heads
    U = H + 2
    modes = ("sink", "sink_norenorm")
    got = _grid(adapter, prompts, abl.GridSpec(modes, positions, tuple(range(L))), None)
    check = [next(p for p in prompts if p.word == "xylophone" and p.template_index == 0), prompts[-1]]
    moved = 0.0
    for p in check:
        clean = _hf_logits(adapter, p)
        for layer in range(L):
            for u in units or list(range(H + 2)):
                for mi, mode in enumerate(modes):
                    row = got[p.index][layer, mi * U + u]
                    if u == H + 1:  # the sink modes' MLP slot removes nothing
                        _close(row, clean)
                        continue
                    heads = list(range(H)) if u == H else [u]
                    with _sink_removed(adapter, p, layer, heads, mode == "sink", positions == "last"):
                        ref = _hf_logits(adapter, p)
                    _close(row, ref)
                    moved = max(moved, float((ref - clean).abs().max()))
    # Through sliding windows position 0 reaches the last position only within sum(window - 1)
    # positions; beyond that removing it must change nothing.
    reach = sum(float("inf") if w is None else w - 1 for w in a.windows)
    if reach >= max(p.n_tokens for p in check) - 1:
        assert moved > 1e-2, "sink removal must change the logits, or this test proves nothing"
    else:
        assert moved < 1e-4, "position 0 is out of the last position's reach through the windows"


@pytest.mark.parametrize("positions", ["all", "last"])
def test_sink_removal_equals_hooked_reference(tiny, positions):
    _check(*tiny, positions)


@pytest.mark.parametrize("positions", ["all", "last"])
def test_sink_removal_every_family(fam, positions):
    adapter = fam[0]
    _check(*fam, positions, units=[0, adapter.arch.n_heads - 1, adapter.arch.n_heads,
                                   adapter.arch.n_heads + 1])


def test_sink_modes_stack_with_zero(tiny):
    """zero,sink in one grid == each alone (mode-major configs; the variants do not leak)."""
    adapter, prompts = tiny
    L, U = adapter.arch.n_layers, adapter.arch.n_heads + 2
    both = _grid(adapter, prompts[:2], abl.GridSpec(("zero", "sink"), "all", (L - 1,)), None)
    zero = _grid(adapter, prompts[:2], abl.GridSpec(("zero",), "all", (L - 1,)), None)
    sink = _grid(adapter, prompts[:2], abl.GridSpec(("sink",), "all", (L - 1,)), None)
    for i in both:
        _close(both[i][:, :U], zero[i])
        _close(both[i][:, U:], sink[i])
