"""KvScheduler: candidates, busy thresholds, booking, predicted entries, stats."""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from typing import Any

import pytest

from kvrouter.clock import ManualClock
from kvrouter.errors import AllWorkersBusy, InvalidRequest, NoWorkerAvailable
from kvrouter.events.model import RouterEvent, Stored, StoredBlock, WorkerKey
from kvrouter.hashing import hash_request
from kvrouter.index import KvIndexer
from kvrouter.load.aggregator import KvMetricsAggregator
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.routing.policies import RoutingOverrides
from kvrouter.routing.scheduler import BusyThresholds, KvScheduler, ScheduleRequest

BS = 16
WORKERS = [WorkerKey(i) for i in range(4)]


def _scheduler(**kw: Any) -> tuple[KvScheduler, KvIndexer, ManualClock]:
    clock = ManualClock()
    indexer = KvIndexer(block_size=BS, clock=clock)
    sched = KvScheduler(indexer, block_size=BS, clock=clock, rng=random.Random(0), **kw)
    for worker in WORKERS:
        sched.add_worker(worker, total_blocks=1000)
    return sched, indexer, clock


def _prompt(prefix_blocks: int, suffix_id: int, suffix_blocks: int = 1) -> list[int]:
    prefix = list(range(prefix_blocks * BS))
    suffix = [100_000 + suffix_id * 1000 + i for i in range(suffix_blocks * BS)]
    return prefix + suffix


def _store(indexer: KvIndexer, worker: WorkerKey, tokens: list[int], event_id: int = 0) -> None:
    local, _ = hash_request(tokens, BS)
    blocks = tuple(StoredBlock(engine_hash=10_000 + i, local_hash=h) for i, h in enumerate(local))
    event = RouterEvent(worker.worker_id, worker.dp_rank, event_id, Stored(None, blocks))
    assert indexer.apply_event(event)


def test_burst_with_one_new_prefix_sticks_to_one_worker() -> None:
    sched, indexer, _ = _scheduler()
    chosen = []
    for i in range(8):
        decision = sched.schedule(ScheduleRequest(f"r{i}", token_ids=_prompt(16, i)))
        chosen.append(decision.worker)
        # the first token arrives; no KV event has reached the router yet
        sched.on_first_token(f"r{i}")
    assert len(set(chosen)) == 1
    # request k (k >= 1): 16 predicted blocks, 1 uncached; 16 shared active blocks
    # cost = 16/16 + (16 + k) + 1 = 18 + k  vs an idle worker: 17 + 17 = 34
    last = sched.recent_decisions()[-1]
    assert [c.score for c in last.candidates if c.selected] == [25.0]
    assert sorted(c.score for c in last.candidates if not c.selected) == [34.0, 34.0, 34.0]
    assert indexer.stats().num_predicted == 16 + 8


def test_without_predicted_entries_the_burst_spreads() -> None:
    sched, _, _ = _scheduler(predict_cache=False)
    chosen = []
    for i in range(4):
        chosen.append(sched.schedule(ScheduleRequest(f"r{i}", token_ids=_prompt(16, i))).worker)
        sched.on_first_token(f"r{i}")
    assert sorted(chosen) == WORKERS


def test_copies_still_prefilling_spread() -> None:
    # While the first request still prefills, its queued tokens count against its worker
    # (cost 2*17 + 2 vs 34 elsewhere), so simultaneous copies go to idle workers.
    sched, _, _ = _scheduler()
    chosen = [
        sched.schedule(ScheduleRequest(f"r{i}", token_ids=_prompt(16, i))).worker for i in range(4)
    ]
    assert sorted(chosen) == WORKERS


def test_popular_prefix_under_heavy_load_spills() -> None:
    sched, indexer, _ = _scheduler()
    hot = WorkerKey(2)
    _store(indexer, hot, _prompt(16, 0))
    # light load: the cache wins
    d = sched.schedule(ScheduleRequest("light", token_ids=_prompt(16, 1)))
    assert d.worker == hot
    assert d.overlap_blocks == 16
    sched.on_finish("light")
    # heavy load on the hot worker: 10 decoding requests of 64 unrelated blocks each
    for i in range(10):
        sched.schedule(ScheduleRequest(f"bg{i}", token_ids=_prompt(0, 50 + i, 64), worker=hot))
        sched.on_first_token(f"bg{i}")
    d = sched.schedule(ScheduleRequest("heavy", token_ids=_prompt(16, 2)))
    assert d.worker != hot
    costs = {c.worker: c.score for c in d.candidates}
    # hot: 1 prefill + (640 + 17) decode; idle: 17 + 17
    assert costs[hot] == 658.0
    assert costs[d.worker] == 34.0


