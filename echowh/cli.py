"""The `echowh` command line: thin wrappers over extract/, query/ and reports/.

Subcommands live in their own modules and are imported lazily, so `echowh --help` and the
query commands never import torch.
"""

from __future__ import annotations

import importlib

import click

# command name -> (module, attribute, one-line help shown by `echowh --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "extract": ("echowh.cli_extract", "extract", "Run a model over words x templates into a warehouse."),
    "query": ("echowh.cli_query", "query", "Run SQL or a named analysis over a warehouse."),
    "analyses": ("echowh.cli_query", "analyses", "List the named analyses and their parameters."),
    "report": ("echowh.cli_report", "report", "Write the self-contained HTML report of a warehouse."),
    "verify": ("echowh.cli_verify", "verify", "Check a warehouse end to end (hashes, structure, invariants)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        """A damaged or foreign warehouse is one line and exit 1 in every command, whichever
        layer the store's WarehouseError surfaces through (never a traceback)."""
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as e:
            if type(e).__name__ == "WarehouseError" and type(e).__module__ == "store.errors":
                raise click.ClickException(str(e)) from None
            raise

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="echo-warehouse")
def main() -> None:
    """echo-warehouse: take one language model apart on one task, store everything in an
    HDF5 warehouse, and ask questions of it later.

    \b
    Typical session:
      echowh extract --out out/warehouse          # model -> warehouse (default: SmolLM2-135M)
      echowh analyses                             # the study's named analyses
      echowh query -a emergence_layer             # run one
      echowh query "SELECT * FROM prompts LIMIT 5"
      echowh report -o out/report.html            # self-contained HTML report
      echowh verify                               # scrub: every shard intact and ours

    \b
    Environment: ECHOWH_WAREHOUSE (default -w), ECHOWH_CACHE (converted embedded
    model), HF_HUB_OFFLINE=1 (never contact the Hugging Face hub).
    """


if __name__ == "__main__":
    main()
