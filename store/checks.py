"""Structure checks of a shard against the schema: the typed contract, applied on read.

Expected sizes come from the manifest and model.h5's attributes (never from the shard under
test): L layers, B = L + 1, H heads, D d_model, V vocabulary, K top-k, U = H + 2 ablation
units; per shard, T = the prompt's token count in the manifest, M and L of an ablation shard
= the run's modes and ablated layers. A symbol whose size is unknown (an older or hand-made
manifest) is not checked; the rank always is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import h5py
import numpy as np

from store.circuits_schema import (
    CG,
    CI,
    CIRCUIT_ATTRS,
    INPUT_KINDS,
    METHODS,
    METRICS,
    SELECTIONS,
    SIZES,
)
from store.schema import (
    ABLATION_ATTRS,
    MODEL_ATTRS,
    PATCHING_ATTRS,
    PROMPT_ATTRS,
    PT,
    SCHEMA_VERSION,
    VALIDATION_DTYPE,
    A,
    F,
    Field,
    M,
)
from store.shard import BFLOAT16_FIELDS
from store.taskvec_schema import TQ, TV, TV_ATTRS, TVW_ATTRS

# taskvec: taskvec/vectors.h5; taskvec_word: a held-out word's taskvec/{aie,interventions}/wNNNNN.h5
Kind = Literal["prompt", "ablation", "model", "patching", "circuits", "circuits_graph", "taskvec", "taskvec_word"]


def _fields(cls: type) -> tuple[Field, ...]:
    return tuple(v for v in vars(cls).values() if isinstance(v, Field))


FIELDS: dict[str, tuple[Field, ...]] = {
    "prompt": F.ALL, "ablation": A.ALL, "model": M.ALL, "patching": _fields(PT),
    "circuits": _fields(CI), "circuits_graph": _fields(CG), "taskvec": _fields(TV), "taskvec_word": _fields(TQ)}
REQUIRED_ATTRS: dict[str, tuple[str, ...]] = {
    "prompt": tuple(PROMPT_ATTRS), "ablation": tuple(ABLATION_ATTRS), "model": tuple(MODEL_ATTRS),
    "patching": tuple(PATCHING_ATTRS), "circuits": tuple(k for k in CIRCUIT_ATTRS if k != "fingerprint"),
    "circuits_graph": ("n_layers", "n_heads", "n_kv_heads", "n_edges"), "taskvec": TV_ATTRS,
    "taskvec_word": TVW_ATTRS}
# attributes a reader does without: the word's span falls back to the position roles
READER_OPTIONAL_ATTRS = {"word_start", "word_end"}
NAMED_TYPES = {"bfloat16"}  # committed datatypes a shard may hold (older shards committed bfloat16)


@dataclass(frozen=True)
class Expect:
    """What every shard of one warehouse must look like (from its manifest and model.h5)."""

    fingerprint: str | None
    dims: Mapping[str, int]  # axis symbol -> size, where known
    store_dtype: str = "float32"
    n_tokens: Mapping[int, int] = field(default_factory=dict)  # prompt index -> T
    max_new_tokens: int | None = None
    head_out_all: bool | None = None
    modes: tuple[str, ...] | None = None  # ablation modes on axis M, when the manifest says
    positions: str | None = None
    layers: tuple[int, ...] | None = None  # ablated layers, when the manifest says
    words: Mapping[int, str] = field(default_factory=dict)  # prompt index -> word
    template_of: Mapping[int, int] = field(default_factory=dict)  # prompt index -> template index
    templates: tuple[str, ...] | None = None  # the manifest's templates

    @classmethod
    def from_warehouse(cls, manifest: Mapping[str, Any], model_attrs: Mapping[str, Any]) -> Expect:
        dims: dict[str, int] = {}
        for sym, key in (("L", "n_layers"), ("H", "n_heads"), ("D", "d_model"), ("V", "vocab_size")):
            if model_attrs.get(key) is not None:
                dims[sym] = int(model_attrs[key])
        if "L" in dims:
            dims["B"] = dims["L"] + 1
        if "H" in dims:
            dims["U"] = dims["H"] + 2
        cfg = manifest.get("config") or {}
        if cfg.get("top_k") is not None:
            dims["K"] = int(cfg["top_k"])
        layers = None
        if "ablate_layers" in cfg and "L" in dims:
            layers = tuple(cfg["ablate_layers"]) if cfg["ablate_layers"] is not None else tuple(range(dims["L"]))
        prompts = [p for p in manifest.get("prompts", []) if isinstance(p, Mapping)]
        templates = manifest.get("templates")
        return cls(
            fingerprint=manifest.get("fingerprint"),
            dims=dims,
            store_dtype=cfg.get("store_dtype", "float32"),
            n_tokens={int(p["index"]): int(p["n_tokens"]) for p in prompts if p.get("n_tokens") is not None},
            words={int(p["index"]): p["word"] for p in prompts if p.get("word") is not None},
            template_of={int(p["index"]): int(p["template_index"]) for p in prompts
                         if p.get("template_index") is not None},
            templates=tuple(templates) if isinstance(templates, list) else None,
            max_new_tokens=cfg.get("max_new_tokens"),
            head_out_all=cfg.get("head_out_all_positions"),
            modes=tuple(cfg["ablation"]) if cfg.get("ablation") is not None else None,
            positions=cfg.get("ablate_positions"),
            layers=layers,
        )


def text(v: Any) -> Any:
    """An attribute as plain Python: bytes decoded, numpy scalars and arrays unwrapped."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray):
        return [text(x) for x in v.tolist()] if v.dtype.kind in "OS" else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def shard_dims(kind: Kind, attrs: Mapping[str, Any], index: int | None, expect: Expect,
               *, strict: bool) -> tuple[dict[str, int], list[str]]:
    """The axis sizes this shard must have, and problems found in its attributes."""
    problems: list[str] = []
    dims = dict(expect.dims)
    if kind in ("circuits", "circuits_graph"):  # their own axes (K and U mean other things there)
        reps = text(attrs.get("replacements"))
        dims = {"2": 2, "Me": len(METHODS), "Mt": len(METRICS), "Sel": len(SELECTIONS), "X": len(SIZES),
                "K": len(INPUT_KINDS), **({"R": len(reps)} if isinstance(reps, list) else {})}
        if isinstance(text(attrs.get("n_edges")), int):
            dims["E"] = text(attrs.get("n_edges"))
    # a reader (not strict) needs them too: a missing one would read as NULL; model.h5's are
    # checked whole by verify, and a reader names a missing one when it needs it
    missing = [k for k in REQUIRED_ATTRS[kind] if k not in attrs
               and (strict or (kind != "model" and k not in READER_OPTIONAL_ATTRS))]
    if missing:
        problems.append(f"attribute{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing")
    sv = text(attrs.get("schema_version"))
    if sv != SCHEMA_VERSION:
        problems.append(f"schema version {sv} in the shard, the warehouse has {SCHEMA_VERSION}")
    fp = text(attrs.get("fingerprint"))
    if expect.fingerprint is not None and fp != expect.fingerprint:
        problems.append(f"fingerprint {fp!r} is not this warehouse's {expect.fingerprint!r} "
                        "(a shard from another warehouse or run)")
    at = "word_index" if kind == "taskvec_word" else "prompt_index"
    if kind not in ("model", "circuits_graph") and index is not None and text(attrs.get(at)) != index:
        problems.append(f"{at} attribute {text(attrs.get(at))} in the shard of {at.split('_')[0]} {index}")
    if kind == "prompt":
        t = text(attrs.get("n_tokens"))
        want = expect.n_tokens.get(index) if index is not None else None
        if want is not None and t != want:
            problems.append(f"n_tokens {t}, the manifest says {want} for prompt {index}")
        if isinstance(t, int):
            dims["T"] = t
        problems += _prompt_identity(attrs, index, expect)
    if kind == "ablation":
        modes, layers = text(attrs.get("modes")), text(attrs.get("layers"))
        modes = [modes] if isinstance(modes, str) else modes
        if isinstance(modes, list):
            dims["M"] = len(modes)
            if expect.modes is not None and tuple(modes) != expect.modes:
                problems.append(f"ablation modes {modes}, the run has {list(expect.modes)}")
        if isinstance(layers, list):
            dims["L"] = len(layers)
            if expect.layers is not None and tuple(layers) != expect.layers:
                problems.append(f"ablated layers {layers}, the run has {list(expect.layers)}")
        positions = text(attrs.get("positions"))
        if expect.positions is not None and positions is not None and positions != expect.positions:
            problems.append(f"ablation positions {positions!r}, the run has {expect.positions!r}")
        h = text(attrs.get("n_heads"))
        if "H" in expect.dims and h is not None and h != expect.dims["H"]:
            problems.append(f"n_heads {h}, the model has {expect.dims['H']}")
    return dims, problems


