"""Independent reference for the task-vector / function-vector / steering spec (docs/specs/taskvec.md).

Written from the spec alone (no project code read), with torch + transformers only: every
number comes from a plain HF forward, with forward hooks / pre-hooks doing the reading and the
interventions. One forward per intervention, nothing cached, nothing batched.

Conventions:
- ids are a flat list[int] of one prompt (no padding, no batch); the model is an HF causal LM
  whose decoder blocks are `model.model.layers` and whose attention has `self_attn.o_proj`.
- resid[b]: b = 0 the embedding output (input of block 0), b = l the input of block l,
  b = L the output of the last block before the final norm.
- Means (task vectors, head means, steering vectors) are accumulated and returned in float64;
  a vector is cast to the model's dtype only when written into a forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

SANDWICH_FAMILIES = ("gemma2", "gemma3_text")  # post-attention norm after o_proj, (1 + w) weight

# ---------------------------------------------------------------- prompt sets


def split_words(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """Even list indices -> train, odd -> held-out."""
    if len(set(words)) != len(words):
        raise ValueError("split_words: the word list has duplicates; pass each word once")
    return list(words[0::2]), list(words[1::2])


def _demo_words(x: str, train: Sequence[str], n: int, words: Sequence[str] | None) -> list[str]:
    """The n train words following x's position cyclically, skipping x itself.

    x in train: its train index. x not in train: its position in the full list `words`
    (a held-out word words[2j+1] sits between train[j] and train[j+1], so it starts at train[j+1]).
    """
    if x in train:
        start = list(train).index(x) + 1
    elif words is not None and x in words:
        start = sum(1 for w in words[: list(words).index(x)] if w in train)
    else:
        raise ValueError(f"demo prompt for {x!r}: not a train word; pass words= (the full list)")
    pool = [train[(start + i) % len(train)] for i in range(len(train))]
    pool = [w for w in pool if w != x]
    if len(pool) < n:
        raise ValueError(f"demo prompt for {x!r}: {n} demonstrations need {n} other train words")
    return pool[:n]


def demo_text(x: str, train: Sequence[str], n: int = 5, words: Sequence[str] | None = None) -> str:
    demos = _demo_words(x, train, n, words)
    return "".join(f"{w} -> {w}\n" for w in demos) + f"{x} ->"


def shuffled_text(
    x: str, train: Sequence[str], n: int = 5, words: Sequence[str] | None = None
) -> str:
    """Demonstration prompt with labels rotated by one: w1 -> w2, ..., wn -> w1."""
    demos = _demo_words(x, train, n, words)
    labels = demos[1:] + demos[:1]
    return "".join(f"{w} -> {y}\n" for w, y in zip(demos, labels, strict=True)) + f"{x} ->"


def zero_shot_text(x: str) -> str:
    return f"{x} ->"


def instruction_text(template: str, x: str) -> str:
    if "{word}" not in template:
        raise ValueError(f"template {template!r} has no {{word}}; add it")
    return template.replace("{word}", x)


def prompt_ids(tokenizer, text: str, chat: bool, system_prompt: str | None = None) -> list[int]:
    """Chat: the text as the user turn of the tokenizer's chat template, generation prompt added
    (the rendered string tokenised without extra special tokens). Raw: tokenizer(text)."""
    if not chat:
        if system_prompt is not None:
            raise ValueError("system_prompt needs chat=True")
        return list(tokenizer(text)["input_ids"])
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": text})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def _variants(word: str) -> list[str]:
    cap = word[:1].upper() + word[1:]
    return [word, " " + word, cap, " " + cap]


def target_firsts(tokenizer, word: str) -> set[int]:
    """First token ids of word, " word", Word, " Word"."""
    return {tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in _variants(word)}


def target_token(tokenizer, word: str, clean_logits_last: Tensor) -> int:
    """Of the four first tokens, the one the clean logits rank highest (ties: variant order)."""
    firsts = [tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in _variants(word)]
    best = firsts[0]
    for t in firsts[1:]:
        if clean_logits_last[t] > clean_logits_last[best]:
            best = t
    return best


# ---------------------------------------------------------------- forwards with hooks


def _layers(model) -> nn.ModuleList:
    return model.model.layers


def _n_layers(model) -> int:
    return len(_layers(model))


def _forward_last(model, ids: Sequence[int]) -> Tensor:
    """Final logits (incl. any soft-cap) at the last position, (V,)."""
    x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    with torch.no_grad():
        return model(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1]


def _hidden_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _edit_resid(model, b: int, edit) -> list:
    """Install a hook that replaces resid[b] (1, T, D) by edit(resid[b]); returns the handles."""
    L = _n_layers(model)
    if not 0 <= b <= L:
        raise ValueError(f"boundary {b} outside 0..{L}")
    if b < L:

        def pre(module, args, kwargs):
            return _with_hidden(args, kwargs, edit(_hidden_of(args, kwargs)))

        return [_layers(model)[b].register_forward_pre_hook(pre, with_kwargs=True)]

    def post(module, args, output):
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    return [_layers(model)[L - 1].register_forward_hook(post)]


def _run_edited(model, ids: Sequence[int], b: int, edit) -> Tensor:
    handles = _edit_resid(model, b, edit)
    try:
        return _forward_last(model, ids)
    finally:
        for h in handles:
            h.remove()


def resid_at(model, ids: Sequence[int], b: int) -> Tensor:
    """resid[b] of the prompt, (T, D) in the model's dtype."""
    got: list[Tensor] = []

    def read(h: Tensor) -> Tensor:
        got.append(h[0].detach().clone())
        return h

    _run_edited(model, ids, b, read)
    assert len(got) == 1, "the hooked block ran more than once"
    return got[0]


