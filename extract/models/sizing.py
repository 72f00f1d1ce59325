"""Batch and chunk sizes from the device, not from CPU constants.

The ablation engine cuts its work into block calls of about ``rows_per_pass`` batch rows
(configs x prompts x positions) and advances ``wave_prompts`` prompts' last-position wavefronts
together; extraction runs ``extract_batch`` prompts of equal length per forward. On a CPU the
measured sweet spot is small (1536 rows, 4 prompts, 32 prompts: larger batches only add memory),
so those stay exactly as they were (a CPU run's numbers do not change). On a GPU the sizes are
derived from the device's memory (its total less the model's weights): a fixed fraction, divided
by what one row costs for this model's shape, so a larger GPU or a smaller model runs bigger
batches, and a model that leaves little room runs small ones instead of running out of memory.

What one row of a block call holds (elements, in the compute dtype): the residual in and out and
the normed input (3 D), the query/key/value and the attention output (H hd + 2 KV hd + H hd), the
MLP's gate, up and product (3 I), and one attention-score row per head over the context (H ctx).
``ROW_OVERHEAD`` covers the temporaries PyTorch keeps beside them (softmax output, casts).
Numbers are sizes, not results: a different size changes speed and memory, never a stored value
beyond float rounding of a different batch shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from extract.models.loading import Adapter

CPU_ROWS_PER_PASS = 1536
CPU_WAVE_PROMPTS = 4
CPU_EXTRACT_BATCH = 32
GPU_MEMORY_FRACTION = 0.35  # of the free memory, for one block call's activations
ROW_OVERHEAD = 2.0
MAX_ROWS_PER_PASS = 1 << 17  # beyond this a block call is already far past saturating a GPU
MAX_WAVE_PROMPTS = 64
MAX_EXTRACT_BATCH = 256
CONTEXT = 64  # tokens of context a row attends to in the sizing (the study's prompts: 10-40)


@dataclass(frozen=True)
class Sizes:
    """How much work one call takes, for one model on one device."""

    rows_per_pass: int
    """Target batch rows (configs x prompts x positions) per ablation block call."""
    wave_prompts: int
    """Prompts whose last-position ablation wavefronts advance together."""
    extract_batch: int
    """Prompts of equal length per extraction forward."""
    source: str
    """``cpu`` (the measured constants) or ``cuda: N GiB free`` (derived from N)."""


def row_bytes(ad: Adapter, ctx: int = CONTEXT) -> int:
    """Bytes one batch row of a block call holds (see the module docstring)."""
    a = ad.arch
    inter = int(getattr(ad.model.config, "intermediate_size", 4 * a.d_model))
    elems = 3 * a.d_model + (2 * a.n_heads + 2 * a.n_kv_heads) * a.head_dim + 3 * inter + a.n_heads * ctx
    return int(elems * ad.lm_head.weight.element_size() * ROW_OVERHEAD)


def sizes_for(ad: Adapter, free_bytes: int | None = None) -> Sizes:
    """The sizes for ``ad``'s device: CPU constants, or derived from the GPU's memory.

    ``free_bytes`` overrides the memory left beside the weights (tests; planning another device).
    """
    dev = ad.lm_head.weight.device
    if dev.type != "cuda" and free_bytes is None:
        return Sizes(CPU_ROWS_PER_PASS, CPU_WAVE_PROMPTS, CPU_EXTRACT_BATCH, "cpu")
    if free_bytes is None:
        # The device's total memory less the model's weights, not what happens to be free now:
        # a resumed run on the same device and model cuts its work exactly as the first did.
        _, total = torch.cuda.mem_get_info(dev)
        weights = sum(p.numel() * p.element_size() for p in ad.model.parameters())
        free_bytes = max(0, total - weights)
    a = ad.arch
    budget = GPU_MEMORY_FRACTION * free_bytes
    rows = int(budget // row_bytes(ad))
    rows = max(CPU_ROWS_PER_PASS, min(MAX_ROWS_PER_PASS, rows))
    # A wavefront row per (ablated layer, config): at most L x (H + 2) rows per prompt per mode,
    # plus the (rows, V) logits of its last block in float32.
    per_prompt = a.n_layers * (a.n_heads + 2) * 2
    logit_rows = budget // (4 * a.vocab_size)
    wave = max(CPU_WAVE_PROMPTS, min(MAX_WAVE_PROMPTS, rows // per_prompt, int(logit_rows // per_prompt)))
    # Extraction keeps every boundary's residual and every layer's attention pattern per prompt.
    per_extract = (a.n_layers + 1) * CONTEXT * (4 * a.d_model + a.n_heads * CONTEXT) * 4 + 4 * a.vocab_size * (a.n_layers + 1)
    batch = max(CPU_EXTRACT_BATCH, min(MAX_EXTRACT_BATCH, int(budget // per_extract)))
    return Sizes(rows, wave, batch, f"{dev.type}: {free_bytes / 2**30:.1f} GiB free")


_CACHE: dict[tuple, Sizes] = {}


def sizes(ad: Adapter) -> Sizes:
    """``sizes_for(ad)``, measured once per (model, device): every call of a run cuts alike."""
    key = (id(ad.model), ad.arch, str(ad.lm_head.weight.device), ad.lm_head.weight.dtype)
    if key not in _CACHE:
        _CACHE[key] = sizes_for(ad)
    return _CACHE[key]
