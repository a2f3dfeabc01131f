"""The ZeroMQ transport lets go of everything when it cannot start."""

from __future__ import annotations

import pytest

from kvrouter.errors import EventStreamError
from kvrouter.transport.zmq_transport import ZmqTransport


@pytest.mark.parametrize("which", ["endpoint", "replay_endpoint"])
async def test_a_taken_port_closes_sockets_and_context(taken_port: int, which: str) -> None:
    endpoints = {"endpoint": "tcp://127.0.0.1:*", "replay_endpoint": "tcp://127.0.0.1:*"}
    endpoints[which] = f"tcp://127.0.0.1:{taken_port}"
    transport = ZmqTransport(**endpoints)
    with pytest.raises(EventStreamError, match=f"cannot bind tcp://127.0.0.1:{taken_port}"):
        async with transport:
            pytest.fail("the transport started on a taken port")
    context = transport._own_context
    assert context is not None and context.closed
    assert transport._pub is not None and transport._pub.closed
    if which == "replay_endpoint":
        assert transport._router is not None and transport._router.closed
    await transport.aclose()  # still idempotent
