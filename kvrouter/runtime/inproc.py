"""The in-process runtime: components and clients in one event loop, no network."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator
from typing import Any

from kvrouter.errors import UpstreamError
from kvrouter.runtime.client import Client, InstanceGone, Selector
from kvrouter.runtime.component import Handler, endpoints_of, service_spec

__all__ = ["InprocRuntime", "Served"]

EndpointKey = tuple[str, str, str]


class Served:
    """A served component instance; ``aclose()`` withdraws it (idempotent)."""

    def __init__(self, runtime: InprocRuntime, keys: list[EndpointKey], instance_id: int) -> None:
        self._runtime = runtime
        self._keys = keys
        self.instance_id = instance_id

    async def aclose(self, drain_timeout_s: float = 5.0) -> None:
        """Withdraw: no new calls; a call in flight may go on for ``drain_timeout_s``,
        then fails at its next item (as a NATS instance's calls are cancelled)."""
        for key in self._keys:
            self._runtime._registry.get(key, {}).pop(self.instance_id, None)
        deadline = asyncio.get_running_loop().time() + drain_timeout_s
        withdrawn = self._runtime._withdrawn
        withdrawn[self.instance_id] = min(deadline, withdrawn.get(self.instance_id, deadline))

    async def __aenter__(self) -> Served:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class InprocRuntime:
    """Discovery and calls through a dict; the default for tests and the embedded setup."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._registry: dict[EndpointKey, dict[int, Handler]] = {}
        # withdrawn instance -> loop time its calls in flight must end by
        self._withdrawn: dict[int, float] = {}
        self._rng = rng or random.Random()

    async def serve(self, component: object) -> Served:
        spec = service_spec(component)
        instance_id = self._rng.getrandbits(63)
        keys = []
        for name, handler in endpoints_of(component).items():
            key = (spec.namespace, spec.component, name)
            self._registry.setdefault(key, {})[instance_id] = handler
            keys.append(key)
        return Served(self, keys, instance_id)

    async def client(
        self,
        namespace: str,
        component: str,
        endpoint: str,
        *,
        router_mode: str = "round_robin",
        selector: Selector | None = None,
    ) -> Client:
        transport = _InprocTransport(
            self._registry.setdefault((namespace, component, endpoint), {}), self._withdrawn
        )
        return Client(transport, router_mode=router_mode, selector=selector, rng=self._rng)

    async def aclose(self) -> None:
        """Withdraw every instance; calls in flight end at their next item."""
        now = asyncio.get_running_loop().time()
        for instances in self._registry.values():
            for instance_id in instances:
                self._withdrawn[instance_id] = now
        self._registry.clear()

    async def __aenter__(self) -> InprocRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _ShutDown(UpstreamError):
    """A call cut short because its instance was withdrawn and its drain time is over."""


class _InprocTransport:
    def __init__(self, instances: dict[int, Handler], withdrawn: dict[int, float]) -> None:
        self._instances = instances
        self._withdrawn = withdrawn

    def instance_ids(self) -> list[int]:
        return list(self._instances)

    async def call(self, instance_id: int, request: Any) -> AsyncGenerator[Any, None]:
        handler = self._instances.get(instance_id)
        if handler is None:
            raise InstanceGone(f"instance {instance_id:x} is gone")
        loop = asyncio.get_running_loop()
        withdrawn = self._withdrawn
        try:
            async with contextlib.aclosing(handler(request)) as items:
                async for item in items:
                    deadline = withdrawn.get(instance_id)
                    if deadline is not None and loop.time() >= deadline:
                        raise _ShutDown(f"instance {instance_id:x} shut down")
                    yield item
        except (GeneratorExit, _ShutDown):
            raise
        except Exception as exc:  # the endpoint's own failure, reported as the remote side would
            # Even an InstanceGone from a call the endpoint made itself: this call ran, so
            # it must not look like one that never reached an instance (and be retried).
            raise UpstreamError(f"endpoint failed: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        return None
