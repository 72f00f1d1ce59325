"""`echowh report`: a thin click wrapper over reports.write_report."""

from __future__ import annotations

from pathlib import Path

import click

from echowh.options import refuse_inside, warehouse_option


@click.command()
@warehouse_option
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("out/report.html"), show_default=True, help="HTML file to write.")
@click.option("--words", default="cat,dog", show_default=True,
              help="Comma-separated words whose logit-lens trajectories are shown.")
@click.option("--title", help="Report title (default: the model's name).")
def report(warehouse: Path, output: Path, words: str, title: str | None) -> None:
    """Write one self-contained HTML report reproducing the study from a warehouse.

    Every chart and table is a named analysis (`echowh analyses`); the findings section is
    written from the same numbers. The chart libraries are inlined: the file opens offline
    and can be mailed as it is. Sections that need ablation data are replaced by a note when
    the warehouse has none.
    """
    from query import QueryError
    from reports import ReportError, write_report

    refuse_inside(output, warehouse)
    word_list = tuple(w.strip() for w in words.split(",") if w.strip())
    try:
        path = write_report(warehouse, output, word_list, title)
    except (QueryError, ReportError) as e:
        raise click.ClickException(str(e)) from None
    size = path.stat().st_size / 1e6
    click.echo(f"wrote {path} ({size:.1f} MB)", err=True)
