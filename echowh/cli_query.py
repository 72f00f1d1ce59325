"""`echowh query` and `echowh analyses`: thin wrappers over query.Warehouse (no torch)."""

from __future__ import annotations

import io
from pathlib import Path

import click
import polars as pl

from echowh.options import refuse_inside, warehouse_args, warehouses_option
from query import Comparison, QueryError, Warehouse, get_analysis, is_comparison, list_analyses

FORMATS = ("table", "csv", "json", "parquet")


_CSV_TYPES = (pl.String, pl.Boolean, pl.Date, pl.Datetime, pl.Time, pl.Null, pl.Categorical, pl.Enum, pl.Decimal)


def _flat(df: pl.DataFrame, keep: tuple = _CSV_TYPES) -> pl.DataFrame:
    """Every column that is not a number or one of ``keep`` as text (lists, vectors, structs,
    maps, binary, intervals), for formats that hold only scalars (CSV)."""
    out = df
    for name, dtype in df.schema.items():
        if not (dtype.is_numeric() or isinstance(dtype, keep) or dtype in keep):
            text = [None if v is None else str(v) for v in df[name].to_list()]
            out = out.with_columns(pl.Series(name, text, dtype=pl.String))
    return out


def _render(df: pl.DataFrame, fmt: str, max_rows: int) -> str:
    try:
        return _render_as(df, fmt, max_rows)
    except (pl.exceptions.PolarsError, ValueError, TypeError, OverflowError):
        pass
    try:  # a type this format cannot hold: every non-scalar column as text
        return _render_as(_flat(df), fmt, max_rows)
    except (pl.exceptions.PolarsError, ValueError, TypeError, OverflowError) as e:
        raise click.ClickException(f"cannot write this result as {fmt} ({_first(e)}); "
                                   "try another --format or cast the column to VARCHAR") from None


def _has(dtype: pl.DataType, cls: type) -> bool:
    """Whether ``dtype`` is ``cls`` or holds one (in a list, array or struct)."""
    if isinstance(dtype, cls) or dtype == cls:
        return True
    if isinstance(dtype, pl.List | pl.Array):
        return _has(dtype.inner, cls)
    if isinstance(dtype, pl.Struct):
        return any(_has(f.dtype, cls) for f in dtype.fields)
    return False


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _render_as(df: pl.DataFrame, fmt: str, max_rows: int) -> str:
    if fmt == "csv":
        return _flat(df).write_csv()
    if fmt == "table" and df.columns == ["explain_key", "explain_value"]:
        return "".join(f"{v}\n" for v in df["explain_value"].to_list())  # EXPLAIN's plan as DuckDB wrote it
    if fmt == "json":  # Polars cannot write binary as JSON (it panics): text, like CSV
        binary = [n for n, t in df.schema.items() if _has(t, pl.Binary)]
        return (_flat(df.select(binary)).hstack(df.drop(binary)).select(df.columns) if binary else df).write_json() + "\n"
    with pl.Config(tbl_rows=max_rows, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=40,
                   tbl_hide_dataframe_shape=False):
        return f"{df}\n"


def _write_parquet(df: pl.DataFrame, output: Path) -> None:
    try:
        df.write_parquet(output)
        return
    except (pl.exceptions.PolarsError, ValueError, TypeError):
        pass
    try:
        _flat(df, (*_CSV_TYPES, pl.List, pl.Array, pl.Struct, pl.Binary)).write_parquet(output)
    except (pl.exceptions.PolarsError, ValueError, TypeError) as e:
        raise click.ClickException(f"cannot write this result as parquet ({_first(e)}); "
                                   "try another --format or cast the column to VARCHAR") from None


def _params(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"-p takes key=value, got {p!r}")
        out[key.strip()] = value
    return out


