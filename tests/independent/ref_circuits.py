"""Independent reference for docs/specs/circuits.md: EAP / EAP-IG edge scores, circuits, faithfulness.

Written from the spec alone (no project code), with torch + transformers only: every number comes
from the Hugging Face model's own forward, with forward hooks / forward pre-hooks that
  * record each upstream node's output (input = what block 0 receives; a{li}.h{h} = the head's
    share of the attention block output; m{li} = the MLP block output),
  * give every downstream input its own residual copy (q per head, k / v per KV group, m{li},
    logits), so that a circuit can patch edges per receiver and autograd can differentiate per
    receiver,
  * optionally overwrite a group of upstream outputs (EAP-IG over activations, IG over inputs).
Slow and plain on purpose: per-head query/key/value projections are recomputed from each copy
with F.linear on the module's own weights, then handed back to the HF attention module (which
keeps RoPE, q/k norms, soft-capping, sliding windows and masks exactly as the model defines).

Batch size 1 throughout; tensors are (T, D) unless stated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- graph


@dataclass(frozen=True)
class Shape:
    L: int  # layers
    H: int  # query heads
    KV: int  # key/value heads
    hd: int  # head dim
    D: int  # d_model


def _text_config(config):
    return getattr(config, "text_config", None) or config


def shape_of(config) -> Shape:
    c = _text_config(config)
    H = c.num_attention_heads
    KV = getattr(c, "num_key_value_heads", None) or H
    hd = getattr(c, "head_dim", None) or c.hidden_size // H
    return Shape(c.num_hidden_layers, H, KV, hd, c.hidden_size)


def upstream_nodes(config) -> list[str]:
    s = shape_of(config)
    out = ["input"]
    for li in range(s.L):
        out += [f"a{li}.h{h}" for h in range(s.H)] + [f"m{li}"]
    return out


def downstream_nodes(config) -> list[str]:
    s = shape_of(config)
    out = []
    for li in range(s.L):
        out += [f"a{li}.h{h}<q>" for h in range(s.H)]
        out += [f"a{li}.h{g}<k>" for g in range(s.KV)]
        out += [f"a{li}.h{g}<v>" for g in range(s.KV)]
        out += [f"m{li}"]
    return out + ["logits"]


def _n_upstream_before(s: Shape, d: str) -> int:
    """How many upstream nodes (in upstream order) feed downstream input d."""
    if d == "logits":
        return 1 + s.L * (s.H + 1)
    li = int(d[1:].split(".")[0].split("<")[0])
    if d.startswith("m"):
        return 1 + li * (s.H + 1) + s.H
    return 1 + li * (s.H + 1)


def upstream_of(config, d: str) -> list[str]:
    return upstream_nodes(config)[: _n_upstream_before(shape_of(config), d)]


def edges(config, order: str = "downstream") -> list[tuple[str, str]]:
    """All edges. order='downstream' (default): receivers in the spec's order, senders in upstream
    order within each; order='upstream': senders outer (the row-major flattening of an
    (n_upstream, n_downstream) score matrix as in EAP-IG's graph.py). Only tie-breaking depends on it."""
    ups = upstream_nodes(config)
    s = shape_of(config)
    by_down = [(u, d) for d in downstream_nodes(config) for u in ups[: _n_upstream_before(s, d)]]
    if order == "downstream":
        return by_down
    if order == "upstream":
        rank = {u: i for i, u in enumerate(ups)}
        return sorted(by_down, key=lambda e: rank[e[0]])  # stable: receivers stay in spec order
    raise ValueError(f"order {order!r}: use 'downstream' or 'upstream'")


def edge_count_formula(config) -> int:
    s = shape_of(config)
    n = sum((s.H + 2 * s.KV) * (1 + li * (s.H + 1)) + (1 + li * (s.H + 1) + s.H) for li in range(s.L))
    return n + 1 + s.L * (s.H + 1)


# --------------------------------------------------------------------------- the hooked forward


@dataclass
class Trace:
    logits_last: torch.Tensor  # (V,)
    outs: dict[str, torch.Tensor]  # upstream node -> (T, D)
    inputs: dict[str, torch.Tensor]  # downstream input -> (T, D) (the copy the receiver read)


# shift(d, outs_so_far) -> (T, D) tensor added to d's residual copy, or None
Shift = Callable[[str, dict[str, torch.Tensor]], torch.Tensor | None]


@dataclass
class _Plan:
    shift: Shift | None = None
    override: dict[str, torch.Tensor] = field(default_factory=dict)  # node -> (T, D) fixed value
    track: bool = False  # make the graph differentiable w.r.t. the copies


def _decoder(model):
    inner = model.model
    return inner.layers, inner.norm


def _is_sandwich(layer) -> bool:
    return hasattr(layer, "pre_feedforward_layernorm")


def _mlp_in_norm(layer):
    return layer.pre_feedforward_layernorm if _is_sandwich(layer) else layer.post_attention_layernorm


def _mlp_out_module(layer):
    return layer.post_feedforward_layernorm if _is_sandwich(layer) else layer.mlp


def _rms_gain_scale(norm, o: torch.Tensor) -> torch.Tensor:
    """(T, D) factor s * g with norm(o) == o * factor (gemma RMSNorm: x * rsqrt(mean x^2 + eps) * (1 + w))."""
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = norm.variance_epsilon
    s = torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)  # (T, 1)
    gain = 1.0 + norm.weight if "Gemma" in type(norm).__name__ else norm.weight
    return s * gain.to(o.dtype)


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, x):
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def run(model, ids: torch.Tensor, plan: _Plan | None = None) -> Trace:
    """One forward of model on ids (1-D) with the plan's shifts / overrides; returns the Trace."""
    plan = plan or _Plan()
    s = shape_of(model.config)
    layers, final_norm = _decoder(model)
    outs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def copy_for(d: str, x: torch.Tensor) -> torch.Tensor:  # x: (T, D) residual this forward
        delta = plan.shift(d, outs) if plan.shift is not None else None
        c = x.clone() if delta is None else x + delta
        inputs[d] = c
        return c

    def set_out(name: str, value: torch.Tensor) -> torch.Tensor:
        if name in plan.override:
            value = plan.override[name].to(value.dtype)
        outs[name] = value
        return value

    for li, layer in enumerate(layers):
        attn = layer.self_attn
        cache: dict[str, torch.Tensor] = {}

        def pre_layer(mod, args, kwargs, li=li, layer=layer, cache=cache):
            x = _hidden_arg(args, kwargs)[0]  # (T, D)
            if li == 0:
                x = set_out("input", x)
                if plan.track:
                    x = x.detach().requires_grad_(True)
                outs["input"] = x
            norm = layer.input_layernorm
            for kind, n in (("q", s.H), ("k", s.KV), ("v", s.KV)):
                for i in range(n):
                    cache[f"{kind}{i}"] = norm(copy_for(f"a{li}.h{i}<{kind}>", x))  # (T, D)
            return _with_hidden(args, kwargs, x.unsqueeze(0))

        def proj(lin, kind, n, offset=0, cache=cache):
            parts = []
            for i in range(n):
                full = F.linear(cache[f"{kind}{i}"], lin.weight, lin.bias)  # (T, out)
                lo = offset + i * s.hd
                parts.append(full[:, lo : lo + s.hd])
            return torch.cat(parts, dim=-1).unsqueeze(0)  # (1, T, n*hd)

        if hasattr(attn, "qkv_proj"):
            def qkv_hook(mod, args, out, proj=proj):
                qn = s.H * s.hd
                return torch.cat([proj(mod, "q", s.H), proj(mod, "k", s.KV, qn),
                                  proj(mod, "v", s.KV, qn + s.KV * s.hd)], dim=-1)
            handles.append(attn.qkv_proj.register_forward_hook(qkv_hook))
        else:
            for kind, n, lin in (("q", s.H, attn.q_proj), ("k", s.KV, attn.k_proj), ("v", s.KV, attn.v_proj)):
                handles.append(lin.register_forward_hook(
                    lambda mod, args, out, kind=kind, n=n, proj=proj: proj(mod, kind, n)))

        sandwich = _is_sandwich(layer)
        if sandwich and attn.o_proj.bias is not None:
            raise ValueError("sandwich-norm model with an o_proj bias: heads are not defined (spec refuses it)")

        def o_hook(mod, args, out, li=li, layer=layer, sandwich=sandwich):
            z = args[0][0]  # (T, H*hd)
            o = out[0]  # (T, D)
            factor = _rms_gain_scale(layer.post_attention_layernorm, o) if sandwich else None
            heads = []
            for h in range(s.H):
                sl = slice(h * s.hd, (h + 1) * s.hd)
                a = z[:, sl] @ mod.weight[:, sl].T  # (T, D)
                if sandwich:
                    a = a * factor
                heads.append(set_out(f"a{li}.h{h}", a))
            if any(f"a{li}.h{h}" in plan.override for h in range(s.H)) and not sandwich:
                total = torch.stack(heads).sum(0)
                return (total + (mod.bias if mod.bias is not None else 0)).unsqueeze(0)
            return None

        handles.append(attn.o_proj.register_forward_hook(o_hook))
        if sandwich:
            def post_attn_hook(mod, args, out, li=li):
                if any(f"a{li}.h{h}" in plan.override for h in range(s.H)):
                    return torch.stack([outs[f"a{li}.h{h}"] for h in range(s.H)]).sum(0).unsqueeze(0)
                return None
            handles.append(layer.post_attention_layernorm.register_forward_hook(post_attn_hook))

        def mlp_in_hook(mod, args, li=li):
            return (copy_for(f"m{li}", args[0][0]).unsqueeze(0),)

        def mlp_out_hook(mod, args, out, li=li):
            return set_out(f"m{li}", out[0]).unsqueeze(0)

        handles.append(_mlp_in_norm(layer).register_forward_pre_hook(mlp_in_hook))
        handles.append(_mlp_out_module(layer).register_forward_hook(mlp_out_hook))
        handles.append(layer.register_forward_pre_hook(pre_layer, with_kwargs=True))

    handles.append(final_norm.register_forward_pre_hook(
        lambda mod, args: (copy_for("logits", args[0][0]).unsqueeze(0),)))
    try:
        logits = model(input_ids=ids.to(model.device).unsqueeze(0), use_cache=False).logits  # (1, T, V)
    finally:
        for h in handles:
            h.remove()
    return Trace(logits[0, -1], outs, inputs)


