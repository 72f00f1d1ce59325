"""Package boundaries: store is numpy + h5py only; query and reports never load the model side.

import-linter (`lint-imports`, run by `make test`) checks the static imports; this test checks
what importing each package really pulls in, including imports hidden in function bodies
that run at import time.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "extract")


def _loaded_after(stmt: str, names: tuple[str, ...]) -> list[str]:
    code = (
        f"import sys, pkgutil, importlib\n{stmt}\n"
        f"print(','.join(n for n in {names!r} if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return [n for n in out.stdout.strip().split(",") if n]


def _import_all(pkg: str) -> str:
    return (
        f"import {pkg}\n"
        f"for m in pkgutil.walk_packages({pkg}.__path__, '{pkg}.'): importlib.import_module(m.name)"
    )


def test_store_needs_only_numpy_and_h5py():
    assert _loaded_after(_import_all("store"), (*HEAVY, "duckdb", "polars", "altair", "query", "reports")) == []


@pytest.mark.parametrize("pkg", ["query", "reports"])
def test_query_and_reports_never_import_the_model_side(pkg):
    assert _loaded_after(_import_all(pkg), HEAVY) == []


def test_reports_reads_through_query_not_h5py():
    src = subprocess.run(
        [sys.executable, "-c", "import reports, pathlib; print(pathlib.Path(reports.__file__).parent)"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    import pathlib

    for f in pathlib.Path(src).rglob("*.py"):
        text = f.read_text()
        assert "import h5py" not in text and "from store" not in text and "import store" not in text, f


def test_cli_help_does_not_import_torch():
    code = "import sys\nfrom click.testing import CliRunner\nfrom echowh.cli import main\n" \
           "CliRunner().invoke(main, ['--help'])\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