@click.command("query")
@warehouses_option
@click.argument("sql", required=False)
@click.option("-a", "--analysis", metavar="NAME", help="Run a named analysis (see `echowh analyses`).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Analysis parameter (repeatable), e.g. -p layer=22; -p layer=NULL clears a default.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="Output format; parquet needs -o.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the result to FILE instead of standard output.")
@click.option("--max-rows", type=int, default=50, show_default=True,
              help="Rows shown by --format table (other formats write every row).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Interrupt the statement after this many seconds (one-line error, exit 1).")
@click.option("--memory-limit", metavar="SIZE",
              help="DuckDB memory limit, e.g. 2GB or 500MB (default: half the machine's memory); "
                   "larger intermediates spill to a temporary directory outside the warehouse.")
@click.option("--no-check-export", "unchecked", is_flag=True,
              help="A Parquet export: do not hash the scanned views' files against its export.sha256 "
                   "(a little faster; a damaged file may then give wrong numbers; `echowh verify -w DIR` "
                   "checks everything).")
def query(warehouses: tuple[str, ...], sql: str | None, analysis: str | None, params: tuple[str, ...],
          fmt: str, output: Path | None, max_rows: int, timeout: float | None,
          memory_limit: str | None, unchecked: bool) -> None:
    """Run read-only SQL, or a named analysis, over a warehouse (or several, to compare models).

    \b
    Examples:
      echowh query "SELECT word, echo_correct FROM prompts"
      echowh query -a head_dla -p layer=22 --format csv -o dla.csv
      echowh query -w smol=runs/smol -w gemma=runs/gemma -a compare_emergence
      echowh query -w runs/smol -w runs/gemma "SELECT model, avg(echo_correct::INT) FROM prompts GROUP BY model"
    The views are listed in the README (or `echowh query "SHOW TABLES"`). With several -w,
    every view has a leading `model` column, "LABEL".view is one model's own view, and an
    analysis that is not a compare_* one runs on each warehouse alone.
    """
    if sql is None and analysis is None:
        raise click.UsageError("give SQL or -a NAME (`echowh analyses` lists the names)")
    if sql is not None and analysis is not None:
        raise click.UsageError("give SQL or -a NAME, not both")
    if params and analysis is None:
        raise click.UsageError("-p only applies to -a NAME")
    if fmt == "parquet" and output is None:
        raise click.UsageError("--format parquet needs -o FILE")
    targets = warehouse_args(warehouses)
    if output is not None:
        for t in targets:
            refuse_inside(output, t.path)
    try:
        # unknown name: an error before opening the warehouse
        comparing = len(targets) > 1 or (analysis is not None and is_comparison(get_analysis(analysis)))
        kw = {"memory_limit": memory_limit, "timeout": timeout, "check_export": not unchecked}
        opened = (Comparison(targets, **kw) if comparing else
                  Warehouse(targets[0].path, label=targets[0].label, **kw))
        with opened as wh:
            for note in wh.notes():
                click.echo(f"note: {note}", err=True)
            if analysis is not None:
                df = wh.run_analysis(analysis, **_params(params))
            else:
                df = wh.sql(sql or "")
    except QueryError as e:
        raise click.ClickException(str(e)) from None
    if df.height == 0 and analysis is not None:
        click.echo("note: no rows; the warehouse may not hold what the parameters ask for (its ablation "
                   "modes and layers are in the manifest's config)", err=True)
    if output is None:
        click.echo(_render(df, fmt, max_rows), nl=False)
        return
    try:
        if fmt == "parquet":
            _write_parquet(df, output)
        else:
            output.write_text(_render(df, fmt, max_rows), encoding="utf-8")
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e.strerror or e}") from None
    click.echo(f"wrote {df.height} rows to {output}", err=True)


@click.command("analyses")
def analyses() -> None:
    """List the named analyses with their descriptions, parameters and defaults."""
    buf = io.StringIO()
    for a in list_analyses():
        buf.write(f"{a.name}\n")
        buf.write(click.wrap_text(a.description, width=88, initial_indent="  ",
                                  subsequent_indent="  ") + "\n")
        for p in a.params:
            default = "NULL" if p.default is None else repr(p.default)
            kind = "|".join(p.choices) if p.choices else p.type
            buf.write(f"    -p {p.name}=<{kind}>  default {default}: {p.doc}\n")
        buf.write("\n")
    buf.write('Run one with: echowh query -a NAME [-p key=value ...]\n')
    buf.write('compare_* analyses compare models: echowh query -w A=DIR -w B=DIR -a compare_... ; any other runs\n'
              'on each warehouse alone when several -w are given, with a leading model column.\n')
    click.echo(buf.getvalue(), nl=False)

