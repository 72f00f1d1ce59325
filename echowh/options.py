"""Options shared by several commands, as decorators (one definition, one help text)."""

from __future__ import annotations

import os
from pathlib import Path

import click

DEFAULT_WAREHOUSE = Path("out/warehouse")


def default_warehouse() -> Path:
    return Path(os.environ.get("ECHOWH_WAREHOUSE", DEFAULT_WAREHOUSE))


def warehouse_option(fn):
    """``-w/--warehouse DIR``: the warehouse to read (default $ECHOWH_WAREHOUSE or out/warehouse)."""
    return click.option(
        "-w",
        "--warehouse",
        type=click.Path(path_type=Path, file_okay=False),
        default=default_warehouse,
        show_default="$ECHOWH_WAREHOUSE or out/warehouse",
        help="Warehouse directory made by `echowh extract`.",
    )(fn)
