"""What the reader's safety checks cost: checked reads (structure check on first open, per-dataset
check on first use, Fletcher32 verified per chunk) against plain h5py reads of the same files.

    python benchmarks/bench_store_checks.py --synthetic /tmp/synth_checks [--words 8]

Prints ratios (checked / plain), never asserts. Two workloads: open every shard and read one
layer of resid (the "one chunk per prompt" query), and read every resid whole. The Fletcher32
share is measured separately on a copy of one dataset written without the filter.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_query import write_synthetic  # noqa: E402
from store import F, WarehouseReader  # noqa: E402


def _best(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def _checked(root: Path, sel) -> None:
    with WarehouseReader(root) as r:
        for i in r.prompt_indices():
            r.read(F.RESID, i, sel)


def _plain(root: Path, sel) -> None:
    for p in sorted((root / "prompts").glob("p*.h5")):
        with h5py.File(p, "r", locking=False) as f:
            np.asarray(f["resid"].astype("float32")[sel])


@click.command()
@click.option("--synthetic", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Warehouse to write (if absent) and time: the default run's shapes, random values.")
@click.option("--words", type=int, default=8, show_default=True, help="Words (x 2 templates) when writing.")
@click.option("--repeat", type=int, default=5, show_default=True, help="Runs per measurement (the best is shown).")
def main(synthetic: Path, words: int, repeat: int) -> None:
    if not (synthetic / "manifest.json").exists():
        write_synthetic(synthetic, n_words=words)
    for label, sel in (("one layer of resid per prompt", (3,)), ("all of resid per prompt", ())):
        c = _best(lambda s=sel: _checked(synthetic, s), repeat)
        p = _best(lambda s=sel: _plain(synthetic, s), repeat)
        click.echo(f"{label:<32} checked {c:.4f} s  plain {p:.4f} s  ratio {c / p:.2f}")
    src = sorted((synthetic / "prompts").glob("p*.h5"))[0]
    nofilter = synthetic.parent / (synthetic.name + "-nofletcher.h5")
    with h5py.File(src, "r") as f:
        data = f["resid"][()]
    with h5py.File(nofilter, "w", libver=("v110", "v110")) as g:
        g.create_dataset("resid", data=data, chunks=(1, *data.shape[1:]))
    with h5py.File(src, "r", locking=False) as f, h5py.File(nofilter, "r", locking=False) as g:
        a = _best(lambda: [f["resid"][()] for _ in range(20)], repeat)
        b = _best(lambda: [g["resid"][()] for _ in range(20)], repeat)
    nofilter.unlink()
    click.echo(f"{'Fletcher32 on a whole resid read':<32} with {a / 20:.5f} s  without {b / 20:.5f} s  ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
