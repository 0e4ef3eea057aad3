"""The ``carso`` Typer app: global options, error handling, and the subcommand registry.

Each subcommand lives in ``carso_cli/commands/<name>.py`` as a thin ``cli(...)`` function (Typer
options) that calls that module's library function ``run(...)``. Library code raises ``CarsoError``;
only this layer turns it into one red line and exit code 1 — the user never sees a traceback unless
``--debug`` is given.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from carso_cli import __version__
from carso_cli.errors import CarsoError

console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

app = typer.Typer(
    name="carso",
    help="CARSO: adversarial training + representation-conditional purification + robust aggregation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        console.print(f"carso {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full Python tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def debug_enabled() -> bool:
    return _state["debug"]


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and a non-zero exit (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from carso_cli.distributed import report_failure  # a worker of --gpus N leaves its line to the launcher

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except CarsoError as err:
            if _state["debug"]:
                err_console.print(traceback.format_exc(), markup=False, highlight=False)
            if not report_failure("error", str(err)):
                # Messages quote paths, options and library text: printed as they are, never read as markup.
                err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if not report_failure("interrupted", "interrupted"):
                err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as err:  # a bug: still one line for the user, the traceback on request
            if _state["debug"]:
                err_console.print(traceback.format_exc(), markup=False, highlight=False)
            rank = os.environ.get("RANK")
            where = f" on rank {rank}" if rank is not None and "WORLD_SIZE" in os.environ else ""
            text = f"{type(err).__name__}: {err}\n(run with --debug for the traceback, and please report it)"
            if not report_failure("internal", f"internal error{where}: {text}"):
                err_console.print(
                    f"[bold red]internal error{where}:[/] {escape(text)}", highlight=False, soft_wrap=True
                )
            raise typer.Exit(1) from None

    return wrapper


# (command name, module): each module defines ``cli``. Order = order in ``carso --help``.
COMMANDS: list[tuple[str, str]] = [
    ("demo", "carso_cli.commands.demo"),
    ("info", "carso_cli.commands.info"),
    ("train-classifier", "carso_cli.commands.train_classifier"),
    ("train-purifier", "carso_cli.commands.train_purifier"),
    ("plot", "carso_cli.commands.plot"),
    ("predict", "carso_cli.commands.predict"),
    ("convert", "carso_cli.commands.convert"),
    ("pull", "carso_cli.commands.pull"),
    ("eval", "carso_cli.commands.evaluate"),
    ("sanity", "carso_cli.commands.sanity"),
    ("extract", "carso_cli.commands.extract"),
    ("bench", "carso_cli.commands.bench"),
    ("report", "carso_cli.commands.report"),
]

for _name, _module in COMMANDS:
    app.command(_name)(handle_errors(importlib.import_module(_module).cli))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="carso")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
