"""``@service`` and ``@endpoint``: declare components whose methods other processes call.

>>> @service(namespace="demo")
... class Router:
...     @endpoint
...     async def route_request(self, request):
...         yield {"worker": 1}

An endpoint is an ``async def`` that either returns one value or is an async generator
that yields a stream of values; callers always receive a stream (one item for a plain
coroutine). Requests and responses must be msgpack-serialisable (dicts, lists, str,
numbers, bytes, None).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["EndpointSpec", "ServiceSpec", "endpoint", "endpoints_of", "service", "service_spec"]

_SERVICE_ATTR = "__kvrouter_service__"
_ENDPOINT_ATTR = "__kvrouter_endpoint__"

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    namespace: str
    component: str


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    name: str
    streaming: bool


def _check_name(kind: str, name: str) -> str:
    if not name or any(ch in name for ch in ". *>\t\n"):
        raise ValueError(f"{kind} name {name!r} must be non-empty without '.', '*', '>' or spaces")
    return name


def service(*, namespace: str, name: str | None = None) -> Callable[[C], C]:
    """Mark a class as a component in ``namespace`` (its name defaults to the class name)."""

    _check_name("namespace", namespace)

    def wrap(cls: C) -> C:
        spec = ServiceSpec(namespace, _check_name("component", name or cls.__name__))
        setattr(cls, _SERVICE_ATTR, spec)
        return cls

    return wrap


def endpoint(func: F) -> F:
    """Mark an ``async def`` method (coroutine or async generator) as a callable endpoint."""
    streaming = inspect.isasyncgenfunction(func)
    if not streaming and not inspect.iscoroutinefunction(func):
        raise TypeError(f"@endpoint needs an async function, got {func!r}")
    setattr(func, _ENDPOINT_ATTR, EndpointSpec(_check_name("endpoint", func.__name__), streaming))
    return func


def service_spec(obj: object) -> ServiceSpec:
    spec = getattr(obj, _SERVICE_ATTR, None)
    if not isinstance(spec, ServiceSpec):
        raise ValueError(f"{type(obj).__name__} is not decorated with @service")
    return spec


Handler = Callable[[Any], AsyncGenerator[Any, None]]


def endpoints_of(obj: object) -> dict[str, Handler]:
    """The instance's endpoints as uniform handlers that always produce a stream."""
    handlers: dict[str, Handler] = {}
    for attr in dir(type(obj)):
        spec = getattr(getattr(type(obj), attr, None), _ENDPOINT_ATTR, None)
        if isinstance(spec, EndpointSpec):
            handlers[spec.name] = _as_stream(getattr(obj, attr), spec.streaming)
    if not handlers:
        raise ValueError(f"{type(obj).__name__} has no @endpoint methods")
    return handlers


def _as_stream(method: Callable[[Any], Any], streaming: bool) -> Handler:
    if streaming:
        return method

    async def one(request: Any) -> AsyncGenerator[Any, None]:
        yield await method(request)

    return one
