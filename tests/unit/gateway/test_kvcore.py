"""The gateway's routing core: exclusion for retries, side-effect-free previews."""

from __future__ import annotations

import pytest

from kvrouter.clock import ManualClock
from kvrouter.errors import AllWorkersBusy, NoWorkerAvailable
from kvrouter.events.model import WorkerKey
from kvrouter.gateway.config import GatewayConfig
from kvrouter.gateway.core import RouteResult
from kvrouter.gateway.kvcore import KvRoutingCore
from kvrouter.gateway.overrides import RoutingOverrides
from kvrouter.gateway.prompts import prepare_prompt
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.tokenizer import ByteTokenizer

W0, W1, W2 = WorkerKey(0), WorkerKey(1), WorkerKey(2)
NONE = RoutingOverrides()


def _core(workers: tuple[WorkerKey, ...] = (W0, W1, W2)) -> KvRoutingCore:
    core = KvRoutingCore(GatewayConfig(block_size=4), clock=ManualClock())
    for worker in workers:
        core.add_worker(worker)
    return core


def _prompt(text: str = "abcdefghijklmnop"):  # type: ignore[no-untyped-def]
    return prepare_prompt(
        ByteTokenizer(), {"prompt": text}, "completion", block_size=4, max_prompt_tokens=100
    )


def test_excluded_workers_are_skipped_but_stay_in_rotation() -> None:
    core = _core()
    prompt = _prompt()
    first = core.route("a", prompt, NONE)
    core.on_finish("a")
    # The prefix is now predicted on the first worker; excluding it sends the retry
    # elsewhere, and the worker is still registered for everyone else.
    retry = core.route("a", prompt, NONE, exclude=frozenset({first.worker}))
    assert retry.worker != first.worker
    assert core.scheduler.workers == (W0, W1, W2)
    core.on_finish("a")
    again = core.route("b", prompt, NONE)
    assert again.worker in (first.worker, retry.worker)
    assert again.overlap_blocks == 4


def test_excluding_every_worker_is_no_worker_available() -> None:
    core = _core((W0, W1))
    with pytest.raises(NoWorkerAvailable, match="excluded"):
        core.route("a", _prompt(), NONE, exclude=frozenset({W0, W1}))
    assert core.scheduler.stats().active.num_requests == 0


def test_direct_routing_ignores_exclusion() -> None:
    core = _core((W0, W1))
    route = core.route("a", _prompt(), NONE, worker=W1, exclude=frozenset({W1}))
    assert route.worker == W1


def test_preview_books_nothing_and_counts_nothing() -> None:
    core = _core()
    prompt = _prompt()
    chosen = core.route("a", prompt, NONE)
    core.on_first_token("a")
    core.route("b", _prompt("0123456789abcdef"), NONE)  # stays in flight
    before_index = {w: core.indexer.tree_size(w) for w in (W0, W1, W2)}
    before = core.scheduler.stats()
    preview = core.preview(prompt, NONE)
    assert preview.worker == chosen.worker  # where the prefix is cached
    assert (preview.overlap_blocks, preview.request_blocks) == (4, 4)
    assert len(preview.explanation) == 3
    assert sum("(Selected)" in line for line in preview.explanation) == 1
    after = core.scheduler.stats()
    assert (after.num_decisions, after.active.num_requests) == (before.num_decisions, 2)
    assert after.active == before.active
    assert {w: core.indexer.tree_size(w) for w in (W0, W1, W2)} == before_index


def test_preview_of_a_new_prompt_records_no_predicted_entries() -> None:
    core = _core((W0,))
    preview = core.preview(_prompt("zzzzyyyyxxxxwwww"), NONE)
    assert preview.worker == W0
    assert core.indexer.tree_size(W0) == 0


def test_explanations_are_formatted_on_demand() -> None:
    core = _core((W0, W1))
    route = core.route("a", _prompt(), NONE)
    assert route.decision is not None
    assert route.explanation == tuple(route.decision.explain())


