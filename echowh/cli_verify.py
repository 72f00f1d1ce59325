"""`echowh verify`: a thin click wrapper over store.verify.verify."""

from __future__ import annotations

import sys

import click

from echowh.options import warehouse_option


@click.command()
@warehouse_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (problems and the summary are still printed).")
def verify(warehouse, quiet) -> None:
    """Check a warehouse end to end, like a filesystem scrub; change nothing.

    The manifest must be well formed; every file it implies (prompts, ablation and patching
    shards) must be present, hash to the SHA-256 recorded when it was written (shards.sha256),
    open as HDF5 with the schema's datasets, shapes, dtypes, the warehouse's fingerprint and
    each prompt's word, template and token count as the manifest says, pass every chunk's
    Fletcher32 checksum and its stored invariants; no unknown files, partial writes or shards
    of prompts the manifest does not list.

    A Parquet export (`echowh export`) is recognised and checked instead: every file against
    the SHA-256 recorded in its export.sha256 when it was written, no files missing or added,
    and every Parquet page read with its checksum verified.

    Prints one line per problem, naming the file, and exits 1 if there is any.
    """
    from tqdm.auto import tqdm

    from query.export_read import is_export, verify_export
    from store.verify import verify as run_verify

    check = verify_export if is_export(warehouse) else run_verify

    bar = None

    def progress(total: int, rel: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="file", desc="verify", file=sys.stderr, disable=quiet)
        bar.update(1)

    report = check(warehouse, progress=progress)
    if bar is not None:
        bar.close()
    for line in report.lines():
        click.echo(line)
    size = f"{report.files_checked} files, {report.bytes_checked / 2**20:.1f} MiB"
    if report.problems:
        click.echo(f"{warehouse}: {len(report.problems)} problem(s) in {size} checked", err=True)
        sys.exit(1)
    click.echo(f"{warehouse}: ok ({size} checked)", err=True)
