"""KV-aware routing for runtime clients: the scheduler picks, the client sends.

::

    scheduler = KvScheduler(KvIndexer(subscriber, block_size=16), block_size=16)
    router = KvRouterClient(client, scheduler, tokens_of=lambda req: req["token_ids"])
    async for item in router.generate({"token_ids": [...]}):
        ...

Instance ids double as the scheduler's worker ids, so KV events published by an
instance must carry its instance id as ``worker_id``. A request's ``cache_salt`` (read
by ``cache_salt_of``, by default the request's ``"cache_salt"`` key when it is a
mapping) changes its first block's hash as in vLLM, so tenants share no prefix. The
booking made at decision time is released on the first item (prefill done) and at the
end of the stream, on every path: completion, error or the caller abandoning the stream.
An instance found gone before the first item (:class:`InstanceGone`: nothing was sent to
it) leaves the scheduler and the request is scheduled again, ``max_attempts`` times in all.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from kvrouter.events.model import WorkerKey
from kvrouter.routing.scheduler import KvScheduler, ScheduleRequest
from kvrouter.runtime.client import Client, retry_until_first_item

__all__ = ["KvRouterClient"]

TokensOf = Callable[[Any], Sequence[int]]
CacheSaltOf = Callable[[Any], str | None]


def _token_ids(request: Any) -> Sequence[int]:
    tokens: Sequence[int] = request["token_ids"]
    return tokens


def _cache_salt(request: Any) -> str | None:
    salt = request.get("cache_salt") if isinstance(request, Mapping) else None
    return salt if isinstance(salt, str) and salt else None


class KvRouterClient:
    """Routes each call of ``client`` to the instance the scheduler chooses."""

    def __init__(
        self,
        client: Client,
        scheduler: KvScheduler,
        *,
        tokens_of: TokensOf = _token_ids,
        cache_salt_of: CacheSaltOf = _cache_salt,
        max_attempts: int = 3,
    ) -> None:
        self._client = client
        self._max_attempts = max_attempts
        self._scheduler = scheduler
        self._tokens_of = tokens_of
        self._cache_salt_of = cache_salt_of
        self._ids = itertools.count()

    def _sync_workers(self) -> None:
        live = set(self._client.instance_ids())
        known = {key.worker_id for key in self._scheduler.workers}
        for gone in known - live:
            self._scheduler.remove_worker(gone)
        for new in live - known:
            self._scheduler.add_worker(WorkerKey(new))

    def select(self, request: Any) -> int:
        """The instance the scheduler would choose now (nothing is booked)."""
        self._sync_workers()
        preview = self._schedule_request(f"preview-{next(self._ids)}", request)
        return self._scheduler.preview(preview).worker.worker_id

    def _schedule_request(self, request_id: str, request: Any) -> ScheduleRequest:
        return ScheduleRequest(
            request_id,
            token_ids=self._tokens_of(request),
            cache_salt=self._cache_salt_of(request),
        )

    def generate(self, request: Any) -> AsyncIterator[Any]:
        """Route ``request`` by KV overlap and stream the chosen instance's items; an
        instance found gone before the first item is routed around."""
        return retry_until_first_item(lambda: self._generate_once(request), self._max_attempts)

    async def _generate_once(self, request: Any) -> AsyncGenerator[Any, None]:
        self._sync_workers()
        request_id = f"kv-{next(self._ids)}"
        decision = self._scheduler.schedule(self._schedule_request(request_id, request))
        try:
            stream = self._client.direct(request, decision.worker.worker_id)
            async with contextlib.aclosing(stream):
                first = True
                async for item in stream:
                    if first:
                        self._scheduler.on_first_token(request_id)
                        first = False
                    yield item
        finally:
            self._scheduler.on_finish(request_id)
