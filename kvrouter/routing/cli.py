"""Commands of this area; see :mod:`kvrouter.cli`."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to the top-level ``app`` and the ``bench`` group."""
