"""HTTP pieces of the simulated engine's server: errors, responses, SSE, ``/metrics``."""

from __future__ import annotations

import uuid

from aiohttp import web

from kvrouter.engine import EngineCore, RequestOutput
from kvrouter.engine.latency import LatencyMetrics
from kvrouter.errors import InvalidRequest, RequestError, RequestTooLarge
from kvrouter.protocol import error_body

__all__ = [
    "ModelNotFound",
    "NotFound",
    "ShuttingDown",
    "aborted_output",
    "bound_port",
    "error_response",
    "error_type",
    "finish_reason",
    "json_response",
    "read_body",
    "render_engine_metrics",
    "request_id_of",
    "sse",
]


class NotFound(RequestError):
    status = 404


class ModelNotFound(NotFound):
    pass


class ShuttingDown(RequestError):
    status = 503


def error_type(status: int) -> str:
    names = {404: "NotFoundError", 413: "RequestTooLarge", 503: "ServiceUnavailableError"}
    return names.get(status, "BadRequestError")


def error_response(status: int, message: str, error_type: str) -> web.Response:
    return web.Response(
        status=status, body=error_body(message, error_type, status), content_type="application/json"
    )


def json_response(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


async def read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise RequestTooLarge(f"request body too large: {exc.text}") from exc
    except web.RequestPayloadError as exc:  # e.g. a Content-Encoding the body does not match
        raise InvalidRequest(f"the request body could not be read: {exc}") from exc


def sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def request_id_of(request: web.Request, prefix: str) -> str:
    """The client's ``x-request-id`` as given (it also fixes the simulated tokens), or a
    new ``{prefix}-{uuid}``."""
    given = request.headers.get("x-request-id")
    return given if given else f"{prefix}-{uuid.uuid4().hex}"


def has_client_id(request: web.Request) -> bool:
    return bool(request.headers.get("x-request-id"))


def aborted_output(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, [], True, "abort", 0, 0, 0)


def finish_reason(output: RequestOutput) -> str:
    reason = output.finish_reason
    return str(reason) if reason is not None else "length"


def bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested


def render_engine_metrics(
    core: EngineCore, model_name: str, latency: LatencyMetrics | None = None
) -> str:
    """``/metrics``: vLLM's series (DESIGN 3.3), the cache size, a few counters and, with
    ``latency``, the request latency histograms and outcomes."""
    from kvrouter.transport.metrics import render_vllm_metrics

    stats = core.stats()
    text = render_vllm_metrics(
        core.metrics(),
        model_name=model_name,
        prefix_cache_queries_total=stats.prefix_cache_queries,
        prefix_cache_hits_total=stats.prefix_cache_hits,
    )
    label = '{model_name="' + model_name.replace('"', "") + '"}'
    lines = [text.rstrip("\n")]
    for name, value in (
        ("num_preemptions_total", stats.preemptions),
        ("generation_tokens_total", stats.output_tokens),
    ):
        lines += [f"# TYPE vllm:{name} counter", f"vllm:{name}{label} {value}"]
    if latency is not None:
        lines += latency.render(label[1:-1])
    config = core.config
    lines += [
        "# TYPE vllm:cache_config_info gauge",
        f'vllm:cache_config_info{{block_size="{config.block_size}",'
        f'num_gpu_blocks="{config.num_gpu_blocks}"}} 1',
    ]
    return "\n".join(lines) + "\n"
