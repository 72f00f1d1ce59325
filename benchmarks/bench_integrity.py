"""What the readers' integrity checks cost (issue 19), on a synthetic warehouse of the default
run's shapes (benchmarks/bench_query.py) and its Parquet export.

    python benchmarks/bench_integrity.py --synthetic /tmp/synth_integrity [--words 4]

1. Opening a warehouse: the shard set against the manifest and each prompt's word, template
   and token count against the manifest, timed as `open + SELECT word FROM prompts` with the
   checks on and with them switched off in-process.
2. Querying an export: each scanned view's files hashed against export.sha256 on the first
   scan, timed as a full scan of resid (and a one-layer count) with `check_export` on and off.

Prints, never asserts; the best of --repeat runs, each on a freshly opened warehouse.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import store.checks  # noqa: E402
import store.reader  # noqa: E402
from benchmarks.bench_query import write_synthetic  # noqa: E402
from query import Warehouse  # noqa: E402
from query.export import export_parquet  # noqa: E402


def _best(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def _open_and_read(root: Path) -> None:
    with Warehouse(root, threads=2) as wh:
        wh.sql("SELECT word FROM prompts")


def _query(root: Path, sql: str, check: bool) -> None:
    with Warehouse(root, threads=2, check_export=check) as wh:
        wh.sql(sql)


@click.command()
@click.option("--synthetic", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--words", type=int, default=4, show_default=True, help="Words (x 2 templates) when writing.")
@click.option("--repeat", type=int, default=5, show_default=True)
def main(synthetic: Path, words: int, repeat: int) -> None:
    if not (synthetic / "manifest.json").exists():
        write_synthetic(synthetic, n_words=words)
    on = _best(lambda: _open_and_read(synthetic), repeat)
    keep = (store.reader.WarehouseReader._check_shard_set, store.checks._prompt_identity)
    store.reader.WarehouseReader._check_shard_set = lambda self: None
    store.checks._prompt_identity = lambda *a: []
    off = _best(lambda: _open_and_read(synthetic), repeat)
    store.reader.WarehouseReader._check_shard_set, store.checks._prompt_identity = keep
    click.echo(f"open + prompts view       checks on {on:.4f} s  off {off:.4f} s  cost {on - off:+.4f} s "
               f"({(on - off) / off:+.1%})")
    export = synthetic.parent / (synthetic.name + "-parquet")
    if not export.exists():
        export_parquet(synthetic, export, progress=False)
    size = sum(p.stat().st_size for p in (export / "resid").rglob("*.parquet")) / 2**20
    for label, sql in (("full scan of resid", "SELECT sum(list_sum(vec)) FROM resid"),
                       ("one layer of resid", "SELECT sum(list_sum(vec)) FROM resid WHERE layer = 3"),
                       ("prompts view", "SELECT count(*) FROM prompts")):
        on = _best(lambda s=sql: _query(export, s, True), repeat)
        off = _best(lambda s=sql: _query(export, s, False), repeat)
        click.echo(f"export: {label:<19} hashed {on:.4f} s  unhashed {off:.4f} s  cost {(on - off) / off:+.1%}"
                   f"  (resid files {size:.1f} MiB)")


if __name__ == "__main__":
    main()
