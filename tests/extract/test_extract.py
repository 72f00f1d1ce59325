"""Extraction on tiny random Qwen2 (GQA 6:1, biases) and Llama (o_proj bias) models, checked
against independent computations; and the invariants on the real SmolLM2.

Tolerances: float32 throughout; 1e-4 relative (to max(1, |reference|)) for anything that is
the same math done in another order, 1e-5 for probabilities.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extract.config import ExtractConfig
from extract.pipeline.run import extract
from store import F, M, Role, WarehouseReader

WORDS = ("cat", "dog", "extraordinarily")
TOL = 1e-4


def _close(a, b, tol=TOL) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.abs(b).max()))
    assert a.shape == b.shape, (a.shape, b.shape)
    assert float(np.abs(a - b).max()) / scale <= tol, float(np.abs(a - b).max()) / scale


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("wh") / "w"
    summary = extract(ExtractConfig(out=out, model=str(tiny_model_dir), words=WORDS, ablation=(),
                                    progress=False, head_out_all_positions=True), log=lambda m: None)
    return tiny_model_dir, out, summary


def test_invariants_hold_and_are_stored(tiny_run):
    _, out, summary = tiny_run
    assert summary.n_prompts == len(WORDS) * 2
    assert not summary.failed, summary.validation
    with WarehouseReader(out) as r:
        for i in r.prompt_indices():
            rows = r.read(F.VALIDATION, i)
            assert {row["invariant"].decode() for row in rows} == set(summary.validation)
            assert all(row["passed"] and row["rel_err"] <= TOL for row in rows)
        assert r.manifest["status"] == "complete"


def test_shapes_follow_the_config(tiny_run):
    model_dir, out, _ = tiny_run
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    L, H, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    with WarehouseReader(out) as r:
        a = r.prompt_attrs(0)
        T = a["n_tokens"]
        assert r.read(F.RESID, 0).shape == (L + 1, T, D)
        assert r.read(F.ATTN_OUT, 0).shape == (L, T, D)
        assert r.read(F.HEAD_OUT, 0).shape == (L, H, D)
        assert r.read(F.HEAD_OUT_ALL, 0).shape == (L, T, H, D)
        assert r.read(F.ATTN_PATTERN, 0).shape == (L, H, T, T)
        assert r.read(F.LENS_TOPK_IDS, 0).shape == (L + 1, 10)
        assert r.read(F.DLA_HEAD, 0).shape == (L, H)
        kv = r.read_model(M.KV_GROUP)
        per = H // cfg.num_key_value_heads
        assert kv.tolist() == [h // per for h in range(H)]
        # attention rows are distributions over the causal prefix
        pat = r.read(F.ATTN_PATTERN, 0)
        _close(pat.sum(-1), np.ones((L, H, T)), 1e-5)
        assert np.all(np.triu(pat, 1) == 0)


def test_matches_an_independent_forward(tiny_run):
    """Residuals, patterns and logits equal HF's own hidden_states/attentions; head outputs
    equal attention recomputed by hand from the layer's weights."""
    model_dir, out, _ = tiny_run
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with WarehouseReader(out) as r:
        ids = torch.tensor(r.read(F.INPUT_IDS, 2))[None]
        with torch.no_grad():
            o = model(ids, output_hidden_states=True, output_attentions=True)
        L = model.config.num_hidden_layers
        resid = r.read(F.RESID, 2)
        for layer in range(L):  # HF's last hidden state is after the final norm: compare 0..L-1
            _close(resid[layer], o.hidden_states[layer][0].numpy())
        _close(r.read(F.ATTN_PATTERN, 2), torch.stack(o.attentions, 1)[0].numpy())
        _close(r.read(F.FINAL_LOGITS, 2), o.logits[0, -1].numpy())

        # Layer 1 attention by hand: GQA, biases, RoPE; then each head through its W_O slice.
        layer = 1
        att = model.model.layers[layer].self_attn
        cfg = model.config
        H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = att.head_dim
        with torch.no_grad():
            x = model.model.layers[layer].input_layernorm(torch.tensor(resid[layer])[None])
            T = x.shape[1]
            q = att.q_proj(x).view(1, T, H, hd).transpose(1, 2)
            k = att.k_proj(x).view(1, T, KV, hd).transpose(1, 2)
            v = att.v_proj(x).view(1, T, KV, hd).transpose(1, 2)
            cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(H // KV, 1)
            v = v.repeat_interleave(H // KV, 1)
            scores = q @ k.transpose(-1, -2) / hd**0.5
            scores = scores + torch.full((T, T), float("-inf")).triu(1)
            pat = scores.softmax(-1)  # (1, H, T, T)
            z = pat @ v  # (1, H, T, hd)
            w_o = att.o_proj.weight  # (D, H*hd)
            heads = torch.stack([z[0, h] @ w_o[:, h * hd:(h + 1) * hd].T for h in range(H)], 1)  # (T, H, D)
        _close(r.read(F.ATTN_PATTERN, 2)[layer], pat[0].numpy())
        _close(r.read(F.HEAD_OUT_ALL, 2)[layer], heads.numpy())
        _close(r.read(F.HEAD_OUT, 2)[layer], heads[-1].numpy())


def test_lens_and_dla_recomputed_with_numpy(tiny_run):
    model_dir, out, _ = tiny_run
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    W_U = model.lm_head.weight.detach().numpy().astype(np.float64)
    g = model.model.norm.weight.detach().numpy().astype(np.float64)
    eps = model.config.rms_norm_eps
    with WarehouseReader(out) as r:
        for i in r.prompt_indices():
            a = r.prompt_attrs(i)
            t = a["target_id"]
            resid = r.read(F.RESID, i)[:, -1].astype(np.float64)  # (L+1, D)
            scale = 1 / np.sqrt((resid**2).mean(-1, keepdims=True) + eps)
            logits = (resid * scale * g) @ W_U.T  # (L+1, V)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
            _close(r.read(F.LENS_TARGET_LOGIT, i), logits[:, t])
            _close(r.read(F.LENS_TARGET_PROB, i), np.exp(logp[:, t]), 1e-5)
            assert r.read(F.LENS_TARGET_RANK, i).tolist() == (logits > logits[:, [t]]).sum(-1).tolist()
            top = r.read(F.LENS_TOPK_IDS, i)
            _close(np.take_along_axis(logits, top.astype(np.int64), 1), np.sort(logits, -1)[:, ::-1][:, :10])
            # DLA: each term is component . (g * W_U[t]) * frozen scale; they sum to the logit.
            s = float(r.read(F.FINAL_SCALE, i))
            _close(s, scale[-1, 0], 1e-6)
            u = g * W_U[t]
            _close(r.read(F.DLA_HEAD, i), r.read(F.HEAD_OUT, i) @ u * s)
            _close(r.read(F.DLA_MLP, i), r.read(F.MLP_OUT, i)[:, -1] @ u * s)
            bias = [(lay.self_attn.o_proj.bias.detach().numpy() @ u * s) if lay.self_attn.o_proj.bias is not None else 0.0
                    for lay in model.model.layers]
            _close(r.read(F.DLA_ATTN_BIAS, i), np.array(bias, np.float64))
            total = r.read(F.DLA_EMBED, i) + r.read(F.DLA_HEAD, i).sum() + r.read(F.DLA_ATTN_BIAS, i).sum() + r.read(F.DLA_MLP, i).sum()
            _close(total, r.read(F.FINAL_LOGITS, i)[t])


def test_prompt_records(tiny_run):
    model_dir, out, _ = tiny_run
    with WarehouseReader(out) as r:
        attrs = [r.prompt_attrs(i) for i in r.prompt_indices()]
        assert [a["word"] for a in attrs] == list(WORDS) * 2
        assert [a["template_index"] for a in attrs] == [0] * 3 + [1] * 3
        for i, a in zip(r.prompt_indices(), attrs, strict=True):
            roles = r.read(F.POSITION_ROLE, i)
            text = r.read(F.TOKEN_TEXT, i)
            assert roles[0] == Role.FIRST and roles[-1] == Role.LAST
            assert "".join(text[roles == Role.WORD]).strip() == a["word"]
            gen = r.read(F.GENERATED_IDS, i)
            assert len(gen) <= 5
            assert a["top1_id"] == int(np.argmax(r.read(F.FINAL_LOGITS, i)))
            assert a["echo_first_token"] == (a["top1_id"] == a["target_id"])
        long = attrs[2]
        assert long["word"] == "extraordinarily"
        # the written form the target comes from decides the flag
        assert isinstance(long["word_multi_token"], bool)


def test_qwen_prompt_layout(tiny_qwen2_dir, tmp_path):
    """Qwen has no BOS: position 0 is <|im_start|>; --prepend-bos puts <|endoftext|> there."""
    out = tmp_path / "w"
    extract(ExtractConfig(out=out, model=str(tiny_qwen2_dir), words=("cat",), ablation=(),
                          progress=False, templates=("repeat the following word: {word}",)), log=lambda m: None)
    with WarehouseReader(out) as r:
        a = r.prompt_attrs(0)
        assert r.read(F.TOKEN_TEXT, 0)[0] == "<|im_start|>"
        assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in a["text"]
        assert a["text"].endswith("<|im_start|>assistant\n")
    out2 = tmp_path / "w2"
    extract(ExtractConfig(out=out2, model=str(tiny_qwen2_dir), words=("cat",), ablation=(), progress=False,
                          templates=("repeat the following word: {word}",), prepend_bos=True,
                          system_prompt="Be brief."), log=lambda m: None)
    with WarehouseReader(out2) as r:
        assert r.read(F.TOKEN_TEXT, 0)[:2].tolist() == ["<|endoftext|>", "<|im_start|>"]
        assert "Be brief." in r.prompt_attrs(0)["text"]
        assert "You are Qwen" not in r.prompt_attrs(0)["text"]


def test_store_dtypes(tiny_qwen2_dir, tmp_path):
    """bfloat16 storage keeps float32's range and reads back as float32 with plain h5py."""
    import h5py

    base = tmp_path / "f32"
    bf = tmp_path / "bf16"
    for out, sd in ((base, "float32"), (bf, "bfloat16")):
        extract(ExtractConfig(out=out, model=str(tiny_qwen2_dir), words=("cat",), ablation=(),
                              progress=False, store_dtype=sd), log=lambda m: None)
    with WarehouseReader(base) as r0, WarehouseReader(bf) as r1:
        _close(r1.read(F.RESID, 0), r0.read(F.RESID, 0), 1e-2)
        _close(r1.read(F.LENS_TARGET_PROB, 0), r0.read(F.LENS_TARGET_PROB, 0), 0)  # not an activation
    with h5py.File(bf / "prompts" / "p00000.h5", "r") as f:
        assert f["resid"].dtype.itemsize == 2 or f["resid"].id.get_type().get_size() == 2
        assert np.isfinite(f["resid"][()]).all()


@pytest.mark.slow
def test_smollm2_end_to_end(smollm2_dir, tmp_path):
    out = tmp_path / "w"
    s = extract(ExtractConfig(out=out, words=("cat", "dog", "house"), ablation=(), progress=False),
                log=lambda m: None)
    assert not s.failed, s.validation
    for v in s.validation.values():
        assert v["max_rel_err"] <= TOL
    with WarehouseReader(out) as r:
        assert r.manifest["model"]["n_layers"] == 30 and r.manifest["model"]["n_kv_heads"] == 3
        a = r.prompt_attrs(0)
        assert a["word"] == "cat" and a["target_text"].strip().lower() == "cat"
        # The "repeat" phrasing makes SmolLM2 say the word first (30 of 44 default words).
        assert sum(r.prompt_attrs(i)["echo_first_token"] for i in range(3)) >= 2
        assert r.read(F.TOKEN_TEXT, 0)[0] == "<|im_start|>"


def test_greedy_continuation_matches_generate(tiny_run):
    """The continuation reuses the clean run's cache; HF's own generate must agree."""
    model_dir, out, _ = tiny_run
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    with WarehouseReader(out) as r:
        for i in r.prompt_indices():
            ids = torch.tensor(r.read(F.INPUT_IDS, i))[None]
            with torch.no_grad():
                g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=5, pad_token_id=0)[0, ids.shape[1]:].tolist()
            expect = []
            for t in g:
                if t in eos:
                    break
                expect.append(t)
            assert r.read(F.GENERATED_IDS, i).tolist() == expect


def test_shards_readable_with_h5dump(tiny_run):
    """The warehouse is plain HDF5: h5dump (Debian's hdf5-tools) reads a shard and the bf16 type."""
    import shutil
    import subprocess

    if shutil.which("h5dump") is None:
        pytest.skip("h5dump not installed (scripts/setup.sh --browser installs hdf5-tools)")
    _, out, _ = tiny_run
    r = subprocess.run(["h5dump", "-H", str(out / "prompts" / "p00000.h5")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("resid", "attn_pattern", "lens_topk_ids", "dla_head", "validation"):
        assert f'DATASET "{name}"' in r.stdout
    r = subprocess.run(["h5dump", "-d", "final_scale", str(out / "prompts" / "p00000.h5")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "DATA" in r.stdout


def test_bfloat16_compute_tracks_float32(tiny_qwen2_dir, tmp_path):
    """--dtype bfloat16 (how a 1.5B model fits a laptop): the invariants hold at the bf16 tolerance
    and every stored number, ablation grid included, stays within it of the float32 run."""
    from store import A
    from store.schema import TOLERANCE

    runs = {}
    for dt in ("float32", "bfloat16"):
        out = tmp_path / dt
        s = extract(ExtractConfig(out=out, model=str(tiny_qwen2_dir), words=("cat", "dog"), dtype=dt,
                                  ablation=("zero", "mean", "sink"), ablate_layers=(0, 2), progress=False),
                    log=lambda m: None)
        assert not s.failed, s.validation
        runs[dt] = out
    tol = TOLERANCE["bfloat16"]
    with WarehouseReader(runs["float32"]) as r32, WarehouseReader(runs["bfloat16"]) as r16:
        assert r16.manifest["model"]["dtype"] == "bfloat16"
        assert max(v["max_rel_err"] for v in r16.manifest["validation"].values()) <= tol
        for i in r32.prompt_indices():
            assert r16.prompt_attrs(i)["target_id"] == r32.prompt_attrs(i)["target_id"]
            for f in (F.RESID, F.ATTN_PATTERN, F.FINAL_LOGITS, F.LENS_TARGET_LOGIT, F.DLA_HEAD, F.DLA_MLP,
                      F.VALUE_OUT_NORM, F.VALUE_NORM, F.KEY_NORM, F.QUERY_NORM, F.RESID_MEDIAN_ABS_ALL):
                _close(r16.read(f, i), r32.read(f, i), tol)
            for f in (A.TARGET_LOGIT, A.LOGIT_DIFF, A.KL):
                _close(r16.read(f, i, subdir="ablation"), r32.read(f, i, subdir="ablation"), tol)


def test_raw_prompt_keeps_the_word_when_it_is_the_last_token(tiny_qwen2_dir, tmp_path):
    """--no-chat-template: "repeat the following word: cat" ends with the word. The last position
    keeps its LAST role (analyses key on it) and the word's span is recorded beside the roles."""
    from query import Warehouse

    out = tmp_path / "w"
    extract(ExtractConfig(out=out, model=str(tiny_qwen2_dir), words=("cat", "hippopotamus"), ablation=(),
                          progress=False, chat_template=False,
                          templates=("repeat the following word: {word}",)), log=lambda m: None)
    with WarehouseReader(out) as r:
        for i in r.prompt_indices():
            a, roles, text = r.prompt_attrs(i), r.read(F.POSITION_ROLE, i), r.read(F.TOKEN_TEXT, i)
            assert roles[-1] == Role.LAST and a["word_end"] == a["n_tokens"]
            assert "".join(text[a["word_start"]:a["word_end"]]).strip() == a["word"]
        pats = {i: r.read(F.ATTN_PATTERN, i)[1, :, -1] for i in r.prompt_indices()}  # layer 1, (H, T)
        spans = {i: (r.prompt_attrs(i)["word_start"], r.prompt_attrs(i)["word_end"]) for i in r.prompt_indices()}
    with Warehouse(out) as wh:
        toks = wh.sql("SELECT prompt, position, in_word, role_name FROM tokens WHERE in_word ORDER BY 1, 2")
        assert toks.filter(toks["prompt"] == 0)["role_name"].to_list() == ["last"]  # " cat": one token
        assert toks.filter(toks["prompt"] == 1).height > 1  # hippopotamus: several, the last one 'last'
        fta = wh.run_analysis("first_token_attention", layer=1)
    for row in fta.iter_rows(named=True):
        lo, hi = spans[row["prompt"]]
        assert row["mass_word"] == pytest.approx(float(pats[row["prompt"]][row["head"], lo:hi].sum()), rel=1e-5)
        assert row["mass_word"] > 0


def test_chat_template_file_is_used_as_given(tiny_qwen2_dir, tmp_path):
    """--chat-template FILE wins over the tokenizer's template, whatever the file contains."""
    tpl = tmp_path / "t.jinja"
    tpl.write_text("<think>{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
                   "{% if add_generation_prompt %}<|im_end|>{% endif %}")
    out = tmp_path / "w"
    extract(ExtractConfig(out=out, model=str(tiny_qwen2_dir), words=("cat",), ablation=(), progress=False,
                          chat_template_file=tpl, templates=("repeat the following word: {word}",)),
            log=lambda m: None)
    with WarehouseReader(out) as r:
        assert r.prompt_attrs(0)["text"] == "<think><|im_start|>repeat the following word: cat<|im_end|>"
        from extract.stages.prompts import sha

        assert r.manifest["tokenizer"]["chat_template_sha"] == sha(tpl.read_text())


def test_greedy_continuation_without_a_cache_gives_the_same_tokens(tiny_run):
    """Models that hand back no KV cache are continued with full forwards: same tokens."""
    import dataclasses

    from extract.models.loading import Adapter, load_model
    from extract.stages.capture.engine import capture, greedy_continue

    model_dir, out, _ = tiny_run
    model, _, _ = load_model(str(model_dir), progress=False)
    ad = Adapter(model)
    with WarehouseReader(out) as r:
        ids = torch.tensor(np.stack([r.read(F.INPUT_IDS, i) for i in (0, 1)]))
        stored = [r.read(F.GENERATED_IDS, i).tolist() for i in (0, 1)]
    cap = capture(ad, ids)
    assert greedy_continue(ad, dataclasses.replace(cap, cache=None), 5, set()) == \
        greedy_continue(ad, cap, 5, set())
    gen = model.generation_config.eos_token_id
    eos = {gen} if isinstance(gen, int) else set(gen or [])
    assert greedy_continue(ad, dataclasses.replace(capture(ad, ids), cache=None), 5, eos) == stored


def test_head_out_all_view(tiny_run):
    """--head-out-all-positions is queryable: the view equals the stored array, its last position
    equals head_out, and a one-layer one-head query reads just that."""
    from query import Warehouse

    _, out, _ = tiny_run
    with WarehouseReader(out) as r:
        full = r.read(F.HEAD_OUT_ALL, 1)  # (L, T, H, D)
        last = r.read(F.HEAD_OUT, 1)  # (L, H, D)
    L, T, H, D = full.shape
    with Warehouse(out) as wh:
        df = wh.sql("SELECT layer, position, head, vec FROM head_out_all WHERE prompt = 1 AND layer = 1 "
                    "AND head = 3 ORDER BY position")
        assert wh.bytes_read == T * D * 4  # one layer, one head, every position of one prompt
        np.testing.assert_array_equal(np.stack(df["vec"].to_numpy()), full[1, :, 3])
        n = wh.sql("SELECT count(*) AS n FROM head_out_all WHERE prompt = 1")["n"][0]
        both = wh.sql("SELECT a.vec AS a, b.vec AS b FROM head_out_all a JOIN head_out b "
                      "USING (prompt, layer, head) WHERE a.prompt = 1 AND a.role = 4 ORDER BY layer, head")
    assert n == L * T * H and both.height == L * H
    np.testing.assert_array_equal(np.stack(both["a"].to_numpy()), np.stack(both["b"].to_numpy()))
    np.testing.assert_array_equal(full[:, -1], last)