def _prompt_identity(attrs: Mapping[str, Any], index: int | None, expect: Expect) -> list[str]:
    """The shard's word, template index and template text against the manifest's."""
    if index is None:
        return []
    out = []
    word, ti = text(attrs.get("word")), text(attrs.get("template_index"))
    if index in expect.words and word != expect.words[index]:
        out.append(f"word {word!r} in the shard, the manifest says {expect.words[index]!r} for prompt {index}")
    if index in expect.template_of and ti != expect.template_of[index]:
        out.append(f"template_index {ti} in the shard, the manifest says {expect.template_of[index]} "
                   f"for prompt {index}")
    elif expect.templates is not None and isinstance(ti, int) and 0 <= ti < len(expect.templates):
        tpl = text(attrs.get("template"))
        if tpl is not None and tpl != expect.templates[ti]:
            out.append(f"template {tpl!r} in the shard, the manifest's template {ti} is {expect.templates[ti]!r}")
    return out


def check_names(kind: Kind, names: set[str], expect: Expect, *, strict: bool) -> list[str]:
    """Datasets missing from the shard (and, when strict, objects the schema does not know)."""
    problems = []
    for fld in FIELDS[kind]:
        required = not fld.optional or (fld is F.HEAD_OUT_ALL and expect.head_out_all)
        if kind == "model" and not strict:
            required = False  # model.h5 is checked whole by verify; reads name a missing one
        if required and fld.name not in names:
            problems.append(f"dataset {fld.name} missing")
    if strict:
        known = {f.name for f in FIELDS[kind]} | NAMED_TYPES
        problems += [f"unexpected object {n} (not in the schema)" for n in sorted(names - known)]
    return problems