def test_pushed_metrics_reach_the_aggregator() -> None:
    core = _core((W0, W1))
    core.update_metrics(ForwardPassMetrics(worker_id=1, kv_active_blocks=5, kv_total_blocks=10))
    endpoints = {e.worker: e for e in core.aggregator.get_metrics().endpoints}
    assert endpoints[W1].kv_active_blocks == 5
    assert W0 not in endpoints
    state = core.debug_state()["workers"]["1"]
    assert (state["decisions"], state["index_size"]) == (0, 0)


def _queued_core(**settings: object) -> KvRoutingCore:
    cfg = GatewayConfig(
        block_size=4, router_queue_threshold=1.0, max_num_batched_tokens=4, **settings
    )  # type: ignore[arg-type]
    core = KvRoutingCore(cfg, clock=ManualClock())
    core.add_worker(W0)
    return core


def test_router_queue_delivers_routes_as_prefills_end() -> None:
    core = _queued_core()
    assert core.queue_enabled
    got: dict[str, object] = {}
    for name in ("a", "b"):
        core.submit(name, _prompt(name * 16), NONE, lambda r, n=name: got.__setitem__(n, r))
    assert list(got) == ["a"]  # routed at once; "b" waits: the worker prefills 16 tokens
    assert isinstance(got["a"], RouteResult) and got["a"].worker == W0
    assert core.queue_stats().pending == 1  # type: ignore[union-attr]
    core.on_first_token("a")
    assert list(got) == ["a", "b"]
    assert not core.cancel("b")  # routed, no longer waiting


def test_a_full_router_queue_refuses_and_cancel_takes_a_request_out() -> None:
    core = _queued_core(router_queue_max_pending=1)
    got: list[object] = []
    core.submit("a", _prompt("a" * 16), NONE, got.append)
    core.submit("b", _prompt("b" * 16), NONE, got.append)
    with pytest.raises(AllWorkersBusy, match="already waiting at the router"):
        core.submit("c", _prompt("c" * 16), NONE, got.append)
    assert core.cancel("b")
    core.on_finish("a")
    assert len(got) == 1  # "b" left the queue and is never routed
    assert core.stats().queue == core.queue_stats()
    assert core.queue_stats().num_refused == 1  # type: ignore[union-attr]


def test_without_a_queue_submit_routes_at_once() -> None:
    core = _core()
    got: list[object] = []
    core.submit("a", _prompt(), NONE, got.append)
    assert not core.queue_enabled and isinstance(got[0], RouteResult)
    assert core.queue_stats() is None and not core.cancel("a")


def test_poll_routes_queued_requests_once_a_lost_booking_expires() -> None:
    clock = ManualClock()
    cfg = GatewayConfig(
        block_size=4, router_queue_threshold=1.0, max_num_batched_tokens=4, request_timeout_s=10
    )
    core = KvRoutingCore(cfg, clock=clock)
    core.add_worker(W0)
    got: dict[str, object] = {}
    for name in ("lost", "b"):
        core.submit(name, _prompt(name * 16), NONE, lambda r, n=name: got.__setitem__(n, r))
    assert list(got) == ["lost"]
    core.poll()
    assert list(got) == ["lost"]  # nothing has expired: "b" still waits
    clock.advance(21.0)  # bookings expire after twice the request timeout
    core.poll()
    assert list(got) == ["lost", "b"] and isinstance(got["b"], RouteResult)


def test_a_request_for_n_choices_is_booked_as_n_sequences() -> None:
    core = _core((W0,))
    prompt = prepare_prompt(
        ByteTokenizer(),
        {"prompt": "abcdefghij", "n": 3},
        "completion",
        block_size=4,
        max_prompt_tokens=100,
    )
    core.route("a", prompt, NONE)
    load = core.scheduler.active.load(W0)
    assert (load.prefill_tokens, load.active_blocks) == (3 * 10, 2 + 3)
