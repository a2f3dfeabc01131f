"""The in-process runtime: components and clients in one event loop, no network."""

from __future__ import annotations

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

    async def aclose(self) -> None:
        for key in self._keys:
            self._runtime._registry.get(key, {}).pop(self.instance_id, None)

    async def __aenter__(self) -> Served:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class InprocRuntime:
    """Discovery and calls through a dict; the default for tests and the embedded setup."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._registry: dict[EndpointKey, dict[int, Handler]] = {}
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
            self._registry.setdefault((namespace, component, endpoint), {})
        )
        return Client(transport, router_mode=router_mode, selector=selector, rng=self._rng)

    async def aclose(self) -> None:
        self._registry.clear()

    async def __aenter__(self) -> InprocRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _InprocTransport:
    def __init__(self, instances: dict[int, Handler]) -> None:
        self._instances = instances

    def instance_ids(self) -> list[int]:
        return list(self._instances)

    async def call(self, instance_id: int, request: Any) -> AsyncGenerator[Any, None]:
        handler = self._instances.get(instance_id)
        if handler is None:
            raise InstanceGone(f"instance {instance_id:x} is gone")
        try:
            async with contextlib.aclosing(handler(request)) as items:
                async for item in items:
                    yield item
        except GeneratorExit:
            raise
        except Exception as exc:  # the endpoint's own failure, reported as the remote side would
            # Even an InstanceGone from a call the endpoint made itself: this call ran, so
            # it must not look like one that never reached an instance (and be retried).
            raise UpstreamError(f"endpoint failed: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        return None
