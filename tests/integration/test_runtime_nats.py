"""The NATS runtime with a real nats-server and a component in another process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from kvrouter.errors import InvalidRequest, NoWorkerAvailable, UpstreamError, UpstreamTimeout
from kvrouter.runtime import NatsRuntime, endpoint, service
from tests.integration.conftest import free_port, start_and_wait

pytestmark = pytest.mark.integration

WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, signal, sys
    from kvrouter.runtime import NatsRuntime, endpoint, service

    @service(namespace="itest")
    class Worker:
        @endpoint
        async def generate(self, request):
            for i in range(request["n"]):
                yield {"who": "child", "i": i}

        @endpoint
        async def ticks(self, request):
            while True:
                yield "tick"
                await asyncio.sleep(0.05)

        @endpoint
        async def wait(self, request):
            await asyncio.sleep(request)
            return "late"

    async def main():
        rt = await NatsRuntime.connect(sys.argv[1], lease_s=float(sys.argv[2]))
        await rt.serve(Worker())
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await rt.aclose()

    asyncio.run(main())
    """
)


@service(namespace="itest")
class Worker:
    def __init__(self) -> None:
        self.num_started = 0
        self.num_running = 0

    @endpoint
    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for i in range(request["n"]):
            yield {"who": "local", "i": i}
            await asyncio.sleep(0)

    @endpoint
    async def fail(self, request: str) -> str:
        raise ValueError(f"bad {request}")

    @endpoint
    async def ticks(self, request: float) -> AsyncIterator[str]:
        """Ticks every ``request`` seconds until the caller goes away."""
        self.num_started += 1
        self.num_running += 1
        try:
            while True:
                yield "tick"
                await asyncio.sleep(request)
        finally:
            self.num_running -= 1

    @endpoint
    async def unsendable(self, request: None) -> AsyncIterator[object]:
        yield "fine"
        yield object()


def _start_child(tmp_path: Path, url: str, lease_s: float = 5.0) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), url, str(lease_s)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


async def test_discovery_streaming_and_strategies(nats_url: str, tmp_path: Path) -> None:
    child = _start_child(tmp_path, nats_url)
    try:
        async with await NatsRuntime.connect(nats_url) as server_rt:
            local = await server_rt.serve(Worker())
            async with await NatsRuntime.connect(nats_url) as client_rt:
                client = await client_rt.client("itest", "Worker", "generate")
                ids = await client.wait_for_instances(minimum=2, timeout_s=10)
                assert local.instance_id in ids

                whos = [(await collect(client.round_robin({"n": 1})))[0]["who"] for _ in range(4)]
                assert sorted(whos) == ["child", "child", "local", "local"]

                out = await collect(client.direct({"n": 3}, local.instance_id))
                assert out == [{"who": "local", "i": i} for i in range(3)]

                # A graceful shutdown withdraws the child's instance.
                child.send_signal(signal.SIGTERM)
                child.wait(timeout=10)
                for _ in range(100):
                    if client.instance_ids() == [local.instance_id]:
                        break
                    await asyncio.sleep(0.05)
                assert client.instance_ids() == [local.instance_id]
    finally:
        _stop(child)


async def test_killed_instance_is_skipped_by_retry(nats_url: str, tmp_path: Path) -> None:
    child = _start_child(tmp_path, nats_url)
    async with await NatsRuntime.connect(nats_url) as rt:
        local = await rt.serve(Worker())
        client = await rt.client("itest", "Worker", "generate")
        await client.wait_for_instances(minimum=2, timeout_s=10)
        _stop(child)  # killed: no goodbye, the client still lists it
        assert len(client.instance_ids()) == 2
        for _ in range(4):
            out = await collect(client.round_robin({"n": 1}))
            assert out == [{"who": "local", "i": 0}]
        assert client.instance_ids() == [local.instance_id]


async def test_endpoint_error_reaches_the_caller(nats_url: str) -> None:
    async with await NatsRuntime.connect(nats_url) as rt:
        await rt.serve(Worker())
        client = await rt.client("itest", "Worker", "fail")
        await client.wait_for_instances()
        with pytest.raises(UpstreamError, match="ValueError: bad x"):
            await collect(client.generate("x"))


