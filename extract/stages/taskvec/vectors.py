"""The vectors of the study, from TRAIN words only (docs/specs/taskvec.md, "Vectors").

- TV_S[b]: mean over train words of resid[b] at the last position of S(x), S in demo, repeat;
- SV[b] = mean resid[b](repeat(x)) - mean resid[b](echo(x)) at the last position;
- head means over demo(x): each head's output (its o_proj-input slice z_h times its W_O slice,
  gemma: times that forward's frozen post-norm gain s * g) and z-bar, the mean slice itself;
- AIE(l, h): from the HEAD_MEAN rows on held-out words (extract.stages.taskvec.interventions);
- FV_k: the sum of the top-k heads' mean outputs by AIE (ties: the lower flat index l * H + h
  first, a stable sort), k in 5, 10, 20 (capped at L * H).

Train-word residuals come from the model's own HF forward, read by hooks at the last position
(the decoder layers' inputs, the final norm's input, o_proj's inputs); the model's logits are
checked against the read last residual (``capture_error``). Per-head outputs: extract.stages.capture.engine's
``head_outputs``.
Every vector records the words it was built from (``built_from``): the interventions refuse to
evaluate on any of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from extract.models.families import Adapter
from extract.stages.capture.engine import head_outputs
from extract.stages.taskvec.prompts import PromptSet, TVPrompt
from store.schema import TOLERANCE
from store.taskvec_schema import FV_KS, TV, Compared, Kind

BATCH = 16  # prompts of equal length per forward


@dataclass
class LastStates:
    """Clean last-position states of a list of prompts (float32)."""

    resid: torch.Tensor  # (N, B, D) every boundary
    z: torch.Tensor  # (N, L, H*hd) o_proj input
    head_out: torch.Tensor  # (N, L, H, D) per-head outputs (frozen gain under sandwich norms)
    capture_error: float  # max rel error of the last residual's logits vs the model's own (rel only)


@contextmanager
def _read_last(ad: Adapter, got: dict):
    """Hooks that only read, at the last position: every decoder layer's input (boundary l),
    the final norm's input (boundary L) and every o_proj input."""
    L = ad.arch.n_layers

    def keep(key):
        def fn(mod, args, kw):
            got[key] = (args[0] if args else kw["hidden_states"])[:, -1].float()
        return fn

    hs = [ad.layers[i].register_forward_pre_hook(keep(("r", i)), with_kwargs=True) for i in range(L)]
    hs.append(ad.final_norm.register_forward_pre_hook(keep(("r", L)), with_kwargs=True))
    hs += [ad.o_proj(i).register_forward_pre_hook(keep(("z", i)), with_kwargs=True) for i in range(L)]
    try:
        yield
    finally:
        for h in hs:
            h.remove()


@torch.no_grad()
def last_states(ad: Adapter, prompts: list[TVPrompt]) -> LastStates:
    """The model's own HF forward per batch of equal-length prompts, read at the last position."""
    a = ad.arch
    L, H, D = a.n_layers, a.n_heads, a.d_model
    dev = ad.lm_head.weight.device
    N = len(prompts)
    resid = torch.empty(N, L + 1, D, device=dev)
    z = torch.empty(N, L, H * a.head_dim, device=dev)
    heads = torch.empty(N, L, H, D, device=dev)
    err = 0.0
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(p.n_tokens, []).append(i)
    for idx in by_len.values():
        for c in range(0, len(idx), BATCH):
            sel = idx[c : c + BATCH]
            got: dict = {}
            with _read_last(ad, got):
                ids = torch.tensor([prompts[i].prompt.input_ids for i in sel], device=dev)
                ref = ad.model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()  # (b, V)
            resid[sel] = torch.stack([got[("r", b)] for b in range(L + 1)], 1)  # (b, B, D)
            zz = torch.stack([got[("z", m)] for m in range(L)], 1)  # (b, L, H*hd)
            z[sel] = zz
            for layer in range(L):
                heads[sel, layer] = head_outputs(ad, zz[:, layer][:, None], layer)[0][:, 0]  # (b, H, D)
            own = ad.logits(got[("r", L)].to(ad.lm_head.weight.dtype))  # (b, V)
            err = max(err, float((own - ref).abs().max()) / max(1.0, float(ref.abs().max())))
    return LastStates(resid, z, heads, err)


@dataclass
class Vectors:
    """Everything built from train words (float32, on the model's device)."""

    built_from: tuple[str, ...]  # the train words
    task_vector: dict[Kind, torch.Tensor]  # source kind (DEMO, REPEAT) -> (B, D)
    steer: torch.Tensor  # (B, D) SV
    mean_echo: torch.Tensor  # (B, D)
    head_mean_out: torch.Tensor  # (L, H, D)
    head_mean_z: torch.Tensor  # (L, H, hd)
    capture_error: float


TV_SOURCES = (Kind.DEMO, Kind.REPEAT)


