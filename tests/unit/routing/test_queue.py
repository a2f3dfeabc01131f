"""The router queue: when requests wait, in which order they go, and what leaves it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrouter.clock import ManualClock
from kvrouter.errors import AllWorkersBusy, InvalidRequest, NoWorkerAvailable
from kvrouter.index import KvIndexer
from kvrouter.routing.policies import Decision
from kvrouter.routing.queue import QueueConfig, RouterQueue
from kvrouter.routing.scheduler import KvScheduler, ScheduleRequest

BLOCK = 4


def _scheduler(num_workers: int = 2, policy: str = "round_robin") -> KvScheduler:
    clock = ManualClock()
    sched = KvScheduler(
        KvIndexer(block_size=BLOCK, clock=clock), policy=policy, block_size=BLOCK, clock=clock
    )
    for worker in range(num_workers):
        sched.add_worker(worker)
    return sched


def _req(request_id: str, tokens: list[int]) -> ScheduleRequest:
    return ScheduleRequest(request_id, token_ids=tokens)


def _routed(out: list[tuple[str, Decision | Exception]]) -> list[str]:
    assert all(isinstance(outcome, Decision) for _, outcome in out), out
    return [item for item, _ in out]


def test_requests_go_at_once_while_a_worker_has_room() -> None:
    sched = _scheduler(2)
    queue: RouterQueue[str] = RouterQueue(sched, QueueConfig(threshold_tokens=8))
    queue.submit(_req("a", list(range(8))), "a")
    queue.submit(_req("b", list(range(100, 108))), "b")
    assert _routed(queue.dispatch()) == ["a", "b"]  # one each: the second was still empty
    queue.submit(_req("c", list(range(200, 208))), "c")
    assert queue.dispatch() == []  # both workers now prefill 8 tokens: saturated
    assert len(queue) == 1 and "c" in queue
    assert queue.stats().num_queued == 1


def test_first_tokens_and_finishes_let_waiting_requests_go() -> None:
    sched = _scheduler(1)
    queue: RouterQueue[str] = RouterQueue(sched, QueueConfig(threshold_tokens=4))
    for name in "abc":
        queue.submit(_req(name, [ord(name)] * 8), name)
    assert _routed(queue.dispatch()) == ["a"]
    assert queue.dispatch() == []
    sched.on_first_token("a")  # its prefill is done: room for one more
    assert _routed(queue.dispatch()) == ["b"]
    sched.on_finish("b")  # finishing frees its prefill tokens too
    assert _routed(queue.dispatch()) == ["c"]
    stats = queue.stats()
    assert (stats.pending, stats.num_dispatched, stats.num_queued) == (0, 3, 2)
    assert stats.max_pending_seen == 2


def test_an_expired_booking_frees_its_room_without_any_event() -> None:
    clock = ManualClock()
    sched = KvScheduler(
        None, policy="round_robin", block_size=BLOCK, clock=clock, request_expiry_s=30.0
    )
    sched.add_worker(0)
    queue: RouterQueue[str] = RouterQueue(sched, QueueConfig(threshold_tokens=4))
    queue.submit(_req("lost", [1] * 8), "lost")  # its first token never arrives
    queue.submit(_req("b", [2] * 8), "b")
    assert _routed(queue.dispatch()) == ["lost"]
    clock.advance(29.0)
    assert queue.dispatch() == []  # still booked
    clock.advance(2.0)
    assert _routed(queue.dispatch()) == ["b"]  # "lost" expired: its prefill is gone
    assert sched.active.prefill_tokens(sched.workers[0]) == 8


def test_fcfs_keeps_arrival_order_and_wspt_takes_the_least_uncached_work_first() -> None:
    def order(policy: str) -> list[str]:
        sched = _scheduler(1)
        # A cached 16-token prefix: "warm" (20 tokens, 16 cached) is less work than
        # "short" (12 tokens, none cached), which is less than "long" (40).
        sched.schedule(_req("seed", list(range(16))))
        queue: RouterQueue[str] = RouterQueue(
            sched,
            QueueConfig(threshold_tokens=1, policy=policy),  # type: ignore[arg-type]
        )
        queue.submit(_req("long", list(range(1000, 1040))), "long")
        queue.submit(_req("short", list(range(2000, 2012))), "short")
        queue.submit(_req("warm", [*range(16), 7, 7, 7, 7]), "warm")
        assert queue.dispatch() == []  # "seed" still prefills: saturated
        routed = []
        sched.on_finish("seed")
        while len(queue):
            out = _routed(queue.dispatch())
            assert len(out) == 1  # threshold 1: one at a time
            routed += out
            sched.on_finish(out[0])
        return routed

    assert order("fcfs") == ["long", "short", "warm"]
    assert order("wspt") == ["warm", "short", "long"]


def test_cancelled_requests_never_go() -> None:
    sched = _scheduler(1)
    queue: RouterQueue[str] = RouterQueue(sched, QueueConfig(threshold_tokens=4))
    for name in "abc":
        queue.submit(_req(name, [ord(name)] * 8), name)
    assert _routed(queue.dispatch()) == ["a"]
    assert queue.cancel("b") == "b"
    assert queue.cancel("b") is None  # gone already
    assert queue.cancel("a") is None  # routed, not waiting
    sched.on_finish("a")
    assert _routed(queue.dispatch()) == ["c"]
    assert queue.stats().num_cancelled == 1


def test_a_full_queue_refuses_with_all_workers_busy() -> None:
    sched = _scheduler(1)
    queue: RouterQueue[str] = RouterQueue(sched, QueueConfig(threshold_tokens=4, max_pending=1))
    queue.submit(_req("a", [1] * 8), "a")
    queue.dispatch()
    queue.submit(_req("b", [2] * 8), "b")
    with pytest.raises(AllWorkersBusy, match="1 requests are already waiting"):
        queue.submit(_req("c", [3] * 8), "c")
    assert queue.stats().num_refused == 1
    with pytest.raises(InvalidRequest, match="already queued"):
        queue.submit(_req("b", [2] * 8), "b")


def test_routing_errors_reach_the_caller_and_the_queue_goes_on() -> None:
    sched = _scheduler(0)
    queue: RouterQueue[str] = RouterQueue(sched, QueueConfig(threshold_tokens=4))
    queue.submit(_req("a", [1] * 8), "a")
    out = queue.dispatch()
    assert [item for item, _ in out] == ["a"]
    assert isinstance(out[0][1], NoWorkerAvailable)
    assert len(queue) == 0


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="threshold_tokens"):
        QueueConfig(threshold_tokens=0)
    with pytest.raises(ValueError, match="unknown queue policy 'lifo'"):
        QueueConfig(threshold_tokens=1, policy="lifo")  # type: ignore[arg-type]


# A model of the queue: a list in order; the scheduler's prefill tokens are the truth.
_ops = st.lists(
    st.tuples(st.sampled_from(["submit", "first", "finish", "cancel"]), st.integers(0, 30)),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, threshold=st.integers(1, 40), policy=st.sampled_from(["fcfs", "wspt"]))
def test_queue_against_a_model(ops: list[tuple[str, int]], threshold: int, policy: str) -> None:
    """Every request goes at most once; nothing goes while every worker is saturated;
    after a dispatch, requests wait only if every worker is; fcfs keeps arrival order."""
    sched = _scheduler(3)
    queue: RouterQueue[int] = RouterQueue(
        sched,
        QueueConfig(threshold_tokens=threshold, policy=policy),  # type: ignore[arg-type]
    )
    waiting: list[int] = []  # the model: submitted, not routed, not cancelled
    routed: list[int] = []
    in_flight: set[int] = set()
    next_id = 0
    for op, arg in ops:
        if op == "submit":
            tokens = [next_id % 5] * (4 + arg)  # some prompts share their first block
            queue.submit(_req(str(next_id), tokens), next_id)
            waiting.append(next_id)
            next_id += 1
        elif op in ("first", "finish") and in_flight:
            victim = sorted(in_flight)[arg % len(in_flight)]
            if op == "first":
                sched.on_first_token(str(victim))
            else:
                sched.on_finish(str(victim))
                in_flight.discard(victim)
        elif op == "cancel" and waiting:
            victim = waiting[arg % len(waiting)]
            assert queue.cancel(str(victim)) == victim
            waiting.remove(victim)
        saturated_before = sched.min_prefill_tokens() >= threshold
        out = queue.dispatch()
        if saturated_before:
            assert out == []
        for item, outcome in out:
            assert isinstance(outcome, Decision)
            assert item in waiting and item not in routed
            waiting.remove(item)
            routed.append(item)
            in_flight.add(item)
        assert len(queue) == len(waiting)
        if waiting:
            assert sched.min_prefill_tokens() >= threshold
    if policy == "fcfs":
        assert routed == sorted(routed)
