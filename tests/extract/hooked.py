"""The independent reference of the ablation engine: unmodified HF forwards with forward hooks
on the real HF modules removing ONE unit (what common tooling does), batched over prompts.

A batch of prompts is right-padded with an attention mask; each prompt's logits are read at
its own last real token (padding after it is never attended under the causal mask). Removing
a unit: head h = its slice of the o_proj input, the attention block = the self-attention
module's output (o_proj bias included; under gemma's sandwich norms the post-attention norm's
output), the MLP block = the MLP module's output (gemma: the post-feedforward norm's); replaced by 0
(zero) or by the engine's documented means (mean, see extract.stages.ablation.metrics), at every position or
at each prompt's last position only.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from extract.models.loading import Adapter
from extract.stages.ablation import metrics as abl
from extract.stages.prompts import Prompt


def pad(prompts: Sequence[Prompt], dev="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, T), attention mask (N, T) and each prompt's last index (N,)."""
    T = max(p.n_tokens for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long, device=dev)
    mask = torch.zeros(len(prompts), T, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, : p.n_tokens] = torch.tensor(p.input_ids)
        mask[i, : p.n_tokens] = 1
    return ids, mask, torch.tensor([p.n_tokens - 1 for p in prompts], device=dev)


@torch.no_grad()
def hf_logits(adapter: Adapter, prompts: Sequence[Prompt], vocab: torch.Tensor | None = None) -> torch.Tensor:
    """(N, V) float32 logits at each prompt's last token (only the ``vocab`` columns if given)."""
    dev = adapter.lm_head.weight.device
    ids, mask, last = pad(prompts, dev)
    hidden = adapter.model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, T, D), normed
    h = hidden[torch.arange(len(prompts), device=dev), last]  # (N, D)
    if vocab is None:
        logits = adapter.lm_head(h).float()
    else:
        logits = (h @ adapter.lm_head.weight[vocab].T).float()  # (N, |vocab|): the same rows of the same head
    cap = adapter.arch.final_softcap  # gemma: the model's final-logit soft-cap, as its own forward applies it
    return cap * torch.tanh(logits / cap) if cap else logits


def mean_rows(means: abl.Means, p: Prompt, layer: int) -> tuple[torch.Tensor, ...]:
    """The replacement values of every position of p: (T, H*hd), (T, D), (T, D)."""
    idx = torch.tensor(means.maps[p.template_index].keys(p))
    t = p.template_index
    return means.z[t][layer][idx], means.attn[t][layer][idx], means.mlp[t][layer][idx]


@contextmanager
def one_unit(adapter: Adapter, layer: int, unit: int, mode: str, means: abl.Means | None,
             prompts: Sequence[Prompt], last: bool):
    """Hooks removing ONE unit of ``layer`` from an unmodified HF forward over ``prompts``."""
    a = adapter.arch
    H, hd, D = a.n_heads, a.head_dim, a.d_model
    dt = adapter.lm_head.weight.dtype
    N, T = len(prompts), max(p.n_tokens for p in prompts)
    where = torch.zeros(N, T, 1, dtype=torch.bool)  # positions whose unit output is replaced
    repl = [torch.zeros(N, T, w, dtype=dt) for w in (H * hd, D, D)]  # (N, T, X) per output
    for i, p in enumerate(prompts):
        if last:
            where[i, p.n_tokens - 1] = True
        else:
            where[i, : p.n_tokens] = True
        if mode == "mean":
            for r, v in zip(repl, mean_rows(means, p, layer), strict=True):
                r[i, : p.n_tokens] = v
    if unit < H:
        cols = torch.zeros(1, 1, H * hd, dtype=torch.bool)
        cols[..., unit * hd : (unit + 1) * hd] = True
        sel = where & cols  # (N, T, H*hd)

        def pre(mod, args):
            return (torch.where(sel, repl[0], args[0]),)

        h = adapter.o_proj(layer).register_forward_pre_hook(pre)
    elif unit == H:
        point, is_tuple = adapter.attn_point(layer)  # self_attn, or gemma's post-attention norm

        def post_attn(mod, args, out):
            if is_tuple:
                return (torch.where(where, repl[1], out[0]), *out[1:])
            return torch.where(where, repl[1], out)

        h = point.register_forward_hook(post_attn)
    else:
        def post_mlp(mod, args, out):
            return torch.where(where, repl[2], out)

        h = adapter.mlp_point(layer).register_forward_hook(post_mlp)
    try:
        yield
    finally:
        h.remove()