def test_busy_thresholds_and_all_busy() -> None:
    clock = ManualClock()
    agg = KvMetricsAggregator(clock=clock, stale_after_s=5.0)
    busy = BusyThresholds(max_kv_usage=0.9, max_prefill_tokens=100, retry_after_s=2.5)
    sched = KvScheduler(
        KvIndexer(block_size=BS, clock=clock), agg, block_size=BS, clock=clock, busy=busy
    )
    sched.add_worker(WorkerKey(0))
    sched.add_worker(WorkerKey(1))
    agg.update(ForwardPassMetrics(worker_id=0, gpu_cache_usage_perc=0.95))
    agg.update(ForwardPassMetrics(worker_id=1, gpu_cache_usage_perc=0.5))
    d = sched.schedule(ScheduleRequest("a", token_ids=list(range(96))))
    assert d.worker == WorkerKey(1)  # worker 0 is over the KV threshold
    d = sched.schedule(ScheduleRequest("b", token_ids=list(range(1000, 1016))))
    assert d.worker == WorkerKey(1)  # 96 + 16 = 112 queued prefill tokens > 100 now
    with pytest.raises(AllWorkersBusy, match="kv usage 95% > 90%") as info:
        sched.schedule(ScheduleRequest("c", token_ids=list(range(2000, 2016))))
    assert info.value.retry_after_s == 2.5
    assert "prefill tokens 112 > 100" in str(info.value)
    assert sched.stats().num_busy_rejects == 1
    assert "c" not in sched.active
    sched.on_first_token("a")  # worker 1 drains below the threshold
    assert sched.schedule(ScheduleRequest("c", token_ids=list(range(16)))).worker == WorkerKey(1)
    # a direct request to a busy worker is refused too
    with pytest.raises(AllWorkersBusy):
        sched.schedule(ScheduleRequest("d", token_ids=list(range(16)), worker=0))


def test_waiting_threshold_ignores_stale_metrics() -> None:
    clock = ManualClock()
    agg = KvMetricsAggregator(clock=clock, stale_after_s=5.0)
    sched = KvScheduler(
        None, agg, block_size=BS, clock=clock, busy=BusyThresholds(max_waiting_requests=3)
    )
    sched.add_worker(WorkerKey(0))
    agg.update(ForwardPassMetrics(worker_id=0, num_requests_waiting=9))
    with pytest.raises(AllWorkersBusy, match="waiting requests 9 > 3"):
        sched.schedule(ScheduleRequest("a", token_ids=list(range(16))))
    clock.advance(6.0)
    assert sched.schedule(ScheduleRequest("a", token_ids=list(range(16)))).worker == WorkerKey(0)


def test_no_workers() -> None:
    sched = KvScheduler(None, block_size=BS, clock=ManualClock())
    with pytest.raises(NoWorkerAvailable) as info:
        sched.schedule(ScheduleRequest("a", token_ids=[1, 2, 3]))
    assert type(info.value) is NoWorkerAvailable
    assert sched.stats().num_no_worker == 1


def test_short_prompts_are_routed_by_load_and_counted() -> None:
    sched, indexer, _ = _scheduler()
    sched.schedule(ScheduleRequest("big", token_ids=_prompt(4, 0), worker=WorkerKey(0)))
    d = sched.schedule(ScheduleRequest("short", token_ids=[5, 6, 7]))
    assert d.worker != WorkerKey(0)
    assert (d.num_blocks, d.overlap_blocks) == (0, 0)
    stats = sched.stats()
    assert stats.num_short_prompts == 1
    assert indexer.stats().num_predicted == 5  # only the long prompt's blocks
    assert sched.active.load(d.worker).active_blocks == 1  # its partial block


def test_direct_and_per_request_policy() -> None:
    sched, _, _ = _scheduler()
    d = sched.schedule(ScheduleRequest("a", token_ids=_prompt(2, 0), worker=3))
    assert (d.worker, d.policy) == (WorkerKey(3), "direct")
    with pytest.raises(InvalidRequest, match="unknown worker"):
        sched.schedule(ScheduleRequest("b", token_ids=_prompt(2, 0), worker=WorkerKey(9)))
    rr = [
        sched.schedule(ScheduleRequest(f"rr{i}", token_ids=[1], policy="round_robin")).worker
        for i in range(5)
    ]
    assert rr == [*WORKERS, WORKERS[0]]
    assert sched.stats().decisions_by_policy == {"direct": 1, "round_robin": 5}


