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
        """Withdraw: no new calls; calls in flight get ``drain_timeout_s`` to finish, then
        fail (as a NATS instance's calls are cancelled)."""
        for key in self._keys:
            self._runtime._registry.get(key, {}).pop(self.instance_id, None)
        if drain_timeout_s > 0:
            asyncio.get_running_loop().call_later(
                drain_timeout_s, self._runtime._end, self.instance_id
            )
        else:
            self._runtime._end(self.instance_id)

    async def __aenter__(self) -> Served:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class InprocRuntime:
    """Discovery and calls through a dict; the default for tests and the embedded setup."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._registry: dict[EndpointKey, dict[int, Handler]] = {}
        # instance -> resolved when its calls in flight must stop (it was withdrawn)
        self._ends: dict[int, asyncio.Future[None]] = {}
        self._rng = rng or random.Random()

    async def serve(self, component: object) -> Served:
        spec = service_spec(component)
        instance_id = self._rng.getrandbits(63)
        self._ends[instance_id] = asyncio.get_running_loop().create_future()
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
            self._registry.setdefault((namespace, component, endpoint), {}), self._ends
        )
        return Client(transport, router_mode=router_mode, selector=selector, rng=self._rng)

    def _end(self, instance_id: int) -> None:
        ended = self._ends.pop(instance_id, None)
        if ended is not None and not ended.done():
            ended.set_result(None)

    async def aclose(self) -> None:
        """Withdraw every instance and stop the calls in flight."""
        for instances in self._registry.values():
            instances.clear()  # in place: clients hold these dicts
        for instance_id in list(self._ends):
            self._end(instance_id)

    async def __aenter__(self) -> InprocRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _ShutDown(UpstreamError):
    """A call cut short because its instance was withdrawn and its drain time is over."""


class _InprocTransport:
    def __init__(
        self, instances: dict[int, Handler], ends: dict[int, asyncio.Future[None]]
    ) -> None:
        self._instances = instances
        self._ends = ends

    def instance_ids(self) -> list[int]:
        return list(self._instances)

    async def call(self, instance_id: int, request: Any) -> AsyncGenerator[Any, None]:
        handler = self._instances.get(instance_id)
        ended = self._ends.get(instance_id)
        if handler is None or ended is None:
            raise InstanceGone(f"instance {instance_id:x} is gone")
        items = handler(request)
        try:
            while True:
                # Each item is awaited beside the instance's end, which may come while
                # the handler waits (a stream with nothing to send).
                step = asyncio.ensure_future(anext(items))
                try:
                    await asyncio.wait((step, ended), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not step.done():
                        step.cancel()
                        with contextlib.suppress(BaseException):
                            await step
                if step.cancelled():
                    raise _ShutDown(f"instance {instance_id:x} shut down")
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
        except (GeneratorExit, _ShutDown):
            raise
        except Exception as exc:  # the endpoint's own failure, reported as the remote side would
            # Even an InstanceGone from a call the endpoint made itself: this call ran, so
            # it must not look like one that never reached an instance (and be retried).
            raise UpstreamError(f"endpoint failed: {type(exc).__name__}: {exc}") from exc
        finally:
            await items.aclose()

    async def aclose(self) -> None:
        return None
