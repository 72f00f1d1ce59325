"""The batched intervention engine of the task-vector study, on the ablation engine's blocks.

Every intervention of the study changes a prompt's run from one block ``m`` and one position
``start`` on: the residual at boundary ``m`` (the input of block ``m``) at positions
``start..T-1`` becomes ``scale * resid + add`` (+ resid again for a self-patch), or head ``h``'s
o_proj-input slice inside block ``m`` at the last position is replaced. Nothing before block
``m`` or before position ``start`` changes, so (extract.ablation_grid's last-position wavefront,
extract.patching_grid's start position):

- the keys and values of positions ``< start`` are the clean ones, recorded once per prompt
  group with the engine's own blocks (``prefix_kv``) and attended to as a shared cache;
- a **spine** row per prompt runs positions ``start..T-1`` from the embedding, clean: its logits
  are the clean reference, and every intervention row joins the batch at its block ``m`` as a
  copy of the spine's state there, edited. An edit that changes nothing (c = 0, a self-patch)
  therefore starts from the spine's state bit for bit, and ends at its logits up to the BLAS
  rounding one batch row apart from another (0 on the tiny Llama, 4e-7 relative on the tiny
  Qwen2: the stored invariants ``taskvec_self_patch_is_clean`` / ``taskvec_c0_is_clean``);
- rows advance block by block together (batch axis 0 = prompts of one length, axis 1 = rows),
  so block ``m`` runs only the rows that can differ from the clean run.

A group is prompts of one length T sharing ``start`` (T - 1 for last-position edits); the same
edits run on every prompt of the group (their vectors are the same for every prompt: the study
builds them from train words). The block code is extract.ablation_block's, unchanged; the
independent check is one hooked HF forward per edit (tests/extract/test_taskvec.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from extract.ablation_block import Ablate, block
from extract.families import Adapter
from extract.sizing import sizes

PROMPTS_PER_CHUNK_ROWS = 64  # a chunk keeps at least this many rows per prompt when it can


@dataclass(frozen=True, eq=False)
class Edit:
    """One intervention, the same on every prompt of a group: see the module docstring.

    Residual edit at boundary ``layer``, positions start..T-1: ``resid * scale + add`` (+ resid
    when ``own``: a self-patch sets the residual to its own value). Head edit (``head >= 0``):
    inside block ``layer``, head ``head``'s o_proj-input slice at the last position := ``z``.
    """

    layer: int
    scale: float = 1.0
    add: torch.Tensor | None = None  # (D,)
    own: bool = False
    head: int = -1
    z: torch.Tensor | None = None  # (hd,)

    def __post_init__(self) -> None:
        assert (self.head >= 0) == (self.z is not None), "a head edit needs head and z together"
        assert self.head < 0 or (self.scale == 1.0 and self.add is None and not self.own), \
            "a head edit leaves the residual alone"

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """The edited residual (G, S, D) from the spine's (G, S, D) at block ``layer``."""
        out = h * self.scale if self.scale != 1.0 else h
        if self.add is not None:
            out = out + self.add.to(h.dtype)
        return out + h if self.own else out


# sink(prompt in group, edit indices, logits (n, V), the chunk's spine logits (V,))
Sink = Callable[[int, list[int], torch.Tensor, torch.Tensor], None]


def _positions(a: int, b: int, dev) -> torch.Tensor:
    return torch.arange(a, b, device=dev)[None]  # (1, b - a)


def prefix_kv(ad: Adapter, ids: torch.Tensor, start: int, rope) -> tuple[list, list]:
    """Clean keys and values of positions 0..start-1 per layer [(G, KV, start, hd)] x 2, from the
    engine's own blocks (a group's later runs from ``start' <= start`` slice them)."""
    L = ad.arch.n_layers
    if start == 0:
        return [None] * L, [None] * L
    dev = ids.device
    h = ad.embed(ids[:, :start])[None]  # (1, G, start, D)
    ks, vs = [], []
    for m in range(L):
        cos, sin = rope[m]
        o = block(ad, m, h, cos[None, :start], sin[None, :start], _positions(0, start, dev), kv_only=m == L - 1)
        ks.append(o.k[0].transpose(0, 1))  # (KV, G, start, hd) -> (G, KV, start, hd)
        vs.append(o.v[0].transpose(0, 1))
        h = o.h
    return ks, vs


def _slice(kv: list, prompts: slice, start: int) -> list:
    """Per layer (G, KV, P, hd) -> the prompts' first ``start`` positions (None when start is 0)."""
    return [None if x is None or start == 0 else x[prompts, :, :start] for x in kv]


