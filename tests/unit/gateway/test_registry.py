"""Worker registry: ids, rotation, listeners."""

from __future__ import annotations

import pytest

from kvrouter.clock import ManualClock
from kvrouter.errors import ConfigError
from kvrouter.gateway.config import WorkerSpec
from kvrouter.gateway.registry import WorkerRegistry, WorkerState


def test_ids_are_assigned_or_taken_from_the_spec() -> None:
    reg = WorkerRegistry(ManualClock())
    assert reg.add(WorkerSpec("http://a:1")).worker_id == 0
    assert reg.add(WorkerSpec("http://b:1", worker_id=7)).worker_id == 7
    assert reg.add(WorkerSpec("http://c:1")).worker_id == 8
    with pytest.raises(ConfigError, match="already registered"):
        reg.add(WorkerSpec("http://d:1", worker_id=7))
    with pytest.raises(ConfigError, match="already registered"):
        reg.add(WorkerSpec("http://a:1"))


def test_failure_takes_a_worker_out_and_success_brings_it_back() -> None:
    clock = ManualClock()
    reg = WorkerRegistry(clock)
    events: list[tuple[str, int]] = []
    reg.add_listeners(
        on_down=lambda s: events.append(("down", s.worker_id)),
        on_up=lambda s: events.append(("up", s.worker_id)),
        on_removed=lambda s: events.append(("removed", s.worker_id)),
    )
    reg.add(WorkerSpec("http://a:1"))
    reg.add(WorkerSpec("http://b:1"))
    reg.mark_failed(0, "connection refused")
    assert [w.worker_id for w in reg.in_rotation()] == [1]
    reg.mark_failed(0, "connection refused")  # already out: no second "down"
    info = {i.worker_id: i for i in reg.infos()}[0]
    assert (info.healthy, info.consecutive_failures, info.num_failures) == (False, 2, 2)
    assert info.last_error == "connection refused"
    clock.advance(1.0)
    reg.mark_ok(0)
    assert [w.worker_id for w in reg.in_rotation()] == [0, 1]
    reg.remove(1)
    assert events == [("up", 0), ("up", 1), ("down", 0), ("up", 0), ("removed", 1)]
    with pytest.raises(KeyError):
        reg.remove(1)


def test_threshold_and_metrics_age() -> None:
    clock = ManualClock()
    reg = WorkerRegistry(clock, failure_threshold=2)
    state: WorkerState = reg.add(WorkerSpec("http://a:1", kv_events="tcp://a:5557"))
    reg.mark_failed(0, "timeout")
    assert state.healthy
    reg.mark_failed(0, "timeout")
    assert not state.healthy
    assert reg.infos()[0].metrics_age_s is None
    reg.mark_metrics(0)
    clock.advance(2.5)
    assert reg.infos()[0].metrics_age_s == 2.5
    assert reg.infos()[0].mode == "events"


def test_failed_answers_in_a_row_take_a_worker_out() -> None:
    reg = WorkerRegistry(ManualClock(), error_threshold=3)
    downs: list[int] = []
    reg.add_listeners(on_down=lambda s: downs.append(s.worker_id))
    state = reg.add(WorkerSpec("http://a:1"))
    reg.mark_error(0, "answered 500")
    reg.mark_error(0, "answered 500")
    state.consecutive_errors = 0  # a good answer between them: not in a row
    reg.mark_error(0, "answered 500")
    reg.mark_error(0, "answered 500")
    assert state.healthy
    reg.mark_error(0, "answered 503")
    assert (state.healthy, downs, state.num_failures) == (False, [0], 5)
    assert state.last_error == "answered 503"
    # A passing health check brings it back; its next failed answer takes it out again.
    reg.mark_ok(0)
    assert state.healthy
    reg.mark_error(0, "answered 500")
    assert (state.healthy, downs) == (False, [0, 0])
    with pytest.raises(ValueError, match="error_threshold"):
        WorkerRegistry(error_threshold=0)


def test_a_rank_is_named_when_its_server_has_several_or_it_is_not_rank_zero() -> None:
    reg = WorkerRegistry(ManualClock())
    a0 = reg.add(WorkerSpec("http://a:1", dp_rank=0))
    a1 = reg.add(WorkerSpec("http://a:1", dp_rank=1))
    b = reg.add(WorkerSpec("http://b:1"))
    c3 = reg.add(WorkerSpec("http://c:1", dp_rank=3))
    assert [reg.rank_to_name(s) for s in (a0, a1, b, c3)] == [0, 1, None, 3]
    reg.remove(a1.worker_id)
    assert reg.rank_to_name(a0) is None  # the server's only rank here now
