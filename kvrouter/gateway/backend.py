"""A trivial OpenAI-shaped backend for measuring the gateway's own overhead.

It answers at once with fixed bodies (JSON, or a short SSE stream), so whatever time a
request takes through the gateway beyond the time it takes straight to this backend is
the gateway's. Run it as ``python -m kvrouter.gateway.backend --port 0``; it prints
``port N`` once it listens.

With ``--forward-to URL`` it is instead the plainest proxy one Python process can be:
every completion is passed to ``URL`` as it came and the answer passed back, with no
parsing, routing or bookkeeping. Measured as a peer of ``kvrouter bench gateway`` it
shows how many requests/s forwarding alone costs on a machine.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web

__all__ = ["build_backend_app", "main"]

_COMPLETION = (
    b'{"id":"cmpl-bench","object":"text_completion","created":0,"model":"bench",'
    b'"choices":[{"index":0,"text":"ok","logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)
_CHUNKS = (
    b'data: {"id":"cmpl-bench","object":"text_completion","created":0,"model":"bench",'
    b'"choices":[{"index":0,"text":"o","logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {"id":"cmpl-bench","object":"text_completion","created":0,"model":"bench",'
    b'"choices":[{"index":0,"text":"k","logprobs":null,"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
)
_MODELS = b'{"object":"list","data":[{"id":"bench","object":"model","owned_by":"kvrouter"}]}'


async def _generate(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if b'"stream":true' not in body.replace(b" ", b""):
        return web.Response(body=_COMPLETION, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in _CHUNKS:
        await response.write(chunk)
    await response.write_eof()
    return response


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _models(request: web.Request) -> web.Response:
    return web.Response(body=_MODELS, content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")


def _forwarder(target: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler that passes each request to ``target`` (a base URL) unchanged."""
    import aiohttp

    session: aiohttp.ClientSession | None = None

    async def forward(request: web.Request) -> web.Response:
        nonlocal session
        if session is None:  # made on the serving loop
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            request.app.on_cleanup.append(lambda _app: session.close())
        body = await request.read()
        headers = {"Content-Type": request.content_type}
        async with session.post(target + request.path, data=body, headers=headers) as answer:
            data = await answer.read()
            return web.Response(body=data, status=answer.status, content_type=answer.content_type)

    return forward


def build_backend_app(forward_to: str | None = None) -> web.Application:
    """The fixed-answer backend, or with ``forward_to`` the plain proxy (module docstring)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    generate = _generate if forward_to is None else _forwarder(forward_to.rstrip("/"))
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/metrics", _metrics)
    return app


async def _serve(host: str, port: int, forward_to: str | None) -> None:
    runner = web.AppRunner(build_backend_app(forward_to), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = next((a[1] for a in runner.addresses if isinstance(a, tuple)), port)
    print(f"port {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--forward-to", metavar="URL", help="be a plain proxy to URL")
    args = parser.parse_args(argv)
    from kvrouter.gateway.server import install_uvloop

    install_uvloop()
    asyncio.run(_serve(args.host, args.port, args.forward_to))


if __name__ == "__main__":
    main(sys.argv[1:])