def test_overrides_change_the_decision() -> None:
    sched, indexer, _ = _scheduler()
    _store(indexer, WorkerKey(1), _prompt(4, 0))
    for i in range(3):  # 3 * 5 = 15 decoding blocks on worker 1
        sched.schedule(ScheduleRequest(f"bg{i}", token_ids=_prompt(0, 10 + i, 5), worker=1))
        sched.on_first_token(f"bg{i}")
    tokens = _prompt(4, 1)
    # worker 1: 1 + 15 + 5 = 21; idle: 5 + 5 = 10
    assert sched.schedule(ScheduleRequest("x", token_ids=tokens)).worker != WorkerKey(1)
    # prefill weighed 4x: worker 1: 4 + 20 = 24; idle: 20 + 5 = 25
    heavy = RoutingOverrides(overlap_weight=4.0)
    d = sched.schedule(ScheduleRequest("y", token_ids=tokens, overrides=heavy))
    assert d.worker == WorkerKey(1)


def test_hashes_given_by_the_caller() -> None:
    sched, indexer, _ = _scheduler()
    tokens = _prompt(3, 0)
    _store(indexer, WorkerKey(2), tokens)
    local, seq = hash_request(tokens, BS)
    d = sched.schedule(ScheduleRequest("a", local_hashes=local, num_tokens=len(tokens)))
    assert (d.worker, d.overlap_blocks) == (WorkerKey(2), 4)
    d = sched.schedule(ScheduleRequest("b", local_hashes=local, seq_hashes=seq))
    assert d.num_blocks == 4
    with pytest.raises(InvalidRequest, match="differ in length"):
        sched.schedule(ScheduleRequest("c", local_hashes=local, seq_hashes=seq[:2]))
    with pytest.raises(InvalidRequest, match="token_ids or local_hashes"):
        sched.schedule(ScheduleRequest("c"))
    # a salt changes the hashes: no overlap
    d = sched.schedule(ScheduleRequest("d", token_ids=tokens, salt="tenant-a"))
    assert d.overlap_blocks == 0


def test_lifecycle_is_idempotent_and_returns_to_zero() -> None:
    sched, _, _ = _scheduler()
    for i in range(20):
        sched.schedule(ScheduleRequest(f"r{i}", token_ids=_prompt(i % 3, i)))
    with pytest.raises(InvalidRequest, match="already scheduled"):
        sched.schedule(ScheduleRequest("r0", token_ids=[1]))
    for i in range(20):
        assert sched.on_first_token(f"r{i}")
        assert not sched.on_first_token(f"r{i}")
    for i in range(20):
        assert sched.on_finish(f"r{i}")
        assert not sched.on_finish(f"r{i}")
    assert not sched.on_finish("never-seen")
    stats = sched.stats()
    assert (stats.num_first_tokens, stats.num_finished) == (20, 20)
    active = stats.active
    assert (active.num_requests, active.num_prefill_tokens, active.num_active_blocks) == (0, 0, 0)
    assert all(sched.active.load(w).num_requests == 0 for w in WORKERS)


def test_request_expiry_frees_lost_completions() -> None:
    sched, _, clock = _scheduler(request_expiry_s=60.0)
    sched.schedule(ScheduleRequest("lost", token_ids=_prompt(2, 0)))
    clock.advance(61.0)
    sched.schedule(ScheduleRequest("next", token_ids=_prompt(2, 1)))
    assert "lost" not in sched.active
    assert sched.stats().active.num_expired == 1


def test_remove_worker_everywhere() -> None:
    clock = ManualClock()
    indexer = KvIndexer(block_size=BS, clock=clock)
    agg = KvMetricsAggregator(clock=clock)
    sched = KvScheduler(indexer, agg, block_size=BS, clock=clock)
    sched.add_worker(WorkerKey(0))
    sched.add_worker(WorkerKey(1))
    agg.update(ForwardPassMetrics(worker_id=1))
    _store(indexer, WorkerKey(1), _prompt(2, 0))
    sched.schedule(ScheduleRequest("a", token_ids=_prompt(2, 0)))
    assert sched.active.worker_of("a") == WorkerKey(1)
    assert sched.remove_worker(1) == 1
    assert sched.workers == (WorkerKey(0),)
    assert "a" not in sched.active
    assert indexer.find_matches(hash_request(_prompt(2, 0), BS)[0]).scores == {}
    assert agg.get_metrics().endpoints == ()
    assert sched.schedule(ScheduleRequest("b", token_ids=_prompt(2, 0))).worker == WorkerKey(0)


