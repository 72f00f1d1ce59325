"""The batched patching engine: every patch of a pair direction, exactly, on the ablation engine.

A patch puts the source run's activation at a named point of the destination run: the residual
at a boundary, the attention or MLP block's contribution (extract.stages.ablation.block's ``a``/``m``
points), or a head's slice of the o_proj input (``z``). It is an intervention ``out = value *
keep + repl`` of extract.stages.ablation.block.Ablate with ``keep = 0`` and ``repl = source`` on the
patched entries, so the block code is the ablation engine's, unchanged. What is reused:

- **The clean destination state.** A patch at block ``l`` and position ``p`` changes nothing
  before either, so a patched run starts from the clean destination residual at ``l`` and runs
  only positions ``p..T-1``, attending to the clean keys and values of positions ``< p`` (the
  ablation engine's shared-prefix keys, here the destination's own cache).
- **Batching and the wavefront.** Patches are grouped by their first patched position; within a
  group all patches advance block by block together, a patch joining the batch at its own
  block (the last-position wavefront of extract.stages.ablation.grid, generalised to a position).
  Each block therefore runs only the (patch, position) rows that can differ from the clean run:
  the FLOP lower bound up to the one attention of block ``l`` per patch.
- **Rows per pass.** A group is cut into chunks of at most ROWS_PER_PASS rows (patches x
  positions) at its widest block.

Attribution patching (Nanda 2023; Syed et al. 2023) is one forward and one backward of the
destination: the gradient of the logit difference at every patch point, dotted with
(source - destination) at the aligned positions (``attribute``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from extract.models.families import Adapter
from extract.stages.ablation.block import Ablate, block
from extract.stages.ablation.grid import chunks
from store.schema import PatchKind as K

ROWS_PER_PASS = 2048  # (patch, position) rows per block call at a chunk's widest block
MAX_PATCHES = 256  # patches per chunk: bounds the (n, V) logits held at once
_RESID = (K.RESID, K.RESID_ALL)


@dataclass(frozen=True)
class Patch:
    """One patch: kind, block (the boundary for residual kinds), head, positions, start position."""

    kind: K
    layer: int
    head: int  # -1 unless a head kind
    dst: tuple[int, ...]  # destination positions written
    src: tuple[int, ...]  # aligned source positions read, same order
    start: int  # first position that can differ from the destination's clean run

    @property
    def start_layer(self) -> int:
        """The block whose input (residual kinds) or inside (the others) is patched."""
        return 0 if self.kind == K.NOTHING else self.layer


@dataclass
class Rec:
    """A clean run recorded through the engine's blocks (one prompt, T positions)."""

    resid: torch.Tensor  # (L+1, T, D) residual at every boundary
    k: list[torch.Tensor]  # per layer (1, KV, T, hd) rotated keys
    v: list[torch.Tensor]  # per layer (1, KV, T, hd) values
    z: torch.Tensor  # (L, T, H*hd) o_proj input
    a: torch.Tensor  # (L, T, D) attention block contribution
    m: torch.Tensor  # (L, T, D) MLP block contribution
    logits: torch.Tensor  # (V,) float32 at the last position


