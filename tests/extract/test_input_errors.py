"""Input the run cannot honour is refused in one line, before anything is written (issue 8,
item 5): quantised checkpoints, chat-template options with --no-chat-template, and a BOS that
--prepend-bos would double."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from echowh.cli import main
from extract.config import ConfigError, ExtractConfig
from extract.stages.prompts import bos_id, build_prompts

T = ("repeat the following word: {word}",)


def _extract(*args: str):
    return CliRunner().invoke(main, ["extract", "--quiet", "--ablation", "none", "--max-new-tokens", "1", *args])


def _one_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


@pytest.mark.parametrize("method", ["awq", "gptq", "bitsandbytes"])
def test_quantised_checkpoints_are_refused(tiny_qwen2_dir, tmp_path, method):
    folder = tmp_path / "quantised"
    folder.mkdir()
    for f in tiny_qwen2_dir.iterdir():
        if f.name != "config.json":
            os.symlink(f, folder / f.name)
    cfg = json.loads((tiny_qwen2_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "w"
    line = _one_line(_extract("--model", str(folder), "--out", str(out)))
    assert line == (f"Error: this checkpoint is quantised (quant_method {method}), which is not supported: "
                    "per-head outputs and ablations need dense weights; pass the unquantised model "
                    "(float32 or bfloat16)")
    assert not out.exists()


def test_the_embedded_gguf_is_dense(smollm2_dir):
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())


@pytest.mark.parametrize("extra,named", [
    (["--system-prompt", "Be brief."], "--system-prompt"),
    (["--chat-template", "TEMPLATE"], "--chat-template"),
    (["--system-prompt", "x", "--chat-template", "TEMPLATE"], "--system-prompt and --chat-template"),
])
def test_chat_options_without_the_chat_template(tiny_qwen2_dir, tmp_path, extra, named):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{{ messages[0]['content'] }}")
    extra = [str(tpl) if a == "TEMPLATE" else a for a in extra]
    out = tmp_path / "w"
    line = _one_line(_extract("--model", str(tiny_qwen2_dir), "--out", str(out), "--no-chat-template", *extra))
    assert line == (f"Error: {named} only apply with the chat template, which --no-chat-template switches off; "
                    "drop one of them")
    assert not out.exists()
    with pytest.raises(ConfigError, match="^`system_prompt` only apply"):  # the Python API names the field
        ExtractConfig(chat_template=False, system_prompt="x")


def _adds_bos(tok):
    """The same tokenizer, made to add its BOS itself (as Llama-2/3 tokenizers do)."""
    from tokenizers.processors import TemplateProcessing

    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("kind", ["qwen2", "llama", "llama-adds-bos"])
def test_prepend_bos_never_doubles(kind, chat, tiny_qwen2_dir, tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir if kind == "qwen2" else tiny_llama_dir))
    if kind == "llama-adds-bos":
        tok = _adds_bos(tok)
    bos = bos_id(tok)
    plain = build_prompts(tok, ["cat"], T, chat=chat)[0]
    (p,) = build_prompts(tok, ["cat"], T, chat=chat, prepend_bos=True)
    assert p.input_ids[0] == bos and p.input_ids[1] != bos, p.token_text[:3]
    # BOS added exactly when position 0 was not one already; the word's positions follow it
    added = plain.input_ids[0] != bos
    assert p.input_ids == ((bos,) if added else ()) + plain.input_ids
    assert p.word_start == plain.word_start + added and p.token_text[p.word_start:p.word_end] == \
        plain.token_text[plain.word_start:plain.word_end]
    # which cases really exercise the guard: SmolLM2's chat template starts with its BOS
    # (<|im_start|>), and the BOS-adding tokenizer adds one to a raw prompt
    if kind == "llama" and chat or kind == "llama-adds-bos":
        assert not added
    if kind == "qwen2":
        assert added and tok.convert_ids_to_tokens(bos) == "<|endoftext|>"


def test_cli_prepend_bos_once(tiny_llama_dir, tmp_path):
    from store import F, WarehouseReader

    out = tmp_path / "w"
    r = _extract("--model", str(tiny_llama_dir), "--out", str(out), "--prepend-bos", "--template", T[0],
                 "--words", str(_words(tmp_path)))
    assert r.exit_code == 0, r.output
    with WarehouseReader(out) as w:
        ids = w.read(F.INPUT_IDS, 0)
    assert ids[0] != ids[1]


def _words(tmp_path: Path) -> Path:
    p = tmp_path / "words.txt"
    p.write_text("cat\n")
    return p