def _joining(ad: Adapter, h: torch.Tensor, edits: list[Edit]) -> tuple[torch.Tensor, Ablate | None]:
    """Rows (G, n, S, D) of edits joining at their block: the spine row h[:, 0] edited, and the
    Ablate of their head edits (selecting the last n rows of the batch they join)."""
    spine = h[:, 0]  # (G, S, D)
    new = torch.stack([e.apply(spine) for e in edits], 1)  # (G, n, S, D)
    heads = [(j, e) for j, e in enumerate(edits) if e.head >= 0]
    if not heads:
        return new, None
    a = ad.arch
    hd = a.head_dim
    n, S = len(edits), h.shape[2]
    keep = torch.ones(1, n, S, a.n_heads * hd, dtype=h.dtype, device=h.device)
    repl = torch.zeros_like(keep)
    for j, e in heads:
        cols = slice(e.head * hd, (e.head + 1) * hd)
        keep[0, j, S - 1, cols] = 0
        repl[0, j, S - 1, cols] = e.z.to(h.dtype)  # type: ignore[union-attr]
    one = torch.ones((), dtype=h.dtype, device=h.device)
    sel = (slice(None), slice(h.shape[1], None))
    return new, Ablate(keep, one, one, repl_z=repl, sel=sel)


def _wave(ad: Adapter, ids: torch.Tensor, start: int, edits: list[Edit], order: list[int],
          pk: list, pv: list, rope) -> torch.Tensor:
    """The spine and ``edits`` (sorted by layer) from the embedding on -> (G, 1 + n, D) last residuals."""
    L = ad.arch.n_layers
    G, T = ids.shape
    dev = ids.device
    h = ad.embed(ids[:, start:])[:, None]  # (G, 1, S, D): the spine
    pos = _positions(start, T, dev)
    j = 0
    for m in range(L):
        ab = None
        first = j
        while j < len(order) and edits[order[j]].layer == m:
            j += 1
        if j > first:
            new, ab = _joining(ad, h, [edits[i] for i in order[first:j]])
            h = torch.cat([h, new], 1)
        cos, sin = rope[m]
        h = block(ad, m, h, cos[None, start:T], sin[None, start:T], pos, sh_k=pk[m], sh_v=pv[m], ab=ab).h
    assert j == len(order), "an edit's layer is outside 0..L-1"
    return h[:, :, -1]  # (G, 1 + n, D)


@torch.no_grad()
def run_group(ad: Adapter, ids: torch.Tensor, start: int, edits: Sequence[Edit], rope, sink: Sink,
              rows_per_pass: int | None = None, prefix: tuple[list, list] | None = None) -> torch.Tensor:
    """Every edit on every prompt of ``ids`` (G, T), from position ``start`` on.

    Calls ``sink(g, edit indices, logits (n, V), spine (V,))`` (float32) per prompt and chunk,
    the spine being the clean run of the same batch (the reference of the row's metrics); returns the first chunk's spine logits (G, V), the stored clean reference (another
    chunk's spine, in a batch of another shape, may differ from it by float rounding).
    ``prefix``: ``prefix_kv`` of these prompts from a start >= ``start`` (else computed here).
    """
    G, T = ids.shape
    assert 0 <= start < T, (start, T)
    S = T - start
    R = rows_per_pass or sizes(ad).rows_per_pass
    gc = max(1, min(G, R // (S * PROMPTS_PER_CHUNK_ROWS)))
    n_per = max(1, R // (gc * S) - 1)
    order = sorted(range(len(edits)), key=lambda i: edits[i].layer)
    clean = torch.empty(G, ad.arch.vocab_size, device=ids.device)
    if prefix is None:
        prefix = prefix_kv(ad, ids, start, rope)
    for g0 in range(0, G, gc):
        sub = ids[g0 : g0 + gc]
        pk, pv = (_slice(kv, slice(g0, g0 + gc), start) for kv in prefix)
        for c0 in range(0, max(1, len(order)), n_per):
            chunk = order[c0 : c0 + n_per]
            last = _wave(ad, sub, start, list(edits), chunk, pk, pv, rope)  # (g, 1 + n, D)
            for g in range(sub.shape[0]):
                logits = ad.logits(last[g])  # (1 + n, V)
                if c0 == 0:
                    clean[g0 + g] = logits[0]
                if chunk:
                    sink(g0 + g, chunk, logits[1:], logits[0])
    return clean


def hf_last_logits(ad: Adapter, ids: torch.Tensor) -> torch.Tensor:
    """(G, T) equal-length prompts -> (G, V) float32 logits of the model's own plain forward."""
    with torch.no_grad():
        return ad.model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
