"""The service runtime: ``@service`` components with ``@endpoint`` methods, discovered and
called through NATS or in-process, and a client with random / round-robin / direct / kv
routing.

>>> from kvrouter.runtime import InprocRuntime, endpoint, service
>>> @service(namespace="demo")
... class Echo:
...     @endpoint
...     async def generate(self, request):
...         yield request
"""

from kvrouter.runtime.client import Client, InstanceGone
from kvrouter.runtime.component import endpoint, service
from kvrouter.runtime.inproc import InprocRuntime
from kvrouter.runtime.kv import KvRouterClient
from kvrouter.runtime.nats import NatsRuntime, start_nats_server

__all__ = [
    "Client",
    "InprocRuntime",
    "InstanceGone",
    "KvRouterClient",
    "NatsRuntime",
    "endpoint",
    "service",
    "start_nats_server",
]
