"""Per-family adapters: where each supported architecture keeps its modules, and what differs.

Everything the warehouse computes runs through a model's own Hugging Face modules (norms,
projections, the MLP, the rotary embedding, q/k norms); a family only says which module plays
which part and which of a few switches it has. A config using a feature the adapters would get
wrong is refused with the reason (``check_supported``), never silently approximated.

Supported ``model_type`` values and what their adapter handles:

- ``llama``, ``qwen2``: pre-norm blocks (``input_layernorm`` / ``post_attention_layernorm`` before
  attention / MLP), separate q/k/v projections (biases allowed), RMSNorm scaling by ``w``;
  ``qwen2`` with ``use_sliding_window`` gets its per-layer windows from ``config.layer_types``.
- ``qwen3``: as qwen2 plus per-head RMSNorm of queries and keys (``q_norm``/``k_norm``) before RoPE.
- ``mistral``: as llama, with ``config.sliding_window`` on every layer.
- ``phi3``: fused ``qkv_proj`` (split [H*hd | KV*hd | KV*hd]) and ``gate_up_proj`` (inside the MLP
  module we call as is), partial rotary (only the first ``cos.shape[-1]`` dims rotate),
  ``config.sliding_window`` on every layer.
- ``gemma2`` and ``gemma3_text`` (``Gemma3ForCausalLM``; the multimodal ``gemma3`` wrapper is
  refused): sandwich norms -- the attention block adds ``post_attention_layernorm(o_proj(z))`` to
  the residual and the MLP block ``post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``
  -- RMSNorm scaling by ``1 + w``, the embedding scaled by sqrt(d_model) (inside HF's embedding
  module), GeGLU (the MLP module), ``query_pre_attn_scalar`` (the attention module's ``scaling``),
  alternating sliding-window layers (``config.layer_types``), final-logit soft-capping
  ``logit = cap * tanh(pre / cap)``; gemma2 also soft-caps attention scores (HF's gemma3 ignores
  ``attn_logit_softcapping``, and so do we); gemma3 uses a different RoPE base per layer type.

Per-head outputs under sandwich norms: the post-attention norm is not linear, so a head's
output is defined with the norm's scale frozen at the clean run, the way DLA freezes the final
norm: ``head_h = s * g * (z_h @ W_O^h)`` with ``s = 1 / rms(o_proj(z))`` of the whole o_proj
output at that position and ``g`` the norm's gain (``1 + w``). Then the heads plus the o_proj bias
term ``s * g * b`` sum exactly to the block's contribution (invariant 2). Ablation does not freeze
it: removing a head changes o_proj's output and the norm rescales, as in the model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class ModelError(Exception):
    """A user-facing problem loading or supporting a model."""


@dataclass(frozen=True)
class Family:
    """The few ways a supported family departs from the llama layout."""

    sandwich: bool = False  # post_attention / pre_ / post_feedforward norms (gemma2/3)
    one_plus_norm: bool = False  # RMSNorm multiplies by (1 + w)
    fused_qkv: bool = False  # one qkv_proj (phi3)
    qk_norm: bool = False  # per-head q_norm / k_norm before RoPE (qwen3, gemma3)
    attn_softcap: bool = False  # HF applies config.attn_logit_softcapping to scores (gemma2)
    windows_from_layer_types: bool = True  # else config.sliding_window on every layer
    rope_per_layer_type: bool = False  # rotary_emb(x, pos, layer_type) (gemma3)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm=True),
    "mistral": Family(windows_from_layer_types=False),
    "phi3": Family(fused_qkv=True, windows_from_layer_types=False),
    "gemma2": Family(sandwich=True, one_plus_norm=True, attn_softcap=True),
    "gemma3_text": Family(sandwich=True, one_plus_norm=True, qk_norm=True, rope_per_layer_type=True),
}
SUPPORTED_TYPES = tuple(FAMILIES)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # frequencies fixed at load time
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # frequencies change past the original length


def _rope_params(cfg: Any) -> list[dict]:
    """Every RoPE parameter dict of a config (one, or one per layer type)."""
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rp and all(isinstance(v, dict) for v in rp.values()):
        return [v for v in rp.values() if v]
    return [rp]


def check_supported(cfg: Any) -> None:
    """Refuse model configs the adapters would get wrong, saying why."""
    mt = getattr(cfg, "model_type", None)
    if mt == "gemma3":
        raise ModelError("model type 'gemma3' is Gemma 3's multimodal wrapper; pass a text-only "
                         "checkpoint (model type gemma3_text, Gemma3ForCausalLM)")
    if mt not in FAMILIES:
        raise ModelError(f"model type {mt!r} is not supported; supported types: {', '.join(SUPPORTED_TYPES)}")
    check_not_quantised(cfg)
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if cfg.num_attention_heads % kv:
        raise ModelError("query heads must be a multiple of KV heads")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ModelError("bidirectional attention (use_bidirectional_attention) is not supported: "
                         "the ablation engine and prefix sharing assume causal attention")
    for rp in _rope_params(cfg):
        rt = rp.get("rope_type", rp.get("type", "default"))
        if rt not in STATIC_ROPE + LENGTH_DEPENDENT_ROPE:
            raise ModelError(f"RoPE type {rt!r} is not supported (supported: "
                             f"{', '.join(STATIC_ROPE + LENGTH_DEPENDENT_ROPE)})")
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and set(layer_types) - {"full_attention", "sliding_attention"}:
        raise ModelError(f"layer types {sorted(set(layer_types))} are not supported "
                         "(only full_attention and sliding_attention)")
    if mt == "mistral" and layer_types and "sliding_attention" in layer_types and \
            "full_attention" in layer_types:
        raise ModelError("a mistral config with mixed layer_types is not supported (HF's Mistral "
                         "ignores them; use the Ministral family)")


def check_not_quantised(cfg: Any) -> None:
    """Refuse quantised checkpoints (AWQ, GPTQ, bitsandbytes, ...): the hooks, the ablation engine
    and the stored activations need dense weights (the embedded GGUF is dequantised on conversion)."""
    qc = getattr(cfg, "quantization_config", None)
    if not qc:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method) or "unknown"
    raise ModelError(f"this checkpoint is quantised (quant_method {method}), which is not supported: per-head "
                     "outputs and ablations need dense weights; pass the unquantised model (float32 or bfloat16)")


@dataclass(frozen=True)
class Arch:
    """Sizes and per-layer attention settings of a decoder-only model, read from its config."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    norm_eps: float
    final_softcap: float | None = None  # logits = cap * tanh(pre / cap); None = no cap
    attn_softcap: float | None = None  # attention scores soft-capped the same way
    windows: tuple[int | None, ...] = ()  # per layer: a query sees the last `window` positions

    @property
    def kv_group(self) -> list[int]:
        """KV head read by each query head: HF's repeat_kv maps head h to h // (H / KV)."""
        per = self.n_heads // self.n_kv_heads
        return [h // per for h in range(self.n_heads)]


def _windows(cfg: Any, fam: Family) -> tuple[int | None, ...]:
    """Per-layer sliding window, as HF's model forward picks its masks."""
    L = cfg.num_hidden_layers
    w = getattr(cfg, "sliding_window", None)
    if not fam.windows_from_layer_types:
        return (w,) * L
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * L
    return tuple(w if t == "sliding_attention" else None for t in types[:L])


class Adapter:
    """Handles to one model's modules, and the family's few switches (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        check_supported(cfg)
        self.model = model
        self.family = FAMILIES[cfg.model_type]
        fam = self.family
        self.arch = Arch(
            model_type=cfg.model_type,
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            d_model=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            norm_eps=float(self.norm_eps(self.final_norm)),
            final_softcap=getattr(cfg, "final_logit_softcapping", None),
            attn_softcap=getattr(cfg, "attn_logit_softcapping", None) if fam.attn_softcap else None,
            windows=_windows(cfg, fam),
        )
        if self.lm_head.bias is not None:
            raise ModelError("an unembedding with a bias is not supported (DLA would miss it)")
        if getattr(cfg, "_attn_implementation", "eager") != "eager":
            raise ModelError("attention weights need attn_implementation='eager'")

    @property
    def cache_kwarg(self) -> str:
        """transformers renamed ``past_key_values`` to ``cache``; use what this version takes."""
        params = inspect.signature(type(self.model).forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    # -- module handles ------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def embed(self) -> nn.Module:
        """The model's embedding module (gemma's scales by sqrt(d_model) itself)."""
        return self.model.model.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def rotary(self) -> nn.Module:
        return self.model.model.rotary_emb

    def attn(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def o_proj(self, layer: int) -> nn.Linear:
        return self.attn(layer).o_proj

    def norm_attn(self, layer: int) -> nn.Module:
        """The norm before attention."""
        return self.layers[layer].input_layernorm

    def norm_mlp(self, layer: int) -> nn.Module:
        """The norm before the MLP."""
        lay = self.layers[layer]
        return lay.pre_feedforward_layernorm if self.family.sandwich else lay.post_attention_layernorm

    def post_attn(self, layer: int) -> nn.Module | None:
        """The norm on the attention output (sandwich families), else None."""
        return self.layers[layer].post_attention_layernorm if self.family.sandwich else None

    def post_mlp(self, layer: int) -> nn.Module | None:
        return self.layers[layer].post_feedforward_layernorm if self.family.sandwich else None

    def attn_point(self, layer: int) -> tuple[nn.Module, bool]:
        """(module, output is a tuple) whose output is the attention block's residual contribution."""
        post = self.post_attn(layer)
        return (post, False) if post is not None else (self.attn(layer), True)

    def mlp_point(self, layer: int) -> nn.Module:
        """The module whose output is the MLP block's residual contribution."""
        return self.post_mlp(layer) or self.layers[layer].mlp

    # -- the family's computations -------------------------------------------------------------

    def qkv(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., D) normed input -> q (..., H*hd), k, v (..., KV*hd) through the model's projections."""
        att = self.attn(layer)
        if not self.family.fused_qkv:
            return att.q_proj(x), att.k_proj(x), att.v_proj(x)
        a = self.arch
        nq, nk = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        qkv = att.qkv_proj(x)
        return qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]

    def qk_norm(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head q/k norms on (..., heads, hd) where the family has them."""
        if not self.family.qk_norm:
            return q, k
        att = self.attn(layer)
        return att.q_norm(q), att.k_norm(k)

    def scaling(self, layer: int) -> float:
        """Score scale: 1/sqrt(hd), or gemma's query_pre_attn_scalar**-0.5, as the module has it."""
        return float(self.attn(layer).scaling)

    def rope(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, cos and sin (n, rotary dims) for positions 0..n-1 from the model's rotary module."""
        cfg = self.model.config
        for rp in _rope_params(cfg):
            if rp.get("rope_type", "default") in LENGTH_DEPENDENT_ROPE:
                orig = rp.get("original_max_position_embeddings") or getattr(
                    cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings
                if n > orig:
                    raise ModelError(f"prompts of {n} tokens exceed the original context ({orig}) of a "
                                     f"{rp['rope_type']} RoPE: its frequencies would depend on the length")
        w = self.lm_head.weight
        dummy = torch.zeros(1, 1, self.arch.d_model, dtype=w.dtype, device=w.device)
        pos = torch.arange(n, device=w.device)[None]
        if not self.family.rope_per_layer_type:
            cos, sin = self.rotary(dummy, pos)
            return [(cos[0], sin[0])] * self.arch.n_layers
        tables = {t: self.rotary(dummy, pos, t) for t in set(cfg.layer_types)}
        return [(tables[t][0][0], tables[t][1][0]) for t in cfg.layer_types[: self.arch.n_layers]]

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """The final soft-cap, cap * tanh(x / cap), where the model has one."""
        cap = self.arch.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) residual -> (..., V) float32 logits through the model's norm, head and soft-cap."""
        return self.softcap(self.lm_head(self.final_norm(h)).float())

    @staticmethod
    def norm_eps(norm: nn.Module) -> float:
        return float(getattr(norm, "variance_epsilon", None) or norm.eps)

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """The RMSNorm's effective per-feature gain (float32): w, or 1 + w for gemma."""
        w = norm.weight.float()
        return 1.0 + w if self.family.one_plus_norm else w

    def w_o(self, layer: int) -> torch.Tensor:
        """W_O of a layer as (D, H, hd): head h's slice of the o_proj input maps through [:, h]."""
        a = self.arch
        return self.o_proj(layer).weight.view(a.d_model, a.n_heads, a.head_dim)

    def o_bias(self, layer: int) -> torch.Tensor | None:
        return self.o_proj(layer).bias

    def head_gain(self, layer: int, z: torch.Tensor) -> torch.Tensor | None:
        """(..., H*hd) o_proj inputs -> (..., D) frozen post-norm gain s * g, None without sandwich."""
        post = self.post_attn(layer)
        if post is None:
            return None
        o = nn.functional.linear(z.float(), self.o_proj(layer).weight.float(),
                                 None if self.o_bias(layer) is None else self.o_bias(layer).float())
        s = torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps(post))
        return s * self.norm_gain(post)

    def folded_unembed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """W_U rows with the final-norm gain folded in: pre-cap logit = scale * resid . row."""
        w = self.lm_head.weight[token_ids].float()  # (R, D)
        return w * self.norm_gain(self.final_norm)[None, :]
