"""How often a repeated warning is logged: every time at first, then sparingly.

A worker whose every message is refused (another block size, a broken publisher) must
not flood the log; every occurrence is still counted where it happens.

>>> [n for n in range(1, 2501) if sparse_note(n) is not None][-4:]
[9, 10, 1000, 2000]
>>> sparse_note(10)
' (10 from this worker so far; from now on one in 1000 is logged)'
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["LOGGED_IN_FULL", "LOG_EVERY", "sparse_note", "warn_sparingly"]

LOGGED_IN_FULL = 10  # occurrences per source logged one by one
LOG_EVERY = 1000  # after that, one in this many


def sparse_note(seen: int) -> str | None:
    """For the ``seen``-th occurrence from one source: ``None`` to log nothing, else a
    suffix for the log line (empty while every occurrence is logged)."""
    if seen < LOGGED_IN_FULL:
        return ""
    if seen == LOGGED_IN_FULL or seen % LOG_EVERY == 0:
        return f" ({seen} from this worker so far; from now on one in {LOG_EVERY} is logged)"
    return None


def warn_sparingly(logger: logging.Logger, seen: int, message: str, *args: Any) -> None:
    """``logger.warning(message, *args)`` for the ``seen``-th occurrence from one source,
    when :func:`sparse_note` says so, with its note at the end."""
    note = sparse_note(seen)
    if note is not None:
        logger.warning(message + "%s", *args, note)