def _stack(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """[(1, 1, T, X)] x n -> (n, T, X): one prompt's per-layer tensors stacked."""
    return torch.stack([x[0, 0] for x in xs])


def record(ad: Adapter, ids: Sequence[int], rope, *, grad: bool = False,
           ld: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[Rec, dict[str, torch.Tensor] | None]:
    """Clean run of one prompt; with ``grad`` also d ld(logits)/d(every patch point)."""
    L = ad.arch.n_layers
    dev = ad.lm_head.weight.device
    T = len(ids)
    with torch.set_grad_enabled(grad):
        h = ad.embed(torch.tensor([list(ids)], device=dev))[None]  # (1, 1, T, D)
        if grad:
            h = h.detach().requires_grad_(True)
        pos = torch.arange(T, device=dev)[None]
        rs, ks, vs, zs, as_, ms = [h], [], [], [], [], []
        for m in range(L):
            cos, sin = rope[m]
            o = block(ad, m, h, cos[None, :T], sin[None, :T], pos, record=True)
            h = o.h
            rs.append(h)
            ks.append(o.k[:, :, 0])
            vs.append(o.v[:, :, 0])
            zs.append(o.z)
            as_.append(o.a)
            ms.append(o.m)
        logits = ad.logits(h[0, 0, -1])  # (V,)
        grads = None
        if grad:
            assert ld is not None
            g = torch.autograd.grad(ld(logits), rs + zs + as_ + ms)
            n = L + 1
            grads = {"resid": _stack(g[:n]),  # (L+1, T, D)
                     "z": _stack(g[n : n + L]),  # (L, T, H*hd)
                     "a": _stack(g[n + L : n + 2 * L]),  # (L, T, D)
                     "m": _stack(g[n + 2 * L :])}  # (L, T, D)
    rec = Rec(_stack(rs).detach(), [k.detach() for k in ks], [v.detach() for v in vs],
              _stack(zs).detach(), _stack(as_).detach(), _stack(ms).detach(), logits.detach())
    return rec, grads


def _point(pt: Patch, hd: int) -> tuple[str, slice]:
    """Where a patch of a block-internal kind writes: the point ('z' | 'a' | 'm', a field of Rec
    and a key of the gradients) and the columns there (a head's hd-wide slice, or all)."""
    if pt.kind in (K.HEAD, K.HEAD_ALL):
        return "z", slice(pt.head * hd, (pt.head + 1) * hd)
    assert pt.kind in (K.ATTN, K.MLP), pt.kind
    return ("a" if pt.kind == K.ATTN else "m"), slice(None)


def _joining(ad: Adapter, dst: Rec, src: Rec, pts: list[Patch], m: int, p: int, n_old: int,
             boundary: bool) -> tuple[torch.Tensor, Ablate | None]:
    """Input rows (1, n, S, D) of patches joining at block m (or after the last, ``boundary``)
    and their Ablate (entries patched inside block m), selecting rows n_old.. of the batch."""
    S = dst.resid.shape[1] - p
    hd = ad.arch.head_dim
    h = dst.resid[m, p:].expand(len(pts), S, -1).clone()  # (n, S, D)
    kinds = {pt.kind for pt in pts}
    one = torch.ones((), dtype=h.dtype, device=h.device)
    keep = {"z": one, "a": one, "m": one}
    repl: dict[str, torch.Tensor | None] = {"z": None, "a": None, "m": None}
    for point, ks, width in (("z", (K.HEAD, K.HEAD_ALL), dst.z.shape[-1]), ("a", (K.ATTN,), h.shape[-1]),
                             ("m", (K.MLP,), h.shape[-1])):
        if kinds & set(ks) and not boundary:
            keep[point] = torch.ones(1, len(pts), S, width, dtype=h.dtype, device=h.device)
            repl[point] = torch.zeros(1, len(pts), S, width, dtype=h.dtype, device=h.device)
    for j, pt in enumerate(pts):
        d = [t - p for t in pt.dst]
        s = list(pt.src)
        if pt.kind in _RESID:
            h[j, d] = src.resid[m, s]  # (len(d), D)
        elif pt.kind != K.NOTHING:
            point, sl = _point(pt, hd)
            keep[point][0, j, d, sl] = 0
            repl[point][0, j, d, sl] = getattr(src, point)[m, s, sl]  # type: ignore[index]
    if boundary or not kinds - {K.NOTHING, *_RESID}:
        return h[None], None
    sel = (slice(None), slice(n_old, None))
    return h[None], Ablate(keep["z"], keep["a"], keep["m"], repl["z"], repl["a"], repl["m"], sel=sel)


@torch.no_grad()
def _wave(ad: Adapter, dst: Rec, src: Rec, pts: list[Patch], p: int, rope) -> torch.Tensor:
    """Patches sharing start position p, advancing together block by block -> (n, V) logits."""
    L = ad.arch.n_layers
    T = dst.resid.shape[1]
    S = T - p
    dev = dst.resid.device
    pos = torch.arange(p, T, device=dev)[None]  # (1, S) absolute positions
    h = dst.resid.new_zeros(1, 0, S, dst.resid.shape[-1])
    order: list[int] = []
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, pt in enumerate(pts):
        by_layer[pt.start_layer].append(i)
    for m in range(L):
        ab = None
        if by_layer.get(m):
            new, ab = _joining(ad, dst, src, [pts[i] for i in by_layer[m]], m, p, h.shape[1], False)
            h = torch.cat([h, new], 1)
            order += by_layer[m]
        if h.shape[1] == 0:
            continue
        cos, sin = rope[m]
        sh_k = dst.k[m][:, :, :p] if p else None  # (1, KV, p, hd) clean destination cache
        sh_v = dst.v[m][:, :, :p] if p else None
        h = block(ad, m, h, cos[None, p:T], sin[None, p:T], pos, sh_k=sh_k, sh_v=sh_v, ab=ab).h
    if by_layer.get(L):  # residual patches at the last boundary: no block left to run
        new, _ = _joining(ad, dst, src, [pts[i] for i in by_layer[L]], L, p, h.shape[1], True)
        h = torch.cat([h, new], 1)
        order += by_layer[L]
    logits = ad.logits(h[0, :, -1])  # (n, V) in join order
    out = torch.empty_like(logits)
    out[torch.tensor(order, device=dev)] = logits
    return out


def run_patches(ad: Adapter, dst: Rec, src: Rec, patches: Sequence[Patch], rope,
                tick: Callable[[int], None] = lambda n: None,
                sink: Callable[[list[int], torch.Tensor], None] | None = None) -> torch.Tensor | None:
    """Float32 logits at the destination's last position, one row per patch.

    Without ``sink``: returned whole, (C, V). With it: handed over per chunk as
    sink(patch indices, (n, V) logits) and never held together (C x V is ~1 GB for SmolLM2).
    """
    T = dst.resid.shape[1]
    out = None if sink is not None else torch.empty(len(patches), dst.logits.shape[-1], device=dst.logits.device)
    by_start: dict[int, list[int]] = defaultdict(list)
    for i, pt in enumerate(patches):
        by_start[pt.start].append(i)
    for p in sorted(by_start):
        idx = sorted(by_start[p], key=lambda i: patches[i].start_layer)
        for chunk in chunks(idx, min(MAX_PATCHES, ROWS_PER_PASS // (T - p))):
            lg = _wave(ad, dst, src, [patches[i] for i in chunk], p, rope)
            if out is None:
                sink(chunk, lg)  # type: ignore[misc]
            else:
                out[torch.tensor(chunk, device=out.device)] = lg
            tick(len(chunk))
    return out


def attribute(ad: Adapter, dst: Rec, src: Rec, grads: dict[str, torch.Tensor],
              patches: Sequence[Patch]) -> torch.Tensor:
    """(C,) float64 first-order estimate of LD(patched) - LD(destination) per patch."""
    hd = ad.arch.head_dim
    out = torch.zeros(len(patches), dtype=torch.float64)
    for i, pt in enumerate(patches):
        if pt.kind == K.NOTHING:
            continue
        d, s, lay = list(pt.dst), list(pt.src), pt.layer
        if pt.kind in _RESID:
            g, delta = grads["resid"][lay, d], src.resid[lay, s] - dst.resid[lay, d]  # (len(d), D)
        else:
            point, sl = _point(pt, hd)  # (len(d), hd | D)
            g, delta = grads[point][lay, d, sl], getattr(src, point)[lay, s, sl] - getattr(dst, point)[lay, d, sl]
        out[i] = (g.double() * delta.double()).sum()
    return out


def plan(n_layers: int, n_heads: int, dst_to_src: Sequence[int], shared_prefix: int,
         dst_ids: Sequence[int], src_ids: Sequence[int]) -> list[Patch]:
    """Every patch of one direction (README "Activation patching").

    Residual: every boundary and aligned position from the first differing token on, except at
    boundary 0 where the two tokens are equal (identical embeddings). Attention and MLP blocks:
    every (layer, aligned position). Heads: every (layer, head) at all aligned positions, and
    every (layer, head, aligned position). Plus two check rows: nothing patched, and the
    residual at boundary 0 at every aligned differing position.
    """
    P = shared_prefix
    T = len(dst_to_src)
    al = [t for t in range(P, T) if dst_to_src[t] >= 0]
    start = min(al) if al else T - 1
    out = [Patch(K.NOTHING, 0, -1, (), (), start)]
    if not al:
        return out
    src_all = tuple(dst_to_src[t] for t in al)
    emb = [t for t in al if dst_ids[t] != src_ids[dst_to_src[t]]]
    if emb:
        out.append(Patch(K.RESID_ALL, 0, -1, tuple(emb), tuple(dst_to_src[t] for t in emb), min(emb)))
    for b in range(n_layers + 1):
        for t in (emb if b == 0 else al):
            out.append(Patch(K.RESID, b, -1, (t,), (dst_to_src[t],), t))
    for lay in range(n_layers):
        for kind in (K.ATTN, K.MLP):
            out += [Patch(kind, lay, -1, (t,), (dst_to_src[t],), t) for t in al]
        for hh in range(n_heads):
            out.append(Patch(K.HEAD_ALL, lay, hh, tuple(al), src_all, start))
            out += [Patch(K.HEAD, lay, hh, (t,), (dst_to_src[t],), t) for t in al]
    return out
