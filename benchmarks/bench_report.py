"""Time `echowh report` on a warehouse: analyses + charts, the file's size, and how long a
headless Chromium takes to draw every chart.

    python benchmarks/bench_report.py -w out/warehouse            # the default extraction

Targets (issue): a default run's report under 5 MB that renders in under 5 s. The render
time is the page's own clock (``performance.now()`` when the last chart has drawn, written
to ``<body data-render-ms>``), read from the DOM Chromium dumps; the Chromium wall time
(start-up included) is printed beside it. Prints, never asserts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reports import build, render_html  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"]


def chromium_render(path: Path, budget_ms: int | None) -> tuple[float, dict[str, str], int]:
    """Dump the DOM of `path`; returns (wall s, body data-* attributes, charts in the file)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise click.ClickException("chromium not installed (scripts/setup.sh --browser)")
    with tempfile.TemporaryDirectory() as profile:
        args = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        if budget_ms:
            args.append(f"--virtual-time-budget={budget_ms}")
        t0 = time.perf_counter()
        dom = subprocess.run([*args, "--dump-dom", path.as_uri()], capture_output=True, text=True,
                             timeout=300).stdout
        wall = time.perf_counter() - t0
    # The inlined Vega bundle's source mentions "<body>" too: take the tag carrying our attributes.
    body = re.search(r"<body([^>]*data-charts-rendered[^>]*)>", dom)
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1))) if body else {}
    return wall, attrs, path.read_text().count("class='chart'")


@click.command()
@click.option("-w", "--warehouse", type=click.Path(path_type=Path, file_okay=False),
              default=Path("out/warehouse"), show_default=True)
@click.option("--repeat", default=3, show_default=True, help="Chromium runs (best is reported).")
def main(warehouse: Path, repeat: int) -> None:
    t0 = time.perf_counter()
    rep = build(warehouse)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = render_html(rep)
    t_html = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "report.html"
        out.write_text(text, encoding="utf-8")
        size = out.stat().st_size
        own = len(re.sub(r"<head>.*</head>", "", text, flags=re.S).encode())
        print(f"analyses + charts: {t_build:.2f} s   HTML: {t_html:.2f} s")
        print(f"file: {size / 1e6:.2f} MB ({own / 1e6:.2f} MB without the inlined Vega bundle), "
              f"{len(rep.chart_specs())} charts, {len(rep.findings)} findings")
        for budget in (None, 15000):
            best = None
            for _ in range(repeat):
                wall, attrs, n = chromium_render(out, budget)
                if "render-ms" not in attrs:
                    break
                ms = int(attrs["render-ms"])
                best = min(best or (ms, wall), (ms, wall))
            label = "real clock" if budget is None else f"virtual-time-budget {budget} ms"
            if best is None:
                print(f"chromium ({label}): charts not finished when the DOM was dumped")
                continue
            print(f"chromium ({label}): {attrs.get('charts-rendered')}/{n} charts drawn; "
                  f"page clock {best[0] / 1000:.2f} s; process wall {best[1]:.2f} s")
            if budget is None:
                break


if __name__ == "__main__":
    main()
