"""The NATS runtime with a real nats-server and a component in another process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kvrouter.errors import UpstreamError
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

    async def main():
        rt = await NatsRuntime.connect(sys.argv[1])
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
    @endpoint
    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for i in range(request["n"]):
            yield {"who": "local", "i": i}
            await asyncio.sleep(0)

    @endpoint
    async def fail(self, request: str) -> str:
        raise ValueError(f"bad {request}")


def _start_child(tmp_path: Path, url: str) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), url], stdout=subprocess.PIPE, text=True, env=env
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
