"""The ``kvrouter`` command line.

Each area registers its own commands (``register(app, bench)`` in its ``cli`` module)
and imports heavy libraries inside the command bodies, so ``kvrouter --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="kvrouter",
    help="KV-cache-aware request router for fleets of LLM inference engines.",
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