def test_stats_histograms_and_latency() -> None:
    clock = ManualClock()
    ticks = iter([0.0, 0.0002, 1.0, 1.003, 2.0, 2.0002])  # 200 us, 3 ms, 200 us

    def timer() -> float:
        return next(ticks)

    indexer = KvIndexer(block_size=BS, clock=clock)
    sched = KvScheduler(indexer, block_size=BS, clock=clock, timer=timer)
    sched.add_worker(WorkerKey(0))
    sched.schedule(ScheduleRequest("a", token_ids=_prompt(3, 0)))  # 4 blocks, no overlap
    sched.schedule(ScheduleRequest("b", token_ids=_prompt(3, 1)))  # 3 of 4 predicted
    sched.schedule(ScheduleRequest("c", token_ids=_prompt(3, 0)))  # 4 of 4: a full hit
    stats = sched.stats()
    assert stats.num_decisions == 3
    assert stats.decisions_by_worker == {WorkerKey(0): 3}
    assert (stats.overlap_blocks_total, stats.prompt_blocks_total) == (7, 12)
    hist = stats.overlap_ratio
    assert hist.count == 3
    assert hist.cumulative()[0] == (0.0, 1)  # ratio 0
    assert hist.cumulative()[4] == (0.75, 2)  # ratio 0.75
    assert hist.cumulative()[6:8] == [(0.99, 2), (1.0, 3)]  # full hits have a bucket
    lat = stats.decision_latency_s
    assert lat.count == 3
    assert lat.total == pytest.approx(0.0034)
    assert lat.quantile(0.5) == 250e-6
    assert lat.quantile(0.99) == 5e-3


def test_explain_sampler_logs_one_in_n(caplog: pytest.LogCaptureFixture) -> None:
    sched, _, _ = _scheduler(explain_every=2)
    with caplog.at_level(logging.INFO, logger="kvrouter.routing.scheduler"):
        for i in range(4):
            sched.schedule(ScheduleRequest(f"r{i}", token_ids=_prompt(1, i)))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("routing decision request=r1 policy=kv worker=")
    assert "(Selected)" in lines[0]
    assert len(sched.recent_decisions()) == 4


def test_preview_books_nothing() -> None:
    sched, indexer, _ = _scheduler()
    d = sched.preview(ScheduleRequest("p", token_ids=_prompt(4, 0)))
    assert d.worker in WORKERS
    assert "p" not in sched.active
    assert sched.stats().num_decisions == 0
    assert indexer.stats().num_predicted == 0


def test_views_follow_load_metrics_and_worker_changes() -> None:
    clock = ManualClock()
    agg = KvMetricsAggregator(clock=clock)
    sched = KvScheduler(None, agg, policy="least_loaded", block_size=BS, clock=clock)
    sched.add_worker(WorkerKey(0), total_blocks=100)
    sched.add_worker(WorkerKey(1), total_blocks=100)
    sched.schedule(ScheduleRequest("a", token_ids=list(range(160)), worker=0))  # 10% on 0
    assert sched.schedule(ScheduleRequest("b", token_ids=[1])).worker == WorkerKey(1)
    agg.update(ForwardPassMetrics(worker_id=1, gpu_cache_usage_perc=0.5))  # seen at once
    assert sched.schedule(ScheduleRequest("c", token_ids=[1])).worker == WorkerKey(0)
    sched.on_finish("a")
    sched.on_finish("c")
    sched.add_worker(WorkerKey(2), total_blocks=100)
    sched.schedule(ScheduleRequest("d", token_ids=list(range(320)), worker=2))  # 20% on 2
    agg.update(ForwardPassMetrics(worker_id=1, gpu_cache_usage_perc=0.0))
    # worker 1 holds "b": one partial block; re-registering it with 4 blocks makes that 25%
    sched.add_worker(WorkerKey(1), total_blocks=4)
    assert sched.schedule(ScheduleRequest("e", token_ids=[1])).worker == WorkerKey(0)
    sched.remove_worker(0)
    assert sched.schedule(ScheduleRequest("f", token_ids=[1])).worker == WorkerKey(2)


def test_event_workers_predict_only_new_blocks() -> None:
    sched, indexer, _ = _scheduler()
    _store(indexer, WORKERS[2], _prompt(4, 0, 0))
    decision = sched.schedule(ScheduleRequest("a", token_ids=_prompt(4, 1, 2)))
    assert decision.worker == WORKERS[2]
    # The 4 blocks held from events are known; only the 2 new ones are predicted.
    assert indexer.stats().num_predicted == 2
    assert indexer.find_matches_sequence(hash_request(_prompt(4, 1, 2), BS)[1]).scores == {
        WORKERS[2]: 6
    }