def _positions(positions: Sequence[int] | None, T: int) -> list[int]:
    pos = [T - 1] if positions is None else [p % T for p in positions]
    assert all(0 <= p < T for p in pos), f"positions {positions} outside a {T}-token prompt"
    return pos


def run_with_resid_set(
    model, ids: Sequence[int], b: int, vec: Tensor, positions: Sequence[int] | None = None
) -> Tensor:
    """Logits at the last position with resid[b] at `positions` (default: last) replaced by vec,
    (D,) for every position or (P, D) one row per position. Everything downstream recomputed."""

    def edit(h: Tensor) -> Tensor:
        pos = _positions(positions, h.shape[1])
        h = h.clone()
        h[0, pos] = vec.to(h.dtype).expand(len(pos), h.shape[-1])
        return h

    return _run_edited(model, ids, b, edit)


def run_with_resid_added(
    model, ids: Sequence[int], b: int, vec: Tensor, positions: Sequence[int] | None = None
) -> Tensor:
    """Logits at the last position with vec added to resid[b] at `positions` (default: last)."""

    def edit(h: Tensor) -> Tensor:
        pos = _positions(positions, h.shape[1])
        h = h.clone()
        h[0, pos] = h[0, pos] + vec.to(h.dtype)
        return h

    return _run_edited(model, ids, b, edit)


def _head_dim(model, layer: int) -> int:
    n_heads = model.config.num_attention_heads
    in_features = _layers(model)[layer].self_attn.o_proj.in_features
    assert in_features % n_heads == 0, "o_proj input is not heads x head_dim"
    return in_features // n_heads


def run_with_head_z_set(model, ids: Sequence[int], layer: int, head: int, z_vec: Tensor) -> Tensor:
    """Logits at the last position with head (layer, head)'s slice of o_proj's input at the
    last position replaced by z_vec (hd,). Any post-norm recomputed (not frozen)."""
    hd = _head_dim(model, layer)
    assert z_vec.shape == (hd,), f"z_vec {tuple(z_vec.shape)} is not ({hd},)"

    def pre(module, args):
        z = args[0].clone()  # (1, T, H*hd)
        z[0, -1, head * hd : (head + 1) * hd] = z_vec.to(z.dtype)
        return (z, *args[1:])

    handle = _layers(model)[layer].self_attn.o_proj.register_forward_pre_hook(pre)
    try:
        return _forward_last(model, ids)
    finally:
        handle.remove()


# ---------------------------------------------------------------- per-head outputs


def _capture_heads(model, ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """One clean forward: z (L, H, hd) at the last position and head outputs (L, H, D), float64.

    head_h = z_h @ W_O[:, h-slice].T; sandwich-norm families: times s * (1 + w) of the
    post-attention norm at that position (s = 1/rms of the whole o_proj output, frozen)."""
    H = model.config.num_attention_heads
    sandwich = model.config.model_type in SANDWICH_FAMILIES
    z_last: dict[int, Tensor] = {}
    o_last: dict[int, Tensor] = {}
    handles = []
    for i, layer in enumerate(_layers(model)):

        def read_z(module, args, i=i):
            z_last[i] = args[0][0, -1].detach().to(torch.float64)

        def read_o(module, args, output, i=i):
            o_last[i] = output[0, -1].detach().to(torch.float64)

        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(read_z))
        handles.append(layer.self_attn.o_proj.register_forward_hook(read_o))
    try:
        _forward_last(model, ids)
    finally:
        for h in handles:
            h.remove()
    zs, outs = [], []
    for i, layer in enumerate(_layers(model)):
        hd = _head_dim(model, i)
        z = z_last[i].view(H, hd)  # (H, hd)
        w_o = layer.self_attn.o_proj.weight.detach().to(torch.float64)  # (D, H*hd)
        out = torch.einsum("hk,dhk->hd", z, w_o.view(-1, H, hd))  # (H, D)
        if sandwich:
            norm = layer.post_attention_layernorm
            s = torch.rsqrt(o_last[i].pow(2).mean() + norm.eps)
            out = out * (s * (1.0 + norm.weight.detach().to(torch.float64)))
        zs.append(z)
        outs.append(out)
    return torch.stack(zs), torch.stack(outs)  # (L, H, hd), (L, H, D)


