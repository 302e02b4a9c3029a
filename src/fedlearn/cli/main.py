"""Entry point: ``fedlearn <command>``; turns our errors into one line and an exit code."""

from __future__ import annotations

import sys

import typer

from fedlearn.cli import (
    baseline_cmds,
    client_cmd,
    new_cmd,
    run_cmd,
    server_cmds,
    sim_cmd,
    sweep_cmd,
)
from fedlearn.cli.common import err_console
from fedlearn.errors import FedlearnError

app = typer.Typer(
    name="fedlearn",
    help="Federated learning with real server and client processes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(server_cmds.server)
app.command()(client_cmd.client)
app.command()(run_cmd.run)
app.command()(sim_cmd.sim)
app.command()(sweep_cmd.sweep)
app.command()(baseline_cmds.centralized)
app.command()(baseline_cmds.local)
app.command()(baseline_cmds.evaluate)
app.command()(new_cmd.new)
app.add_typer(baseline_cmds.datasets_app, name="datasets")


def main() -> None:
    """Run the CLI; a :class:`FedlearnError` prints one line and exits with its code."""
    try:
        app()
    except FedlearnError as exc:
        err_console.print("error: " + str(exc), style="bold red", highlight=False,
                          soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
