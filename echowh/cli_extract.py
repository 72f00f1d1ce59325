"""`echowh extract`: a thin click wrapper over extract.pipeline.run.extract."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from extract.config import (
    DEFAULT_MODEL,
    DEFAULT_TEMPLATES,
    AblationModeName,
    AblationPositions,
    DeviceChoice,
    Dtype,
    ExtractConfig,
    StoreDtype,
    choices,
)


def _ablation_modes(ctx, param, value: str) -> tuple[str, ...]:
    if value.strip().lower() == "none":
        return ()
    modes = tuple(m.strip().lower() for m in value.split(",") if m.strip())
    bad = [m for m in modes if m not in choices(AblationModeName)]
    if bad or not modes:
        raise click.BadParameter(f"use none or a comma-separated list of {', '.join(choices(AblationModeName))}")
    return tuple(dict.fromkeys(modes))


def _layers(ctx, param, value: str | None) -> tuple[int, ...] | None:
    """``all``, or 0-based block indices: ``20,21,22``, ranges ``18-25`` (both ends included)."""
    if value is None or value.strip().lower() == "all":
        return None
    out: list[int] = []
    try:
        for part in value.split(","):
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                if lo > hi:
                    raise click.BadParameter(f"{part.strip()}: the range starts after it ends (write {hi}-{lo})")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise click.BadParameter("use all, or 0-based layer numbers like 20,21,22 or 18-25") from None
    return tuple(sorted(set(out)))


def _pairs(ctx, param, value: str | None) -> tuple[tuple[int, int], ...] | None:
    """``a:b,c:d`` -> ((a, b), (c, d)); checked against the templates when the run starts."""
    if value is None:
        return None
    out = []
    for part in value.split(","):
        try:
            a, b = (int(x) for x in part.split(":"))
        except ValueError:
            raise click.BadParameter(f"{part.strip()!r} is not a:b (0-based template numbers, e.g. 0:1)") from None
        out.append((a, b))
    return tuple(out)


@click.command()
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="Hub id (e.g. Qwen/Qwen2.5-1.5B-Instruct), a local model folder, or the "
                   "embedded aliases smollm2-135m-instruct and gemma3-270m (converted once into "
                   "$ECHOWH_CACHE; gemma3-270m is a base model and defaults to raw few-shot prompts).")
@click.option("--out", "-o", type=click.Path(path_type=Path, file_okay=False),
              default=Path("out/warehouse"), show_default=True, help="Warehouse directory to write.")
@click.option("--resume", is_flag=True,
              help="Continue a warehouse made with the same model and prompt set, skipping "
                   "finished prompts (a killed run loses nothing it had finished).")
@click.option("--allow-env-change", is_flag=True,
              help="With --resume: continue even if the device, dtype, torch or transformers version "
                   "differs from the run that made the warehouse (refused otherwise; every run's "
                   "environment is recorded in the manifest).")
@click.option("--words", type=click.Path(path_type=Path, dir_okay=False),
              help="Word file, one word per line (# comments allowed). Default: 44 common words.")
@click.option("--template", "templates", multiple=True,
              help="Prompt template containing {word}; repeat for several. Default: "
                   + " | ".join(DEFAULT_TEMPLATES))
@click.option("--no-chat-template", is_flag=True, help="Feed the raw prompt, without the chat template.")
@click.option("--chat-template", "chat_template_file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Jinja chat template file overriding the tokenizer's.")
@click.option("--system-prompt", help="System prompt (default: the chat template's own default).")
@click.option("--prepend-bos", is_flag=True, help="Put a BOS token at position 0 (<|endoftext|> for Qwen).")
@click.option("--dtype", type=click.Choice(choices(Dtype)), default="float32", show_default=True,
              help="Dtype to load and run the model in.")
@click.option("--device", type=click.Choice(choices(DeviceChoice)), default="auto", show_default=True,
              help="Where the model runs: auto picks cuda when torch sees a GPU, else cpu.")
@click.option("--store-dtype", type=click.Choice(choices(StoreDtype)), default="float32", show_default=True,
              help="Dtype activations are stored in (float16 keeps float32 where values overflow).")
@click.option("--max-new-tokens", type=click.IntRange(1, 256), default=5, show_default=True,
              help="Greedy continuation length stored per prompt.")
@click.option("--top-k", type=click.IntRange(1, 100), default=10, show_default=True,
              help="Tokens kept per layer by the logit lens and per ablation.")
@click.option("--head-out-all-positions", is_flag=True,
              help="Also store per-head outputs at every position (large: L x T x H x D per prompt).")
@click.option("--batch-size", type=click.IntRange(1, 512), default=None,
              help="Prompts of equal length run together (no padding: exact). Default: from the "
                   "device (32 on a CPU; on a GPU from its memory and the model's shape).")
@click.option("--ablation", default="zero,sink,sink_norenorm", show_default=True, callback=_ablation_modes,
              help="Ablation modes after extraction, comma-separated, or none: zero, mean (a unit's output "
                   "replaced by 0 or its mean), sink (each head's attention to position 0 removed, weights "
                   "renormalised over the other keys; unit H: every head of the layer), sink_norenorm (the "
                   "same without renormalising: position 0's value contribution removed).")
@click.option("--ablate-positions", type=click.Choice(choices(AblationPositions)), default="all",
              show_default=True, help="Remove a unit's output (a head, or a whole attention or MLP block) at every "
                   "position, or only at the last one (reuses the clean keys and values: faster).")
@click.option("--ablate-layers", callback=_layers, default=None,
              help="Blocks to ablate, 0-based: all (default), 20,21,22, or 18-25 (both ends included).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[auto|ADDRESS]",
              help="Run the batches and ablation groups as tasks on a Ray cluster (optional extra: "
                   "pip install 'echo-warehouse[ray]'). --ray or --ray auto: the cluster in $RAY_ADDRESS or "
                   "one started here with `ray start`, else a new local one; or HOST:PORT / ray://HOST:PORT. "
                   "--out must be a path every node sees (shared filesystem). Same results as a local run.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="With --ray: actors in the pool, each loading the model once.")
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=0.0, show_default=True,
              help="With --ray: GPUs reserved per actor (0.5 puts two actors on a GPU); > 0 runs on cuda.")
@click.option("--cpus-per-worker", type=click.IntRange(1), default=1, show_default=True,
              help="With --ray: CPUs reserved per actor, also its torch thread count.")
@click.option("--patching/--no-patching", default=False, show_default=True,
              help="Run the activation-patching grid after extraction: for each word and template pair, "
                   "patch every residual (boundary, position), attention/MLP block output, and head (all "
                   "positions and per position) from one prompt into the other, both directions, exact "
                   "and attribution (stored under patching/). Off by default: see README 'Activation patching'.")
@click.option("--patch-pairs", callback=_pairs, default=None,
              help="Template pairs to patch as a:b, comma-separated, 0-based (e.g. 0:1,0:2); both directions "
                   "run for each. Default: 0:1 (the first two templates). Implies nothing without --patching.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def extract(model, out, resume, allow_env_change, words, templates, no_chat_template, chat_template_file, system_prompt,
            prepend_bos, dtype, device, store_dtype, max_new_tokens, top_k, head_out_all_positions,
            batch_size, ablation, ablate_positions, ablate_layers, ray_address, workers, gpus_per_worker,
            cpus_per_worker, patching, patch_pairs, quiet) -> None:
    """Run a model over words x templates and store every tensor the study needs.

    Writes a warehouse directory of immutable HDF5 shards (one per prompt) plus
    manifest.json: residual streams, attention/MLP/per-head outputs, attention patterns,
    logit lens, direct logit attribution, the greedy continuation, the ablation grid and a
    validation table. Every run checks the invariants listed in the README (model logits from
    the residual, heads sum to the attention output, the residual chain, DLA sums to the logit,
    the lens's last layer, the ablation engine against the model) and exits non-zero if one
    fails. Resume a killed run with --resume: finished prompts are not recomputed.

    \b
    Environment: ECHOWH_CACHE (where the embedded model is converted, default
    ~/.cache/echo-warehouse), HF_HUB_OFFLINE=1 (never contact the Hugging Face hub).
    """
    from extract.config import ConfigError
    from extract.models.loading import ModelError, default_prompt_form
    from extract.pipeline.run import extract as run_extract
    from extract.stages.prompts import PromptError, read_words
    from store.warehouse import WarehouseError

    ray_given = ray_address is not None
    if not ray_given and (workers != 1 or gpus_per_worker or cpus_per_worker != 1):
        raise click.UsageError("--workers, --gpus-per-worker and --cpus-per-worker need --ray")
    executor = None
    errors: tuple[type[Exception], ...] = (ModelError, PromptError, WarehouseError)
    if ray_given:
        from extract.executors.ray_pool import RayConfig, RayError, RayExecutor

        errors = (*errors, RayError)
        executor = RayExecutor(RayConfig(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                                         cpus_per_worker=cpus_per_worker))
        try:
            executor.preflight()  # Ray installed, the settings and the cluster address: before any work
        except RayError as e:
            raise click.ClickException(str(e)) from None
        if gpus_per_worker and device == "auto":
            device = "cuda"
    try:
        word_list = tuple(read_words(words)) if words is not None else None
        form = default_prompt_form(model)
        if form and not templates and not no_chat_template and chat_template_file is None:
            # a base model's alias: its documented few-shot templates, fed raw
            templates, no_chat_template = form, True
            click.echo(f"{model} is a base model (no chat template): raw prompts with its few-shot "
                       "templates (pass --template/--no-chat-template to choose others)", err=True)
        cfg = ExtractConfig(
            out=out, model=model, dtype=dtype, device=device, words=word_list,
            templates=tuple(templates) or DEFAULT_TEMPLATES, chat_template=not no_chat_template,
            chat_template_file=chat_template_file, system_prompt=system_prompt,
            prepend_bos=prepend_bos, max_new_tokens=max_new_tokens, top_k=top_k,
            store_dtype=store_dtype, head_out_all_positions=head_out_all_positions,
            batch_size=batch_size, resume=resume, allow_env_change=allow_env_change, ablation=ablation,
            ablate_positions=ablate_positions, ablate_layers=ablate_layers, patching=patching,
            patch_pairs=patch_pairs, progress=not quiet,
            extra={"command": " ".join(["echowh", *sys.argv[1:]])},
        )
        summary = run_extract(cfg, executor, log=lambda m: click.echo(m, err=True))
    except ConfigError as e:
        raise click.ClickException(as_flags(str(e))) from None
    except errors as e:
        raise click.ClickException(str(e)) from None
    _print_summary(summary)
    if summary.failed:
        raise click.ClickException(
            f"validation FAILED for {', '.join(summary.failed)}: see the table above; "
            f"the warehouse at {summary.out} is kept for inspection"
        )


# config field -> the flag that sets it (a field shown with =False is its negating flag)
FLAGS = {"out": "--out", "model": "--model", "dtype": "--dtype", "device": "--device", "words": "--words",
         "templates": "--template", "chat_template": "--no-chat-template",
         "chat_template_file": "--chat-template", "system_prompt": "--system-prompt",
         "prepend_bos": "--prepend-bos", "max_new_tokens": "--max-new-tokens", "top_k": "--top-k",
         "store_dtype": "--store-dtype", "head_out_all_positions": "--head-out-all-positions",
         "batch_size": "--batch-size", "resume": "--resume", "allow_env_change": "--allow-env-change",
         "ablation": "--ablation", "ablate_positions": "--ablate-positions", "ablate_layers": "--ablate-layers",
         "patching": "--patching", "patch_pairs": "--patch-pairs", "progress": "--quiet"}


def as_flags(message: str) -> str:
    """A library message naming config fields (`ablate_layers`) as the CLI's flags (--ablate-layers)."""
    return re.sub(r"`(\w+)`(?:=False)?", lambda m: FLAGS.get(m.group(1), m.group(1)), message)


def _print_summary(summary) -> None:
    t = summary.timings
    click.echo(
        f"{summary.out}: {summary.n_prompts} prompts ({summary.n_extracted} extracted, "
        f"{summary.n_skipped} already stored) in {t.get('total_s', 0):.1f}s", err=True,
    )
    click.echo("invariant              max abs err   max rel err   tolerance   result", err=True)
    for name, v in summary.validation.items():
        tol = v["tolerance"] if v["tolerance"] is not None else float("nan")
        res = "ok" if v["passed"] else f"FAIL ({len(v['failed_prompts'])} prompts)"
        click.echo(f"{name:22} {v['max_abs_err']:11.3g}   {v['max_rel_err']:11.3g}   {tol:9.0e}   {res}", err=True)
    for w in summary.warnings:
        click.echo(f"warning: {w}", err=True)
