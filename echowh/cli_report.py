"""`echowh report`: a thin click wrapper over reports.write_report (one -w) and
reports.compare.write_comparison (several -w)."""

from __future__ import annotations

from pathlib import Path

import click

from echowh.options import refuse_inside, warehouse_args, warehouses_option


@click.command()
@warehouses_option
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("out/report.html"), show_default=True, help="HTML file to write.")
@click.option("--words", default="cat,dog", show_default=True,
              help="Comma-separated words whose logit-lens trajectories are shown.")
@click.option("--title", help="Report title (default: the model's name, or 'A vs B' when comparing).")
@click.option("--no-per-model", is_flag=True,
              help="With several -w: write only the comparison sections, not each model's own study.")
def report(warehouses: tuple[str, ...], output: Path, words: str, title: str | None, no_per_model: bool) -> None:
    """Write one self-contained HTML report reproducing the study from a warehouse.

    Every chart and table is a named analysis (`echowh analyses`); the findings section is
    written from the same numbers. The chart libraries are inlined: the file opens offline
    and can be mailed as it is. Sections that need ablation data are replaced by a note when
    the warehouse has none.

    \b
    With several -w (e.g. -w smol=runs/smol -w gemma=runs/gemma) the report compares the
    models first (compare_* analyses: echo accuracy, emergence and top heads at relative
    depth layer / n_layers, first-token attention), then gives each model's own study.
    """
    from query import QueryError
    from reports import ReportError, write_report
    from reports.compare import write_comparison

    targets = warehouse_args(warehouses)
    for t in targets:
        refuse_inside(output, t.path)
    if no_per_model and len(targets) == 1:
        raise click.UsageError("--no-per-model applies to a comparison (give -w twice or more)")
    word_list = tuple(w.strip() for w in words.split(",") if w.strip())
    try:
        if len(targets) == 1:
            path = write_report(targets[0].path, output, word_list, title)
        else:
            path = write_comparison(targets, output, word_list, title, per_model=not no_per_model)
    except (QueryError, ReportError) as e:
        raise click.ClickException(str(e)) from None
    size = path.stat().st_size / 1e6
    click.echo(f"wrote {path} ({size:.1f} MB)", err=True)