def head_output(model, ids: Sequence[int], layer: int, head: int) -> Tensor:
    """Head (layer, head)'s output at the last position, (D,) float64."""
    return _capture_heads(model, ids)[1][layer, head]


def head_z(model, ids: Sequence[int], layer: int, head: int) -> Tensor:
    """Head (layer, head)'s o_proj-input slice at the last position, (hd,) float64."""
    return _capture_heads(model, ids)[0][layer, head]


# ---------------------------------------------------------------- vectors


def task_vector(model, list_of_ids: Sequence[Sequence[int]], b: int) -> Tensor:
    """Mean over prompts of resid[b] at the last position, (D,) float64."""
    assert len(list_of_ids) > 0, "task_vector needs at least one prompt"
    rows = [resid_at(model, ids, b)[-1].to(torch.float64) for ids in list_of_ids]
    return torch.stack(rows).mean(0)


def head_means(model, list_of_ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """(z_means (L, H, hd), out_means (L, H, D)), float64, over the prompts' last positions."""
    assert len(list_of_ids) > 0, "head_means needs at least one prompt"
    caps = [_capture_heads(model, ids) for ids in list_of_ids]
    z = torch.stack([c[0] for c in caps]).mean(0)
    out = torch.stack([c[1] for c in caps]).mean(0)
    return z, out


def _prob(logits_last: Tensor, target_id: int) -> float:
    return torch.softmax(logits_last.to(torch.float64), -1)[target_id].item()


def aie(
    model,
    shuffled_ids_list: Sequence[Sequence[int]],
    target_ids: Sequence[int],
    z_means: Tensor,
) -> Tensor:
    """AIE (L, H) float64: mean over prompts of P(target | head's last-position z set to its
    mean) - P(target | clean). One forward per (prompt, layer, head)."""
    assert len(shuffled_ids_list) == len(target_ids) > 0, "one target per prompt, at least one"
    L, H = _n_layers(model), model.config.num_attention_heads
    assert z_means.shape[:2] == (L, H), f"z_means {tuple(z_means.shape)} is not (L={L}, H={H}, hd)"
    total = torch.zeros(L, H, dtype=torch.float64)
    for ids, t in zip(shuffled_ids_list, target_ids, strict=True):
        p_clean = _prob(_forward_last(model, ids), t)
        for layer in range(L):
            for head in range(H):
                logits = run_with_head_z_set(model, ids, layer, head, z_means[layer, head])
                total[layer, head] += _prob(logits, t) - p_clean
    return total / len(target_ids)


def top_heads(aie_lh: Tensor, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) of highest AIE; ties broken by (layer, head) order."""
    L, H = aie_lh.shape
    assert 0 < k <= L * H, f"k={k} outside 1..{L * H}"
    order = torch.argsort(-aie_lh.flatten(), stable=True)[:k]
    return [(int(i) // H, int(i) % H) for i in order]


def function_vector(out_means: Tensor, aie_lh: Tensor, k: int) -> Tensor:
    """FV_k: sum of the mean outputs of the top-k heads by AIE, (D,)."""
    assert out_means.shape[:2] == aie_lh.shape, "out_means and aie disagree on (L, H)"
    return torch.stack([out_means[lay, h] for lay, h in top_heads(aie_lh, k)]).sum(0)


def steering_vector(
    model,
    repeat_ids_list: Sequence[Sequence[int]],
    echo_ids_list: Sequence[Sequence[int]],
    b: int,
) -> Tensor:
    """Mean over word pairs of resid[b](repeat, last) - resid[b](echo, last), (D,) float64."""
    assert len(repeat_ids_list) == len(echo_ids_list) > 0, "one echo prompt per repeat prompt"
    diffs = [
        resid_at(model, r, b)[-1].to(torch.float64) - resid_at(model, e, b)[-1].to(torch.float64)
        for r, e in zip(repeat_ids_list, echo_ids_list, strict=True)
    ]
    return torch.stack(diffs).mean(0)


# ---------------------------------------------------------------- metrics


def metrics(
    logits_last: Tensor, clean_logits_last: Tensor, target_id: int, firsts: set[int]
) -> dict[str, float | int | bool]:
    """prob and rank (0 = top-1; count of strictly higher logits) of the target, echo-correct
    top-1, KL(clean || intervened) in nats, intervened top-1 id. Computed in float64."""
    lg = logits_last.to(torch.float64)
    lp = torch.log_softmax(lg, -1)
    lp_clean = torch.log_softmax(clean_logits_last.to(torch.float64), -1)
    top1 = int(torch.argmax(lg))
    kl = torch.sum(lp_clean.exp() * (lp_clean - lp)).item()
    return {
        "prob": lp[target_id].exp().item(),
        "rank": int((lg > lg[target_id]).sum()),
        "correct": top1 in firsts,
        "kl": kl,
        "top1": top1,
    }