async def test_the_runtime_comes_back_after_a_nats_server_restart() -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    server = start_and_wait(port)
    try:
        async with await NatsRuntime.connect(url, reconnect_wait_s=0.1) as rt:
            await rt.serve(Worker())
            client = await rt.client("itest", "Worker", "generate")
            await client.wait_for_instances()
            assert await collect(client.generate({"n": 2})) == [
                {"who": "local", "i": i} for i in range(2)
            ]
            server.terminate()
            server.wait(timeout=10)
            await asyncio.sleep(1.5)  # ~15 reconnect attempts, three times the old limit
            server = start_and_wait(port)
            for _ in range(100):
                try:
                    out = await collect(client.generate({"n": 2}))
                    break
                except UpstreamError:
                    await asyncio.sleep(0.1)
            assert out == [{"who": "local", "i": i} for i in range(2)]
            assert rt.connection.is_connected
    finally:
        server.terminate()
        server.wait(timeout=10)


async def _wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_killed_instance_fails_its_calls_within_its_lease(
    nats_url: str, tmp_path: Path
) -> None:
    child = _start_child(tmp_path, nats_url, lease_s=1.0)
    try:
        async with await NatsRuntime.connect(nats_url) as rt:
            ticks = await rt.client("itest", "Worker", "ticks", idle_timeout_s=60)
            wait = await rt.client("itest", "Worker", "wait", idle_timeout_s=60)
            [child_id] = await ticks.wait_for_instances()
            await wait.wait_for_instances()
            stream = ticks.direct(None, child_id)
            assert await anext(stream) == "tick"
            unary = asyncio.create_task(collect(wait.direct(60, child_id)))
            await asyncio.sleep(0.2)  # the unary call reaches the child

            child.kill()
            loop = asyncio.get_running_loop()
            killed_at = loop.time()
            with pytest.raises(UpstreamError, match="no heartbeat"):
                async for _ in stream:
                    pass
            with pytest.raises(UpstreamError, match="no heartbeat"):
                await unary
            assert loop.time() - killed_at < 10  # its lease (1 s), not the idle timeout
            assert ticks.instance_ids() == wait.instance_ids() == []
            with pytest.raises(NoWorkerAvailable, match=f"{child_id:x}"):
                ticks.direct(None, child_id)
    finally:
        _stop(child)


async def test_a_slow_instance_outlives_its_lease_by_beating(nats_url: str) -> None:
    async with await NatsRuntime.connect(nats_url, lease_s=1.0) as rt:
        worker = Worker()
        await rt.serve(worker)
        client = await rt.client("itest", "Worker", "ticks")
        await client.wait_for_instances()
        stream = client.generate(2.0)  # two leases between two items
        assert [await anext(stream), await anext(stream)] == ["tick", "tick"]
        await stream.aclose()
        await _wait_until(lambda: worker.num_running == 0)


async def test_a_caller_that_goes_away_stops_the_handler(nats_url: str) -> None:
    async with await NatsRuntime.connect(nats_url) as rt:
        worker = Worker()
        await rt.serve(worker)
        client = await rt.client("itest", "Worker", "ticks", idle_timeout_s=0.5)
        await client.wait_for_instances()

        async def consume() -> None:
            async for _ in client.generate(0.01):
                pass

        task = asyncio.create_task(consume())
        await _wait_until(lambda: worker.num_running == 1)
        task.cancel()
        await _wait_until(lambda: worker.num_running == 0)

        stream = client.round_robin(0.01)
        await anext(stream)
        await stream.aclose()  # an abandoned stream
        await _wait_until(lambda: worker.num_running == 0)

        with pytest.raises(UpstreamTimeout, match="sent nothing"):
            await collect(client.generate(3600))  # a handler that never goes on
        await _wait_until(lambda: worker.num_running == 0)
        assert worker.num_started == 3


