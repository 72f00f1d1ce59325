"""The independent reference of the circuits engine: an unmodified HF forward with hooks on the
real HF modules, and autograd, written from the spec (docs/specs/circuits.md), not from
extract.stages.circuits.

One hooked forward gives every downstream input its own value: forward hooks on q_proj / k_proj
/ v_proj (or phi3's qkv_proj) replace their output by the projection, head by head, of
``input_layernorm(resid + extra_d)`` (resid captured by a pre-hook on the decoder layer); a
pre-hook on the MLP's norm adds extra_{m_l}; a pre-hook on the final norm adds extra_logits.
Node outputs are read in the same forward (layer-0 input, o_proj input -> per-head writes, the
MLP block output) and can be overridden (``set_``) at the attention / MLP output modules.
Scores are computed the naive way: one hooked forward + backward per IG step and per group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SANDWICH = ("gemma2", "gemma3_text")


def names(L: int, H: int, KV: int) -> tuple[list[str], list[str], torch.Tensor]:
    """Upstream names, downstream names and the (U, Dn) existence mask, from the spec."""
    up, up_pos = ["input"], [0]
    for lay in range(L):
        up += [f"a{lay}.h{h}" for h in range(H)] + [f"m{lay}"]
        up_pos += [2 * lay + 1] * H + [2 * lay + 2]
    down, down_pos = [], []
    for lay in range(L):
        down += [f"a{lay}.h{h}<q>" for h in range(H)] + [f"a{lay}.h{g}<k>" for g in range(KV)]
        down += [f"a{lay}.h{g}<v>" for g in range(KV)] + [f"m{lay}"]
        down_pos += [2 * lay + 1] * (H + 2 * KV) + [2 * lay + 2]
    down.append("logits")
    down_pos.append(2 * L + 1)
    exists = torch.tensor(up_pos)[:, None] < torch.tensor(down_pos)[None, :]
    return up, down, exists


class Hooked:
    """Hooked forwards of one HF causal LM (eager attention)."""

    def __init__(self, model) -> None:
        self.model = model
        c = model.config
        self.mt = c.model_type
        self.L, self.H = c.num_hidden_layers, c.num_attention_heads
        self.KV = c.num_key_value_heads
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // self.H
        self.sandwich = self.mt in SANDWICH
        self.up, self.down, self.exists = names(self.L, self.H, self.KV)

    def _proj_parts(self, att):
        """[(module, weight rows, bias rows, n heads)] for q, k, v."""
        H, KV, hd = self.H, self.KV, self.hd
        if hasattr(att, "qkv_proj"):
            w, b = att.qkv_proj.weight, att.qkv_proj.bias
            cuts = [0, H * hd, (H + KV) * hd, (H + 2 * KV) * hd]
            return [(att.qkv_proj, [(w[cuts[i]:cuts[i + 1]], None if b is None else b[cuts[i]:cuts[i + 1]])
                                    for i in range(3)])]
        return [(m, [(m.weight, m.bias)]) for m in (att.q_proj, att.k_proj, att.v_proj)]

    def run(self, ids: torch.Tensor, extra: Callable, set_: dict[int, torch.Tensor] | None = None):
        """One hooked forward over ids (B, T). extra(d, outs) -> (B, T, D) added to input d,
        outs the node outputs so far (list of (B, T, D)); set_: upstream index -> its output.
        Returns (last-position logits (B, V), node outputs (B, U, T, D))."""
        set_ = set_ or {}
        m, L, H, KV, hd = self.model, self.L, self.H, self.KV, self.hd
        per = H + 2 * KV + 1
        outs: list[torch.Tensor] = []
        resid: dict[int, torch.Tensor] = {}
        hooks = []

        def layer_pre(lay):
            def fn(mod, args, kw):
                x = args[0] if args else kw["hidden_states"]
                if lay == 0:
                    if 0 in set_:
                        x = set_[0]
                    outs.append(x)
                resid[lay] = x
                return ((x, *args[1:]), kw) if args else (args, {**kw, "hidden_states": x})
            return fn

        def proj_hook(lay, parts, first_down):
            norm = m.model.layers[lay].input_layernorm

            def fn(mod, args, out):
                ys, d = [], first_down
                for w, b in parts:
                    n = w.shape[0] // hd
                    for h in range(n):
                        x = norm(resid[lay] + extra(d, outs))
                        ys.append(F.linear(x, w[h * hd:(h + 1) * hd], None if b is None else b[h * hd:(h + 1) * hd]))
                        d += 1
                return torch.cat(ys, -1)
            return fn

        def o_pre(lay):
            def fn(mod, args):
                z = args[0]  # (B, T, H*hd)
                w = mod.weight.view(-1, H, hd)
                heads = [z[..., h * hd:(h + 1) * hd] @ w[:, h].T for h in range(H)]
                if self.sandwich:
                    post = m.model.layers[lay].post_attention_layernorm
                    o = sum(heads)
                    s = torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + post.eps)
                    heads = [hh * s * (1 + post.weight) for hh in heads]
                outs.extend(heads)
            return fn

        def attn_post(lay, is_tuple):
            def fn(mod, args, out):
                idx = [1 + lay * (H + 1) + h for h in range(H)]
                if not any(i in set_ for i in idx):
                    return out
                o = out[0] if is_tuple else out
                add = sum(set_[i] - outs[i] for i in idx if i in set_)
                for i in idx:
                    if i in set_:
                        outs[i] = set_[i]
                return (o + add, *out[1:]) if is_tuple else o + add
            return fn

        def mlp_pre(lay):
            def fn(mod, args):
                return (args[0] + extra(lay * per + H + 2 * KV, outs),)
            return fn

        def mlp_post(lay):
            def fn(mod, args, out):
                u = 1 + lay * (H + 1) + H
                out = set_.get(u, out)
                outs.append(out)
                return out
            return fn

        try:
            for lay, layer in enumerate(m.model.layers):
                att = layer.self_attn
                hooks.append(layer.register_forward_pre_hook(layer_pre(lay), with_kwargs=True))
                d = lay * per
                for mod, parts in self._proj_parts(att):
                    hooks.append(mod.register_forward_hook(proj_hook(lay, parts, d)))
                    d += sum(w.shape[0] // hd for w, _ in parts)
                hooks.append(att.o_proj.register_forward_pre_hook(o_pre(lay)))
                if self.sandwich:
                    hooks.append(layer.post_attention_layernorm.register_forward_hook(attn_post(lay, False)))
                    mlp_norm, mlp_out = layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm
                else:
                    hooks.append(att.register_forward_hook(attn_post(lay, True)))
                    mlp_norm, mlp_out = layer.post_attention_layernorm, layer.mlp
                hooks.append(mlp_norm.register_forward_pre_hook(mlp_pre(lay)))
                hooks.append(mlp_out.register_forward_hook(mlp_post(lay)))
            hooks.append(m.model.norm.register_forward_pre_hook(
                lambda mod, args: (args[0] + extra(L * per, outs),)))
            logits = m(input_ids=ids, logits_to_keep=1).logits[:, -1]
        finally:
            for h in hooks:
                h.remove()
        return logits, torch.stack(outs, 1)


def metric(logits: torch.Tensor, which: str, t: tuple[int, int], logp_clean: torch.Tensor) -> torch.Tensor:
    """(V,) logits -> M (spec: ld or kl), float64."""
    lg = logits.double()
    if which == "ld":
        return lg[t[0]] - lg[t[1]]
    return (logp_clean.exp() * (logp_clean - torch.log_softmax(lg, -1))).sum()


def answer_tokens(clean: torch.Tensor, corr: torch.Tensor) -> tuple[int, int]:
    tc, tx = int(clean.argmax()), int(corr.argmax())
    if tc != tx:
        return tc, tx
    other = clean.clone()
    other[tc] = float("-inf")
    return tc, int(other.argmax())


def clean_runs(hk: Hooked, clean: list[int], corr: list[int]):
    """(clean logits, corrupted logits, clean outs (U, T, D), corrupted outs) from hooked forwards."""
    zero = lambda d, outs: 0  # noqa: E731
    with torch.no_grad():
        lc, oc = hk.run(torch.tensor([clean]), zero)
        lx, ox = hk.run(torch.tensor([corr]), zero)
    return lc[0], lx[0], oc[0], ox[0]


def grads(hk: Hooked, ids: list[int], M: Callable, set_: dict | None = None) -> torch.Tensor:
    """dM/d(input_d) for every downstream input d -> (Dn, T, D), one hooked forward + backward."""
    zs: dict[int, torch.Tensor] = {}
    T = len(ids)
    D = hk.model.config.hidden_size
    dt = hk.model.lm_head.weight.dtype

    def extra(d, outs):
        zs[d] = torch.zeros(1, T, D, dtype=dt, requires_grad=True)
        return zs[d]

    logits, _ = hk.run(torch.tensor([ids]), extra, set_)
    keys = sorted(zs)
    assert keys == list(range(len(hk.down))), "every downstream input must be read once"
    gs = torch.autograd.grad(M(logits[0]), [zs[k] for k in keys], allow_unused=True)
    return torch.cat([torch.zeros_like(zs[k]) if x is None else x for k, x in zip(keys, gs, strict=True)], 0)


def scores(hk: Hooked, clean: list[int], corr: list[int], method: str, which: str, m: int = 5) -> torch.Tensor:
    """(U, Dn) scores of one pair (spec), the naive way; 0 where no edge."""
    lc, lx, oc, ox = clean_runs(hk, clean, corr)
    t = answer_tokens(lc, lx)
    lp = torch.log_softmax(lc.double(), -1)

    def M(lg):
        return metric(lg, which, t, lp)

    delta = (ox - oc).double()  # (U, T, D)
    if method == "eap":
        return torch.einsum("utd,ntd->un", delta, grads(hk, clean, M).double()) * hk.exists
    alphas = [k / m for k in range(1, m + 1)]
    if method == "eap_ig_inputs":
        g = sum(grads(hk, clean, M, {0: ox[None, 0] + a * (oc[None, 0] - ox[None, 0])}) for a in alphas) / m
        return torch.einsum("utd,ntd->un", delta, g.double()) * hk.exists
    assert method == "eap_ig_activations"
    L, H = hk.L, hk.H
    groups = [[0]] + [g for lay in range(L) for g in
                      ([1 + lay * (H + 1) + h for h in range(H)], [1 + lay * (H + 1) + H])]
    out = torch.zeros(len(hk.up), len(hk.down), dtype=torch.float64)
    for grp in groups:
        g = sum(grads(hk, clean, M, {u: ox[None, u] + a * (oc[None, u] - ox[None, u]) for u in grp})
                for a in alphas) / m
        out[grp] = torch.einsum("utd,ntd->un", delta[grp], g.double())
    return out * hk.exists


@torch.no_grad()
def circuit_logits(hk: Hooked, clean: list[int], repl: torch.Tensor, in_circuit: torch.Tensor) -> torch.Tensor:
    """Last-position logits of the clean input with every edge outside ``in_circuit`` (U, Dn)
    carrying ``repl`` (U, T, D) instead of this forward's upstream output (spec, "Circuits")."""
    outside = (hk.exists & ~in_circuit).to(repl.dtype)

    def extra(d, outs):
        n = len(outs)
        return torch.einsum("u,utd->td", outside[:n, d], repl[:n] - torch.stack(outs, 1)[0])[None]

    logits, _ = hk.run(torch.tensor([clean]), extra)
    return logits[0]
