"""What a run records about itself: the fingerprint, the manifest, the environment, model.h5."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from extract.config import ExtractConfig
from extract.stages.base import Loaded
from extract.stages.capture.sinks import SINK_CAPTURES
from extract.stages.prompts import sha
from store.schema import M
from store.warehouse import WarehouseWriter

LIBRARIES = ("torch", "transformers", "h5py", "numpy", "echo-warehouse")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def environment(model: Loaded) -> dict[str, Any]:
    """Where and with what this run computes: one entry of the manifest's ``environments``.

    A resume must match the first run's device, dtype, torch and transformers versions
    (store.schema.ENV_MUST_MATCH) unless ``allow_env_change``.
    """
    dev = model.adapter.lm_head.weight.device
    libs = library_versions()
    env = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": dev.type,
        "dtype": model.cfg.dtype,
        "torch": libs["torch"],
        "transformers": libs["transformers"],
        "torch_threads": torch.get_num_threads(),
        "python": libs["python"],
        "platform": platform.platform(),
        "host": platform.node(),
    }
    if dev.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def tokenizer_hash(tok) -> str:
    try:
        return sha(tok.backend_tokenizer.to_str())  # type: ignore[return-value]
    except AttributeError:
        return sha(repr(sorted(tok.get_vocab().items())))  # type: ignore[return-value]


def resolved_parts(cfg: ExtractConfig, tok, ident: dict, words: list[str]) -> dict[str, Any]:
    """The fingerprint's parts that the config alone does not fix (model identity, words, hashes)."""
    return {
        "model": ident["model"],
        "model_revision": ident.get("revision"),
        "words": words,
        "tokenizer_sha": tokenizer_hash(tok),
        "chat_template_sha": sha(getattr(tok, "chat_template", None)) if cfg.chat_template else None,
        "sink_captures": SINK_CAPTURES,  # a warehouse without them (or older ones) is not resumed
    }


def fingerprint(cfg: ExtractConfig, tok, ident: dict, words: list[str]) -> tuple[str, dict[str, Any]]:
    """(fingerprint, its parts): what must match between a warehouse and a run resuming it."""
    parts = cfg.fingerprint_parts(resolved_parts(cfg, tok, ident, words))
    return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:16], parts


def make_manifest(cfg: ExtractConfig, model: Loaded) -> dict[str, Any]:
    a = model.adapter.arch
    tok, prompts = model.tok, model.prompts
    fp, parts = fingerprint(cfg, tok, model.ident, model.words)
    assert fp == model.fingerprint, (fp, model.fingerprint)
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "status": "running",
        "fingerprint": fp,
        "fingerprint_parts": parts,
        "model": {**model.ident, **a.__dict__, "kv_group": a.kv_group},
        "tokenizer": {"class": type(tok).__name__, "sha": parts["tokenizer_sha"],
                      "chat_template_sha": parts["chat_template_sha"],
                      "first_token": prompts[0].token_text[0]},
        "config": cfg.as_manifest(),
        "templates": list(cfg.templates),
        "words": model.words,
        "prompts": [{"index": p.index, "word": p.word, "template_index": p.template_index,
                     "n_tokens": p.n_tokens} for p in prompts],
        "libraries": library_versions(),
        "environments": [environment(model)],  # a resume appends its own
    }


def write_model_file(w: WarehouseWriter, model: Loaded) -> None:
    """``model.h5``: the unembedding rows of every candidate target, the final norm, the vocabulary."""
    adapter, tok = model.adapter, model.tok
    a = adapter.arch
    ids = sorted({c[1] for p in model.prompts for c in p.candidates})
    n_text = min(a.vocab_size, len(tok))
    vocab = tok.batch_decode([[i] for i in range(n_text)]) + [""] * (a.vocab_size - n_text)
    dev = adapter.lm_head.weight.device
    with torch.no_grad(), w.model_writer() as s:
        s.put(M.UNEMBED_IDS, np.array(ids, np.int32))
        s.put(M.UNEMBED_ROWS, adapter.folded_unembed(torch.tensor(ids, device=dev)).cpu().numpy())
        s.put(M.FINAL_NORM_WEIGHT, adapter.norm_gain(adapter.final_norm).cpu().numpy())
        s.put(M.KV_GROUP, np.array(a.kv_group, np.int32))
        s.put(M.VOCAB_TEXT, vocab)
        s.attrs({"model_type": a.model_type, "n_layers": a.n_layers, "n_heads": a.n_heads,
                 "n_kv_heads": a.n_kv_heads, "head_dim": a.head_dim, "d_model": a.d_model,
                 "vocab_size": a.vocab_size, "norm_eps": a.norm_eps,
                 "final_softcap": float(a.final_softcap or 0.0),
                 "fingerprint": w.manifest["fingerprint"]})