CALLER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from kvrouter.runtime import NatsRuntime

    async def main():
        rt = await NatsRuntime.connect(sys.argv[1], lease_s=1.0)
        client = await rt.client("itest", "Worker", "ticks")
        await client.wait_for_instances()
        async for _ in client.generate(0.05):
            print("calling", flush=True)
            await asyncio.sleep(3600)  # holds the stream open until it is killed

    asyncio.run(main())
    """
)


async def test_a_killed_caller_stops_the_handler_within_its_lease(
    nats_url: str, tmp_path: Path
) -> None:
    async with await NatsRuntime.connect(nats_url, lease_s=1.0) as rt:
        worker = Worker()
        await rt.serve(worker)
        script = tmp_path / "caller.py"
        script.write_text(CALLER_SCRIPT)
        caller = subprocess.Popen(
            [sys.executable, str(script), nats_url], stdout=subprocess.PIPE, text=True
        )
        try:
            assert caller.stdout is not None
            line = await asyncio.to_thread(caller.stdout.readline)
            assert line.strip() == "calling"
            await asyncio.sleep(2.5)  # the caller's keepalives hold the call past its lease
            assert worker.num_running == 1
            caller.kill()  # no cancel message: only the missing keepalives tell
            killed_at = asyncio.get_running_loop().time()
            await _wait_until(lambda: worker.num_running == 0, timeout_s=10.0)
            assert asyncio.get_running_loop().time() - killed_at < 5.0  # lease 1 s
        finally:
            _stop(caller)


async def test_an_item_that_cannot_be_sent_is_a_clear_error(nats_url: str) -> None:
    async with await NatsRuntime.connect(nats_url) as rt:
        await rt.serve(Worker())
        client = await rt.client("itest", "Worker", "unsendable")
        await client.wait_for_instances()
        received = []
        with pytest.raises(UpstreamError, match="TypeError: Encoding objects of type object"):
            async for item in client.generate(None):
                received.append(item)
        assert received == ["fine"]


async def test_a_nats_server_restart_fails_streams_in_flight_instead_of_losing_items() -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    server = start_and_wait(port)
    try:
        async with await NatsRuntime.connect(url, reconnect_wait_s=0.1) as rt:
            worker = Worker()
            await rt.serve(worker)
            client = await rt.client("itest", "Worker", "ticks")
            await client.wait_for_instances()
            received = []
            with pytest.raises(UpstreamError, match="lost the connection to NATS"):
                async for item in client.generate(0.02):
                    received.append(item)
                    if len(received) == 3:
                        server.terminate()
                        server.wait(timeout=10)
                        server = start_and_wait(port)
            await client.wait_for_instances()
            stream = client.generate(0.02)
            assert [await anext(stream) for _ in range(3)] == ["tick"] * 3
            await stream.aclose()
            await _wait_until(lambda: worker.num_running == 0)
    finally:
        server.terminate()
        server.wait(timeout=10)


KEY = "itest.Worker.generate"


async def test_malformed_messages_get_clear_errors_and_lose_nothing(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with await NatsRuntime.connect(nats_url) as rt:
        served = await rt.serve(Worker())
        client = await rt.client("itest", "Worker", "generate")
        await client.wait_for_instances()
        raw = await nats.connect(nats_url)
        try:
            subject = f"kvr.{KEY}.{served.instance_id:x}"
            for data in [b"", b"\xc1", msgspec.msgpack.encode([1]), msgspec.msgpack.encode({})]:
                reply = await raw.request(subject, data, timeout=5)
                assert msgspec.msgpack.decode(reply.data)["err"].startswith("bad call")
                await raw.publish(subject, data)  # no reply subject: logged, dropped
                await raw.publish(subject, msgspec.msgpack.encode({"r": {"n": 1}}))
            for data in [b"\xc1", msgspec.msgpack.encode({"id": "x"}), msgspec.msgpack.encode([])]:
                await raw.publish(f"kvr._up.{KEY}", data)
                await raw.publish(f"kvr._down.{KEY}", data)
            await raw.flush()
            await asyncio.sleep(0.2)
        finally:
            await raw.close()
        assert client.instance_ids() == [served.instance_id]
        assert await collect(client.generate({"n": 2})) == [
            {"who": "local", "i": i} for i in (0, 1)
        ]
    assert any("bad presence message" in m for m in caplog.messages)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_reply_stream_with_a_hole_is_an_error(nats_url: str) -> None:
    """A hand-made instance that loses an item, then one that sends garbage."""
    async with await NatsRuntime.connect(nats_url) as rt:
        client = await rt.client("itest", "Worker", "generate")
        raw = await nats.connect(nats_url)
        replies = [
            [{"n": 0, "d": "a"}, {"n": 2, "d": "c"}, {"n": 3, "end": True}],
            [{"n": 0, "d": "a"}, {"n": 1}],
            [b"\xc1"],
        ]

        async def on_call(msg: Any) -> None:
            if not msg.reply:
                return  # the caller's cancel, once it has given up
            for frame in replies.pop(0):
                data = frame if isinstance(frame, bytes) else msgspec.msgpack.encode(frame)
                await raw.publish(msg.reply, data)

        try:
            await raw.subscribe(f"kvr.{KEY}.7", cb=on_call)
            await raw.publish(f"kvr._up.{KEY}", msgspec.msgpack.encode({"id": 7, "ttl": 60}))
            await client.wait_for_instances()
            with pytest.raises(UpstreamError, match="were lost: item 2 came after 1 items"):
                await collect(client.direct({}, 7))
            with pytest.raises(UpstreamError, match="no item, end or error"):
                await collect(client.direct({}, 7))
            with pytest.raises(UpstreamError, match="bad reply"):
                await collect(client.direct({}, 7))
        finally:
            await raw.close()


async def test_a_draining_instance_hears_its_callers_and_turns_new_calls_away(
    nats_url: str,
) -> None:
    # lease 1 s, drain up to 5 s: in-flight calls outlive the caller's lease only if the
    # instance still hears the keepalives; a cancel must still stop a handler; a new call
    # reaching the draining instance goes to another one.
    async with (
        await NatsRuntime.connect(nats_url, lease_s=1.0) as rt,
        await NatsRuntime.connect(nats_url, lease_s=1.0) as other,
    ):
        draining, fresh = Worker(), Worker()
        served = await rt.serve(draining)
        client = await rt.client("itest", "Worker", "ticks")
        await client.wait_for_instances()
        kept = client.direct(0.05, served.instance_id)
        dropped = client.direct(0.05, served.instance_id)
        await anext(kept)
        await anext(dropped)
        assert draining.num_running == 2
        closing = asyncio.create_task(served.aclose(drain_timeout_s=5.0))
        await asyncio.sleep(1.6)  # past the caller's lease: keepalives must get through
        assert draining.num_running == 2
        await dropped.aclose()  # the caller's cancel reaches the draining instance
        await _wait_until(lambda: draining.num_running == 1)
        await other.serve(fresh)
        await _wait_until(lambda: len(client.instance_ids()) >= 1 and not closing.done())
        stream = client.round_robin(0.05)
        assert await anext(stream) == "tick"
        assert fresh.num_started == 1  # not the draining instance
        await stream.aclose()
        await kept.aclose()
        await closing
        assert draining.num_running == 0


async def test_a_bad_router_mode_leaves_nothing_running(nats_url: str) -> None:
    async with await NatsRuntime.connect(nats_url) as rt:
        before = set(asyncio.all_tasks())
        with pytest.raises(ValueError, match="unknown router mode"):
            await rt.client("itest", "Worker", "ticks", router_mode="bogus")
        assert set(asyncio.all_tasks()) <= before


async def test_closing_while_the_server_is_down_is_clean() -> None:
    port = free_port()
    server = start_and_wait(port)
    rt = await NatsRuntime.connect(f"nats://127.0.0.1:{port}", reconnect_wait_s=0.1)
    await rt.serve(Worker())
    server.terminate()
    server.wait(timeout=10)
    await asyncio.sleep(0.3)
    await rt.aclose()  # no error: closing needs no server
    assert rt.connection.is_closed


async def test_a_request_that_cannot_be_sent_is_the_callers_error(nats_url: str) -> None:
    async with await NatsRuntime.connect(nats_url) as rt:
        worker = Worker()
        await rt.serve(worker)
        client = await rt.client("itest", "Worker", "generate")
        await client.wait_for_instances()
        with pytest.raises(InvalidRequest, match="max_payload"):
            await collect(client.generate({"n": 1, "pad": "x" * 2_000_000}))
        with pytest.raises(InvalidRequest, match="cannot be sent as msgpack"):
            await collect(client.generate({"n": 1, "pad": object()}))
        # Nothing was sent, and the client works as before.
        assert await collect(client.generate({"n": 1})) == [{"who": "local", "i": 0}]