# --------------------------------------------------------------------------- metrics


def _plain(model, ids) -> Trace:
    with torch.no_grad():
        return run(model, ids)


def answer_tokens(model, clean_ids: torch.Tensor, corr_ids: torch.Tensor) -> tuple[int, int]:
    assert clean_ids.shape == corr_ids.shape and clean_ids.dim() == 1, "pairs are 1-D and equal length"
    with torch.no_grad():
        lc = model(input_ids=clean_ids.to(model.device).unsqueeze(0), use_cache=False).logits[0, -1]
        lk = model(input_ids=corr_ids.to(model.device).unsqueeze(0), use_cache=False).logits[0, -1]
    tc, tk = int(lc.argmax()), int(lk.argmax())
    if tc != tk:
        return tc, tk
    other = lc.clone()
    other[tc] = -math.inf
    return tc, int(other.argmax())


def metric_value(model, logits_last, clean_logits_last, toks, metric: str):
    """M at the last position: 'ld' logit difference, 'kl' KL(p_clean || p). Returns a 0-d tensor."""
    if metric == "ld":
        return logits_last[toks[0]] - logits_last[toks[1]]
    if metric == "kl":
        lp_clean = torch.log_softmax(clean_logits_last.detach(), -1)
        lp = torch.log_softmax(logits_last, -1)
        return (lp_clean.exp() * (lp_clean - lp)).sum()
    raise ValueError(f"metric {metric!r}: use 'ld' or 'kl'")


