"""`echowh extract`: a thin click wrapper over extract.pipeline.run.extract (options: echowh.extract_options)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from echowh.extract_options import as_flags, config_options, field_values
from extract.config import ExtractConfig


@click.command()
@config_options
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[auto|ADDRESS]",
              help="Run every stage's jobs (extraction batches, ablation groups, patching pairs) as tasks on a Ray cluster (optional extra: "
                   "pip install 'echo-warehouse[ray]'). --ray or --ray auto: the cluster in $RAY_ADDRESS or "
                   "one started here with `ray start`, else a new local one; or HOST:PORT / ray://HOST:PORT. "
                   "--out must be a path every node sees (shared filesystem). Same results as a local run.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="With --ray: actors in the pool, each loading the model once.")
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=0.0, show_default=True,
              help="With --ray: GPUs reserved per actor (0.5 puts two actors on a GPU); > 0 runs on cuda.")
@click.option("--cpus-per-worker", type=click.IntRange(1), default=1, show_default=True,
              help="With --ray: CPUs reserved per actor, also its torch thread count.")
def extract(ray_address, workers, gpus_per_worker, cpus_per_worker, **options) -> None:
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
    try:
        values = field_values(options)
        words: Path | None = values.pop("words")
        values["words"] = tuple(read_words(words)) if words is not None else None
        form = default_prompt_form(values["model"])
        if form and "templates" not in values and values["chat_template"] and values["chat_template_file"] is None:
            # a base model's alias: its documented few-shot templates, fed raw
            values.update(templates=form, chat_template=False)
            click.echo(f"{values['model']} is a base model (no chat template): raw prompts with its few-shot "
                       "templates (pass --template/--no-chat-template to choose others)", err=True)
        if gpus_per_worker and values["device"] == "auto":
            values["device"] = "cuda"
        cfg = ExtractConfig(**values, extra={"command": " ".join(["echowh", *sys.argv[1:]])})
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