def build_vectors(ad: Adapter, ps: PromptSet) -> Vectors:
    """TV_demo, TV_repeat, SV and the demo head means over the train words."""
    a = ad.arch
    train = ps.split.train
    states = {k: last_states(ad, ps.of(k, train)) for k in (Kind.DEMO, Kind.REPEAT, Kind.ECHO)}
    means = {k: s.resid.mean(0) for k, s in states.items()}  # (B, D)
    demo = states[Kind.DEMO]
    return Vectors(
        built_from=tuple(train),
        task_vector={k: means[k] for k in TV_SOURCES},
        steer=means[Kind.REPEAT] - means[Kind.ECHO],
        mean_echo=means[Kind.ECHO],
        head_mean_out=demo.head_out.mean(0),
        head_mean_z=demo.z.mean(0).view(a.n_layers, a.n_heads, a.head_dim),
        capture_error=max(s.capture_error for s in states.values()),
    )


@dataclass
class FunctionVectors:
    """FV_k from the AIE table: the heads chosen and their summed mean outputs."""

    aie: torch.Tensor  # (L, H)
    heads: dict[int, tuple[int, ...]]  # k -> flat head indices l * H + h, best first
    vector: dict[int, torch.Tensor]  # k -> (D,)


def function_vectors(vec: Vectors, aie: torch.Tensor, ks: tuple[int, ...] = FV_KS) -> FunctionVectors:
    """Top-k heads by AIE (stable: ties keep the lower flat index first) and FV_k."""
    L, H, D = vec.head_mean_out.shape
    assert aie.shape == (L, H), aie.shape
    order = sorted(range(L * H), key=lambda i: -float(aie.view(-1)[i]))
    flat = vec.head_mean_out.reshape(L * H, D)
    heads = {k: tuple(order[: min(k, L * H)]) for k in ks}
    return FunctionVectors(aie, heads, {k: flat[list(hs)].sum(0) for k, hs in heads.items()})


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine along the last axis, float64; NaN where a vector is 0 (SV[0] when the last tokens agree)."""
    x, y = x.double(), y.double()
    den = x.norm(dim=-1) * y.norm(dim=-1)
    return torch.where(den > 0, (x * y).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def cosines(vec: Vectors, fv: FunctionVectors) -> np.ndarray:
    """(CV, B) cosine with SV[b] of each store.taskvec_schema.Compared vector."""
    sv = vec.steer
    B = sv.shape[0]
    mean_repeat = vec.mean_echo + vec.steer
    rows = {
        Compared.TV_DEMO: _cos(vec.task_vector[Kind.DEMO], sv),
        Compared.TV_REPEAT: _cos(vec.task_vector[Kind.REPEAT], sv),
        Compared.MEAN_REPEAT_VS_ECHO: _cos(mean_repeat, vec.mean_echo),
    }
    for k, c in ((5, Compared.FV_5), (10, Compared.FV_10), (20, Compared.FV_20)):
        if k in fv.vector:
            rows[c] = _cos(fv.vector[k][None].expand(B, -1), sv)
    out = np.full((len(Compared), B), np.nan, dtype=np.float32)
    for c, v in rows.items():
        out[c] = v.cpu().numpy()
    return out


def vector_arrays(ps: PromptSet, vec: Vectors, fv: FunctionVectors, dtype: str = "float32") -> dict:
    """The ``taskvec/vectors.h5`` datasets keyed by store.taskvec_schema.TV fields; the validation
    rows as (invariant, max_abs_err, rel_err, tolerance, passed) tuples (store.schema.VALIDATION_DTYPE)."""
    ks = sorted(fv.vector)
    kmax = max(len(fv.heads[k]) for k in ks)
    heads = np.full((len(ks), kmax), -1, dtype=np.int32)
    for i, k in enumerate(ks):
        heads[i, : len(fv.heads[k])] = fv.heads[k]

    def np32(x: torch.Tensor) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    return {
        TV.WORDS: np.array(ps.split.words),
        TV.HELD_OUT: np.array([i % 2 == 1 for i in range(len(ps.split.words))]),
        TV.TASK_VECTOR: np.stack([np32(vec.task_vector[k]) for k in TV_SOURCES]),
        TV.STEER_VECTOR: np32(vec.steer),
        TV.MEAN_ECHO: np32(vec.mean_echo),
        TV.HEAD_MEAN_OUT: np32(vec.head_mean_out),
        TV.HEAD_MEAN_Z: np32(vec.head_mean_z),
        TV.AIE: np32(fv.aie),
        TV.FV_K: np.array(ks, dtype=np.int32),
        TV.FV_HEADS: heads,
        TV.FUNCTION_VECTOR: np.stack([np32(fv.vector[k]) for k in ks]),
        TV.COSINE: cosines(vec, fv),
        TV.VALIDATION: [("taskvec_capture_is_model", float("nan"), vec.capture_error, TOLERANCE[dtype],
                         vec.capture_error <= TOLERANCE[dtype])],
    }
