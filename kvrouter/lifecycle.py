"""The lifecycle every long-lived component shares: ``async with`` = start, then aclose.

>>> class Worker(AsyncLifecycle):
...     async def start(self) -> None: ...
...     async def aclose(self) -> None: ...
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncLifecycle"]


class AsyncLifecycle:
    """Mixin: entering starts the component, leaving closes it (``aclose`` is idempotent
    in every implementation, so an explicit close inside the block is harmless)."""

    async def start(self) -> None:
        """Acquire resources and start background tasks (nothing by default)."""

    async def aclose(self) -> None:
        """Stop background tasks and release resources (nothing by default)."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
