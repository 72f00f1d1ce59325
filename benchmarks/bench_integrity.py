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
from store.ledger import sha256_file  # noqa: E402

CLOCK = time.perf_counter  # --cpu: time.process_time (every thread of this process; steadier on a busy machine)


def _best(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t0 = CLOCK()
        fn()
        out.append(CLOCK() - t0)
    return min(out)


def _interleaved(on, off, repeat: int) -> tuple[float, float]:
    """Best times of two variants run alternately (a busy machine drifts between blocks)."""
    a, b = [], []
    for _ in range(repeat):
        a.append(_best(on, 1))
        b.append(_best(off, 1))
    return min(a), min(b)


class _ChecksOff:
    """The reader's open-time checks switched off in-process (for the comparison only)."""

    def __enter__(self) -> None:
        self.keep = (store.reader.WarehouseReader._check_shard_set, store.checks._prompt_identity)
        store.reader.WarehouseReader._check_shard_set = lambda self: None
        store.checks._prompt_identity = lambda *a: []

    def __exit__(self, *exc: object) -> None:
        store.reader.WarehouseReader._check_shard_set, store.checks._prompt_identity = self.keep


def _without_checks(root: Path) -> None:
    with _ChecksOff():
        _open_and_read(root)


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
@click.option("--cpu", is_flag=True, help="Measure CPU time of the process instead of wall time.")
def main(synthetic: Path, words: int, repeat: int, cpu: bool) -> None:
    global CLOCK
    if cpu:
        CLOCK = time.process_time
    if not (synthetic / "manifest.json").exists():
        write_synthetic(synthetic, n_words=words)
    on, off = _interleaved(lambda: _open_and_read(synthetic), lambda: _without_checks(synthetic), repeat)
    with store.reader.WarehouseReader(synthetic) as r:
        alone = _best(r._check_shard_set, 20)
    click.echo(f"open + prompts view       checks on {on:.4f} s  off {off:.4f} s  cost {(on - off) / off:+.1%}; "
               f"the shard-set check alone {alone * 1e3:.2f} ms")
    export = synthetic.parent / (synthetic.name + "-parquet")
    if not export.exists():
        export_parquet(synthetic, export, progress=False)
    files = sorted((export / "resid").rglob("*.parquet"))
    size = sum(p.stat().st_size for p in files) / 2**20
    hashing = _best(lambda: [sha256_file(p) for p in files], repeat)
    click.echo(f"SHA-256 of resid's files alone: {hashing:.4f} s ({size / max(hashing, 1e-9):.0f} MiB/s)")
    for label, sql in (("full scan of resid", "SELECT sum(list_sum(vec)) FROM resid"),
                       ("one layer of resid", "SELECT sum(list_sum(vec)) FROM resid WHERE layer = 3"),
                       ("prompts view", "SELECT count(*) FROM prompts")):
        on, off = _interleaved(lambda s=sql: _query(export, s, True), lambda s=sql: _query(export, s, False), repeat)
        click.echo(f"export: {label:<19} hashed {on:.4f} s  unhashed {off:.4f} s  cost {(on - off) / off:+.1%}"
                   f"  (resid files {size:.1f} MiB)")


if __name__ == "__main__":
    main()
