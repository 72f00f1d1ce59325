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


def refuse_inside(output: Path, warehouse: Path) -> None:
    """Commands that read a warehouse (or an export) never write into it: refuse an -o that
    lands inside, through ``..``, a symlink, or a hard link to one of its files."""
    out, root = output.expanduser().resolve(), warehouse.expanduser().resolve()
    inside = out == root or root in out.parents
    if not inside and root.is_dir():
        try:
            st = out.stat()
        except OSError:
            st = None  # nothing there yet: no file of the warehouse can be behind it
        if st is not None and st.st_nlink > 1:
            inside = any(_same_file(p, st) for p in root.rglob("*"))
    if inside:
        raise click.ClickException(
            f"refusing to write {output} inside the warehouse {warehouse} (warehouses are read-only "
            "after extraction); choose an -o outside it"
        )


def _same_file(p: Path, st: os.stat_result) -> bool:
    try:
        q = p.stat()
    except OSError:
        return False
    return (q.st_dev, q.st_ino) == (st.st_dev, st.st_ino)


def warehouses_option(fn):
    """``-w/--warehouse [LABEL=]DIR`` repeatable: one warehouse, or several to compare."""
    return click.option(
        "-w",
        "--warehouse",
        "warehouses",
        multiple=True,
        metavar="[LABEL=]DIR",
        help="Warehouse directory made by `echowh extract` (default $ECHOWH_WAREHOUSE or "
             "out/warehouse). Repeat to compare models: every view gets a leading `model` column "
             "holding each warehouse's LABEL (default: the model it was extracted with).",
    )(fn)


def warehouse_args(values: tuple[str, ...]):
    """The ``-w`` values as ``query.WarehouseArg`` (none given: the default warehouse)."""
    from query import QueryError, WarehouseArg, parse_warehouse_arg

    if not values:
        return [WarehouseArg(default_warehouse())]
    try:
        return [parse_warehouse_arg(v) for v in values]
    except QueryError as e:
        raise click.UsageError(str(e)) from None