def test_approximate_workers_predict_and_refresh_every_block() -> None:
    sched, indexer, clock = _scheduler(predicted_ttl_s=10.0)
    for worker in WORKERS:
        sched.add_worker(worker, total_blocks=1000, publishes_events=False)
    prompt = _prompt(4, 1, 2)
    first = sched.schedule(ScheduleRequest("a", token_ids=prompt)).worker
    sched.on_finish("a")
    assert indexer.stats().num_predicted == 6
    clock.advance(8.0)
    assert sched.schedule(ScheduleRequest("b", token_ids=prompt)).worker == first
    sched.on_finish("b")
    clock.advance(8.0)  # 16 s after the first booking, 8 s after the refresh
    seq = hash_request(prompt, BS)[1]
    assert indexer.find_matches_sequence(seq).scores == {first: 6}


def test_a_failed_request_withdraws_its_predictions_a_finished_one_keeps_them() -> None:
    sched, indexer, _ = _scheduler()
    ok, failed = _prompt(8, 1), _prompt(8, 2, suffix_blocks=4)
    sched.schedule(ScheduleRequest("ok", token_ids=ok, worker=WORKERS[2]))
    sched.schedule(ScheduleRequest("failed", token_ids=failed, worker=WORKERS[3]))
    assert indexer.find_matches(hash_request(failed, BS)[0]).scores[WORKERS[3]] == 12
    assert sched.on_finish("ok")
    assert sched.on_finish("failed", failed=True)
    scores = indexer.find_matches(hash_request(failed, BS)[0]).scores
    assert WORKERS[3] not in scores  # withdrawn: the worker never computed them
    assert scores[WORKERS[2]] == 8  # the shared prefix, predicted by the finished one
    assert indexer.stats().predicted_withdrawn == 12
    assert not sched.on_finish("failed", failed=True)  # idempotent


def test_bookings_of_requests_that_expired_without_finishing_are_let_go() -> None:
    sched, _, clock = _scheduler(request_expiry_s=10.0)
    for i in range(1100):
        sched.schedule(ScheduleRequest(f"lost{i}", token_ids=_prompt(1, i)))
    clock.advance(11.0)
    for i in range(1100):  # the lost ones expire; their bookings must not pile up
        sched.schedule(ScheduleRequest(f"new{i}", token_ids=_prompt(1, 5000 + i)))
        sched.on_finish(f"new{i}")
    assert len(sched._predictions) <= 1024 + 2


def test_approximate_mode_keeps_no_more_predictions_than_the_worker_holds() -> None:
    clock = ManualClock()
    indexer = KvIndexer(block_size=BS, clock=clock)
    sched = KvScheduler(indexer, block_size=BS, clock=clock, rng=random.Random(0))
    sched.add_worker(WORKERS[0], total_blocks=4, publishes_events=False)
    sched.add_worker(WORKERS[1], total_blocks=4)  # publishes events: no cap on predictions
    for i in range(3):
        for worker in WORKERS[:2]:
            request = ScheduleRequest(f"r{i}-{worker.worker_id}", token_ids=_prompt(2, i))
            sched.schedule(replace(request, worker=worker))
        clock.advance(2.0)
    assert len(indexer._workers[WORKERS[0]].predicted) == 4  # capacity: the newest 4
    assert len(indexer._workers[WORKERS[1]].predicted) == 5  # 2 shared + 3 suffixes: over 4
    newest = hash_request(_prompt(2, 2), BS)[0]
    assert indexer.find_matches(newest).scores[WORKERS[0]] == 3


def test_n_sequences_book_n_prefills_and_n_tails() -> None:
    # The engine starts the n sequences together: each prefills the uncached prompt
    # (none of it is cached yet) and holds its own partial tail block.
    sched, _, _ = _scheduler()
    tokens = _prompt(2, 1)[:-5]  # 2 full blocks and a partial third
    sched.schedule(ScheduleRequest("one", token_ids=tokens, worker=WORKERS[0]))
    sched.schedule(ScheduleRequest("four", token_ids=tokens, worker=WORKERS[1], num_sequences=4))
    one, four = sched.active.load(WORKERS[0]), sched.active.load(WORKERS[1])
    assert (one.prefill_tokens, one.active_blocks) == (len(tokens), 3)
    assert (four.prefill_tokens, four.active_blocks) == (4 * len(tokens), 2 + 4)
    assert sched.on_finish("four")
    assert sched.active.load(WORKERS[1]).active_blocks == 0
