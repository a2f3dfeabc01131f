"""The client side of the runtime: pick an instance of an endpoint and stream its answer.

::

    client = await runtime.client("demo", "Worker", "generate")
    await client.wait_for_instances()
    async for item in client.round_robin({"prompt": "hi"}): ...
    async for item in client.direct({"prompt": "hi"}, instance_id): ...
    async for item in client.generate(request)      # the client's default mode

``router_mode`` is ``"random"``, ``"round_robin"`` or ``"kv"``; ``kv`` asks a selector
(``selector(request, instance_ids) -> instance_id``, e.g. :func:`kvrouter.runtime.kv_selector`)
which instance holds the most of the request's prefix.

A call to an instance that is no longer there (:class:`InstanceGone`: nothing was sent to
it) is retried on another instance for ``random``, ``round_robin`` and ``kv``; ``direct``
never switches instance. Any other failure is raised to the caller as
:class:`UpstreamError`, since the request may have run: the endpoint's own error, an
instance that died with the call in flight, a lost connection, lost frames, or
:class:`UpstreamTimeout` after a silence. A caller that stops reading (cancelled, or the
stream closed early) stops the endpoint's handler too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random as _random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol

from kvrouter.errors import NoWorkerAvailable, UpstreamError

__all__ = ["Client", "ClientTransport", "InstanceGone", "Selector", "retry_until_first_item"]

Selector = Callable[[Any, list[int]], int]
ROUTER_MODES = ("random", "round_robin", "kv")


class InstanceGone(UpstreamError):
    """The chosen instance no longer exists; nothing was sent to it."""


class ClientTransport(Protocol):
    def instance_ids(self) -> list[int]: ...

    def call(self, instance_id: int, request: Any) -> AsyncGenerator[Any, None]: ...

    async def aclose(self) -> None: ...


class Client:
    """Calls one endpoint of a component; see the module docstring."""

    def __init__(
        self,
        transport: ClientTransport,
        *,
        router_mode: str = "round_robin",
        selector: Selector | None = None,
        rng: _random.Random | None = None,
        max_attempts: int = 3,
    ) -> None:
        if router_mode not in ROUTER_MODES:
            raise ValueError(f"unknown router mode {router_mode!r}; choose one of {ROUTER_MODES}")
        if router_mode == "kv" and selector is None:
            raise ValueError("router_mode 'kv' needs a selector")
        self._transport = transport
        self.router_mode = router_mode
        self._selector = selector
        self._rng = rng or _random.Random()
        self._next = 0
        self._max_attempts = max_attempts

    def instance_ids(self) -> list[int]:
        return sorted(self._transport.instance_ids())

    async def wait_for_instances(self, timeout_s: float = 10.0, minimum: int = 1) -> list[int]:
        """Wait until at least ``minimum`` instances are known; raise NoWorkerAvailable if not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(ids := self.instance_ids()) < minimum:
            if loop.time() >= deadline:
                raise NoWorkerAvailable(f"{len(ids)} of {minimum} instances after {timeout_s} s")
            await asyncio.sleep(0.02)
        return ids

    def generate(self, request: Any) -> AsyncIterator[Any]:
        """Call an instance chosen by the client's default ``router_mode``."""
        return self._call_with_retry(request, self.router_mode)

    def random(self, request: Any) -> AsyncIterator[Any]:
        return self._call_with_retry(request, "random")

    def round_robin(self, request: Any) -> AsyncIterator[Any]:
        return self._call_with_retry(request, "round_robin")

    def direct(self, request: Any, instance_id: int) -> AsyncGenerator[Any, None]:
        if instance_id not in self._transport.instance_ids():
            raise NoWorkerAvailable(f"no instance {instance_id:x} of this endpoint")
        return self._transport.call(instance_id, request)

    async def aclose(self) -> None:
        await self._transport.aclose()

    def _choose(self, request: Any, mode: str, exclude: set[int]) -> int:
        ids = [i for i in self.instance_ids() if i not in exclude]
        if not ids:
            raise NoWorkerAvailable("no instance of this endpoint is available")
        if mode == "random":
            return self._rng.choice(ids)
        if mode == "round_robin":
            self._next += 1
            return ids[(self._next - 1) % len(ids)]
        assert self._selector is not None, "kv mode without a selector"
        return self._selector(request, ids)

    def _call_with_retry(self, request: Any, mode: str) -> AsyncIterator[Any]:
        tried: set[int] = set()

        def call_another() -> AsyncGenerator[Any, None]:
            instance_id = self._choose(request, mode, tried)
            tried.add(instance_id)
            return self._transport.call(instance_id, request)

        return retry_until_first_item(call_another, self._max_attempts)


async def retry_until_first_item(
    open_stream: Callable[[], AsyncGenerator[Any, None]], max_attempts: int
) -> AsyncGenerator[Any, None]:
    """The items of ``open_stream()``, opened again (up to ``max_attempts`` times in all)
    while it fails with :class:`InstanceGone` before its first item: the instance never
    held the call, so another may take it. After the first item nothing is retried.

    Each stream is closed with the caller's, so an abandoned call stops at the instance.
    """
    for attempt in range(1, max_attempts + 1):
        async with contextlib.aclosing(open_stream()) as stream:
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                return
            except InstanceGone:
                if attempt == max_attempts:
                    raise
                continue
            yield first
            async for item in stream:
                yield item
            return