def _dtype_problem(ds: h5py.Dataset, fld: Field, store_dtype: str) -> str | None:
    t = ds.id.get_type()
    if fld.dtype == "str":
        if not isinstance(t, h5py.h5t.TypeStringID) or t.is_variable_str():
            return f"type {ds.dtype} (expected fixed-length UTF-8 text)"
        return None
    if fld.dtype == "compound":
        want = np.dtype(VALIDATION_DTYPE).names
        return None if ds.dtype.names == want else f"fields {ds.dtype.names} (expected {want})"
    if fld.activation and store_dtype == "bfloat16":
        ok = isinstance(t, h5py.h5t.TypeFloatID) and t.get_size() == 2 and t.get_fields() == BFLOAT16_FIELDS
        return None if ok else f"type {ds.dtype} (expected the bfloat16 type)"
    want = np.dtype(fld.dtype)
    if fld.activation and store_dtype == "float16":
        fallback = bool(ds.attrs.get("float16_overflow_fallback", False))
        want = np.dtype(np.float32) if fallback else np.dtype(np.float16)
    return None if ds.dtype == want else f"dtype {ds.dtype} (expected {want})"


def check_dataset(obj: Any, fld: Field, dims: Mapping[str, int], expect: Expect) -> str | None:
    """One line about what is wrong with a dataset's kind, rank, sizes or type; None if right."""
    if not isinstance(obj, h5py.Dataset):
        return f"{fld.name} is not a dataset"
    shape = obj.shape if obj.shape is not None else ()
    if len(shape) != len(fld.axes):
        return f"{fld.name} has shape {shape}, expected axes {fld.axes}"
    for sym, n in zip(fld.axes, shape, strict=True):
        if sym == "N" and expect.max_new_tokens is not None and n > expect.max_new_tokens:
            return f"{fld.name} has {n} tokens, more than max_new_tokens {expect.max_new_tokens}"
        if sym in dims and n != dims[sym]:
            want = tuple(dims.get(s, "?") for s in fld.axes)
            return f"{fld.name} has shape {shape}, expected {want} {fld.axes}"
    bad = _dtype_problem(obj, fld, expect.store_dtype)
    return f"{fld.name}: {bad}" if bad else None


def check_shard(f: h5py.File, kind: Kind, index: int | None, expect: Expect, *, strict: bool) -> list[str]:
    """Every structural problem of an open shard, one line each (no data is read)."""
    dims, problems = shard_dims(kind, f.attrs, index, expect, strict=strict)
    names = set(f.keys())
    problems += check_names(kind, names, expect, strict=strict)
    for fld in FIELDS[kind]:
        if fld.name in names:
            bad = check_dataset(f[fld.name], fld, dims, expect)
            if bad:
                problems.append(bad)
    return problems