@dataclass
class _Pair:
    clean_ids: torch.Tensor
    corr_ids: torch.Tensor
    clean: Trace
    corr: Trace
    toks: tuple[int, int]


def _pair(model, clean_ids, corr_ids) -> _Pair:
    model.eval()
    return _Pair(clean_ids, corr_ids, _plain(model, clean_ids), _plain(model, corr_ids),
                 answer_tokens(model, clean_ids, corr_ids))


def _M(model, p: _Pair, logits_last, metric) -> torch.Tensor:
    return metric_value(model, logits_last, p.clean.logits_last, p.toks, metric)


# --------------------------------------------------------------------------- scores


def _grads(model, p: _Pair, metric: str, override: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dM/d(input_d) for every downstream input d in the clean-token forward with `override`."""
    with torch.enable_grad():
        tr = run(model, p.clean_ids, _Plan(override=override, track=True))
        m = _M(model, p, tr.logits_last, metric)
        names = list(tr.inputs)
        gs = torch.autograd.grad(m, [tr.inputs[d] for d in names], allow_unused=True)
    return {d: (torch.zeros_like(tr.inputs[d]) if g is None else g.detach()) for d, g in zip(names, gs, strict=True)}


def _mean_grads(model, p, metric, overrides: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    acc: dict[str, torch.Tensor] = {}
    for ov in overrides:
        for d, g in _grads(model, p, metric, ov).items():
            acc[d] = acc[d] + g if d in acc else g
    return {d: g / len(overrides) for d, g in acc.items()}


def _group_of(u: str) -> str:
    return u.split(".")[0]  # 'input', 'a{li}', 'm{li}'


def edge_scores(model, clean_ids, corr_ids, metric: str, method: str, steps: int = 5
                ) -> dict[tuple[str, str], float]:
    """score(u -> d) = sum_t (a_u(corr) - a_u(clean))[t] . g_d[t] for every edge (spec's methods)."""
    p = _pair(model, clean_ids, corr_ids)
    ups = upstream_nodes(model.config)
    diff = {u: p.corr.outs[u] - p.clean.outs[u] for u in ups}  # (T, D)

    def interp(nodes, k):
        return {u: p.corr.outs[u] + (k / steps) * (p.clean.outs[u] - p.corr.outs[u]) for u in nodes}

    if method == "eap":
        g = _grads(model, p, metric, {})
        grad_for = lambda u, d: g[d]  # noqa: E731
    elif method == "eap_ig_inputs":
        g = _mean_grads(model, p, metric, [interp(["input"], k) for k in range(1, steps + 1)])
        grad_for = lambda u, d: g[d]  # noqa: E731
    elif method == "eap_ig_activations":
        groups: dict[str, list[str]] = {}
        for u in ups:
            groups.setdefault(_group_of(u), []).append(u)
        gg = {G: _mean_grads(model, p, metric, [interp(nodes, k) for k in range(1, steps + 1)])
              for G, nodes in groups.items()}
        grad_for = lambda u, d: gg[_group_of(u)][d]  # noqa: E731
    else:
        raise ValueError(f"method {method!r}: use eap, eap_ig_inputs or eap_ig_activations")
    return {(u, d): float((diff[u] * grad_for(u, d)).sum()) for u, d in edges(model.config)}


# --------------------------------------------------------------------------- circuits


def node_means(model, prompts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean of each upstream output over all positions of all prompts (tokens pooled): node -> (D,)."""
    tot: dict[str, torch.Tensor] = {}
    n = 0
    for ids in prompts:
        tr = _plain(model, ids)
        for u, a in tr.outs.items():
            tot[u] = tot[u] + a.sum(0) if u in tot else a.sum(0)
        n += ids.shape[0]
    return {u: v / n for u, v in tot.items()}


def _replacement(p: _Pair, replacement: str, means) -> dict[str, torch.Tensor]:
    if replacement == "patch":
        return p.corr.outs
    if replacement == "zero":
        return {u: torch.zeros_like(a) for u, a in p.clean.outs.items()}
    if replacement == "mean":
        assert means is not None, "replacement='mean' needs means (node_means(model, prompts))"
        return {u: means[u].expand_as(a).to(a.dtype) for u, a in p.clean.outs.items()}
    raise ValueError(f"replacement {replacement!r}: use patch, mean or zero")


def _circuit_M(model, p: _Pair, in_circuit, metric, repl: dict[str, torch.Tensor]) -> float:
    cfg = model.config

    def shift(d, outs):
        missing = [u for u in upstream_of(cfg, d) if (u, d) not in in_circuit]
        if not missing:
            return None
        return -sum(outs[u] - repl[u] for u in missing)

    with torch.no_grad():
        tr = run(model, p.clean_ids, _Plan(shift=shift))
        return float(_M(model, p, tr.logits_last, metric))


def circuit_metric(model, clean_ids, corr_ids, in_circuit: set[tuple[str, str]], metric: str,
                   replacement: str = "patch", means=None) -> float:
    """M of the clean run where every edge outside in_circuit carries the replacement value."""
    p = _pair(model, clean_ids, corr_ids)
    return _circuit_M(model, p, set(in_circuit), metric, _replacement(p, replacement, means))


def exact_edge_effect(model, clean_ids, corr_ids, edge: tuple[str, str], metric: str) -> float:
    p = _pair(model, clean_ids, corr_ids)
    all_but = set(edges(model.config)) - {edge}
    m_clean = float(_M(model, p, p.clean.logits_last, metric))
    return _circuit_M(model, p, all_but, metric, p.corr.outs) - m_clean


FRACTIONS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


def _trapezoid(x: list[float], y: list[float]) -> float:
    return sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))


def select_edges(all_edges, scores, k: int, selection: str, sign: float) -> list[tuple[str, str]]:
    """Top-k edges: 'abs' by |score|, 'signed' by -score * sign; ties by edge index (earlier first)."""
    if selection == "abs":
        key = lambda i: (-abs(scores[all_edges[i]]), i)  # noqa: E731
    elif selection == "signed":
        key = lambda i: (scores[all_edges[i]] * sign, i)  # noqa: E731  (= -(-score*sign))
    else:
        raise ValueError(f"selection {selection!r}: use abs or signed")
    return [all_edges[i] for i in sorted(range(len(all_edges)), key=key)[:k]]


def faithfulness_curve(model, clean_ids, corr_ids, scores: dict, metric: str, selection: str,
                       replacement: str = "patch", means=None, edge_order: str = "downstream") -> dict:
    """f at each size (x = 0 first), CPR and CMD (trapezoids), per the spec; edge_order breaks ties."""
    p = _pair(model, clean_ids, corr_ids)
    repl = _replacement(p, replacement, means)
    all_edges = edges(model.config, edge_order)
    n = len(all_edges)
    m_clean = float(_M(model, p, p.clean.logits_last, metric))
    if replacement == "patch":
        m_corr = float(_M(model, p, p.corr.logits_last, metric))
    else:
        m_corr = _circuit_M(model, p, set(), metric, repl)
    if m_clean == m_corr:
        raise ValueError("M(clean) == M(corrupted): faithfulness is undefined for this pair; drop the pair")
    sign = math.copysign(1.0, m_clean - m_corr)
    xs, fs, ks = [0.0], [0.0], [0]
    for x in FRACTIONS:
        k = max(1, round(x * n))
        chosen = set(select_edges(all_edges, scores, k, selection, sign))
        f = (_circuit_M(model, p, chosen, metric, repl) - m_corr) / (m_clean - m_corr)
        xs.append(x)
        fs.append(f)
        ks.append(k)
    return {"fractions": xs, "faithfulness": fs, "n_edges": ks,
            "cpr": _trapezoid(xs, fs), "cmd": _trapezoid(xs, [abs(1 - f) for f in fs]),
            "m_clean": m_clean, "m_corr": m_corr}


# --------------------------------------------------------------------------- float64 helper


def exact_float64_norms(model) -> None:
    """Make the model's RMSNorms compute in the input dtype (HF casts to float32 even for float64
    models). Same math; for float64 self-tests only. Gemma norms use (1 + w)."""
    for mod in model.modules():
        name = type(mod).__name__
        if not name.endswith("RMSNorm"):
            continue
        gemma = "Gemma" in name
        eps = mod.eps if gemma else mod.variance_epsilon

        def fwd(x, mod=mod, gemma=gemma, eps=eps):
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            return y * (1.0 + mod.weight) if gemma else mod.weight * y

        mod.forward = fwd


@contextlib.contextmanager
def float64_softmax() -> Iterator[None]:
    """HF eager attention takes softmax(..., dtype=float32); inside this context float64 inputs stay
    float64 (torch.nn.functional.softmax is swapped for the duration; other dtypes unchanged)."""
    orig = torch.nn.functional.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        return orig(input, dim=dim, dtype=None if input.dtype == torch.float64 else dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = orig
