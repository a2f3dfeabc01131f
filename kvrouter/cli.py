"""The ``kvrouter`` command line.

Each area registers its own commands (``register(app, bench)`` in its ``cli`` module)
and imports heavy libraries inside the command bodies, so ``kvrouter --help`` stays fast.

A user's mistake (a :class:`~kvrouter.errors.RouterError` such as a bad setting, or an
``OSError`` such as a missing file or a port in use) ends any command with one line,
``error: <message>`` on stderr, and exit status 2; ``KVROUTER_DEBUG=1`` shows the
traceback instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
from typing import Any

import typer
from typer.core import TyperGroup

from kvrouter.errors import RouterError, describe_error

__all__ = ["DEBUG_ENV", "EXIT_USER_ERROR", "app", "describe_error", "main"]

DEBUG_ENV = "KVROUTER_DEBUG"
# The status of a usage error in click, and of ``kvrouter serve``'s bad settings.
EXIT_USER_ERROR = 2


def _debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _UserErrorsAsOneLine(TyperGroup):
    """Every command runs inside this group's ``invoke``: user errors end there."""

    # ``ctx`` is a click Context: click's own, or the copy newer typer releases bundle.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (RouterError, OSError) as exc:
            # A closed pipe (``kvrouter ... | head``) is click's to handle quietly.
            if _debugging() or getattr(exc, "errno", None) == errno.EPIPE:
                raise
            typer.echo(f"error: {describe_error(exc)}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from exc


app = typer.Typer(
    name="kvrouter",
    cls=_UserErrorsAsOneLine,
    help="KV-cache-aware request router for fleets of LLM inference engines.",
    epilog=f"Errors are reported in one line; set {DEBUG_ENV}=1 to see the traceback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench = typer.Typer(
    help="Benchmarks: print measured figures (nothing is asserted).",
    no_args_is_help=True,
)
app.add_typer(bench, name="bench")

# Modules that contribute commands, in the order they appear in --help.
_COMMAND_MODULES = (
    "kvrouter.events.cli",  # bench hashing
    "kvrouter.index.cli",  # bench indexer
    "kvrouter.routing.cli",  # bench decision
    "kvrouter.gateway.cli",  # run, serve, explain
    "kvrouter.engine.cli",  # mocker, bench engine
    "kvrouter.bench.cli",  # demo, bench hashing/indexer/simulate/replay/report
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app, bench)


def main() -> None:
    """Entry point of the ``kvrouter`` console script."""
    app()
