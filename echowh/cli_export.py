"""`echowh export`: a thin wrapper over query.export (no torch)."""

from __future__ import annotations

from pathlib import Path

import click

from echowh.options import warehouse_option
from query import QueryError


@click.command("export")
@warehouse_option
@click.option("--parquet", "dest", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="New directory to write: every view as Parquet, partitioned by template "
                   "(DIR/<view>/template_index=<t>/part-00000.parquet), with manifest.json beside it. "
                   "Must not exist and must be outside the warehouse.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export(warehouse: Path, dest: Path, quiet: bool) -> None:
    """Export a warehouse as Parquet for DuckDB, Polars, Spark or Trino at scale.

    \b
    The export is written under DIR.partial and renamed to DIR when complete. Query it like
    the warehouse itself (every view and named analysis):
      echowh query -w DIR -a emergence_layer
    or from plain DuckDB:
      SELECT * FROM read_parquet('DIR/prompts/*/*.parquet', hive_partitioning = true)
    """
    from query.export import export_parquet

    try:
        s = export_parquet(warehouse, dest, progress=not quiet)
    except QueryError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {dest}: {e.strerror or e}") from None
    click.echo(f"wrote {s.path}: {s.n_prompts} prompts, {len(s.rows)} views, "
               f"{s.bytes / 2**20:.1f} MiB in {s.seconds:.1f}s ({s.mb_per_s:.1f} MiB/s)", err=True)
