"""KvMetricsAggregator: pushed and scraped metrics, staleness, load."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvrouter.clock import ManualClock
from kvrouter.events.model import WorkerKey
from kvrouter.load.aggregator import EndpointMetrics, KvMetricsAggregator
from kvrouter.load.metrics import ForwardPassMetrics


def _vllm_page(queries: float, hits: float, usage: float = 0.5) -> str:
    return (
        'vllm:num_requests_running{engine="0"} 3\n'
        'vllm:num_requests_waiting{engine="0"} 2\n'
        f'vllm:kv_cache_usage_perc{{engine="0"}} {usage}\n'
        f'vllm:prefix_cache_queries_total{{engine="0"}} {queries}\n'
        f'vllm:prefix_cache_hits_total{{engine="0"}} {hits}\n'
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="1000"} 1.0\n'
    )


def _push(worker_id: int, usage: float, dp_rank: int = 0, **kw: int) -> ForwardPassMetrics:
    return ForwardPassMetrics(
        worker_id=worker_id, gpu_cache_usage_perc=usage, data_parallel_rank=dp_rank, **kw
    )


def test_pushed_metrics_become_an_endpoint() -> None:
    clock = ManualClock(100.0)
    agg = KvMetricsAggregator(clock=clock, stale_after_s=5.0)
    agg.update(
        ForwardPassMetrics(
            worker_id=3,
            request_active_slots=4,
            request_total_slots=256,
            num_requests_waiting=1,
            kv_active_blocks=100,
            kv_total_blocks=400,
            gpu_cache_usage_perc=0.25,
            gpu_prefix_cache_hit_rate=0.5,
            data_parallel_rank=1,
        )
    )
    clock.advance(2.0)
    assert agg.get_metrics().endpoints == (
        EndpointMetrics(
            worker_id=3,
            dp_rank=1,
            request_active_slots=4,
            request_total_slots=256,
            num_requests_waiting=1,
            kv_active_blocks=100,
            kv_total_blocks=400,
            gpu_cache_usage_perc=0.25,
            gpu_prefix_cache_hit_rate=0.5,
            age_s=2.0,
            stale=False,
            source="push",
        ),
    )
    assert agg.get_endpoint(WorkerKey(3, 1)) is not None
    assert agg.get_endpoint(WorkerKey(3, 0)) is None


def test_usage_from_block_counts_when_fraction_missing() -> None:
    agg = KvMetricsAggregator(clock=ManualClock())
    agg.update(ForwardPassMetrics(worker_id=1, kv_active_blocks=30, kv_total_blocks=120))
    assert agg.get_worker_load(1) == 0.25


def test_staleness_marks_and_distrusts() -> None:
    clock = ManualClock()
    agg = KvMetricsAggregator(clock=clock, stale_after_s=5.0)
    agg.update(_push(1, 0.1))  # will go stale while looking idle
    clock.advance(4.0)
    agg.update(_push(2, 0.6))
    agg.update(_push(3, 0.8))
    metrics = agg.get_metrics()
    assert [e.stale for e in metrics.endpoints] == [False, False, False]
    assert metrics.load_avg == pytest.approx(0.5)
    clock.advance(1.5)  # worker 1 is now 5.5 s old
    metrics = agg.get_metrics()
    assert [(e.worker_id, e.stale) for e in metrics.endpoints] == [
        (1, True),
        (2, False),
        (3, False),
    ]
    assert metrics.endpoints[0].age_s == 5.5
    # load_avg / load_std over fresh endpoints only
    assert metrics.load_avg == pytest.approx(0.7)
    assert metrics.load_std == pytest.approx(0.1)
    # the stale idle worker counts as at least average, not as idle
    assert metrics.get_worker_load(1) == pytest.approx(0.7)
    assert agg.get_worker_load(2) == pytest.approx(0.6)
    # unknown worker: average
    assert metrics.get_worker_load(99) == pytest.approx(0.7)
    stats = agg.stats()
    assert (stats.num_endpoints, stats.num_stale, stats.num_pushed) == (3, 1, 3)
    # a fresh report makes it trusted again
    agg.update(_push(1, 0.1))
    assert agg.get_worker_load(1) == pytest.approx(0.1)


def test_a_stale_busy_worker_keeps_its_own_higher_load() -> None:
    clock = ManualClock()
    agg = KvMetricsAggregator(clock=clock, stale_after_s=1.0)
    agg.update(_push(1, 0.9))
    clock.advance(2.0)
    agg.update(_push(2, 0.2))
    assert agg.get_worker_load(1) == pytest.approx(0.9)


def test_worker_load_averages_data_parallel_ranks() -> None:
    agg = KvMetricsAggregator(clock=ManualClock())
    agg.update(_push(7, 0.2, dp_rank=0))
    agg.update(_push(7, 0.4, dp_rank=1))
    assert agg.get_worker_load(7) == pytest.approx(0.3)
    assert agg.get_worker_load(7, dp_rank=1) == pytest.approx(0.4)
    assert agg.remove_worker(7, dp_rank=0) == 1
    assert [e.worker for e in agg.get_metrics().endpoints] == [WorkerKey(7, 1)]
    assert agg.remove_worker(7) == 1
    assert agg.get_metrics().endpoints == ()
    assert agg.get_metrics().load_avg == 0.0


def test_source_listener_is_registered() -> None:
    callbacks: list[Callable[[ForwardPassMetrics], None]] = []

    class Source:
        def add_listener(self, callback: Callable[[ForwardPassMetrics], None]) -> None:
            callbacks.append(callback)

    agg = KvMetricsAggregator(Source(), clock=ManualClock())
    assert len(callbacks) == 1
    callbacks[0](_push(5, 0.75))
    assert agg.get_worker_load(5) == 0.75


def test_vllm_scrapes_hit_rate_from_counter_deltas() -> None:
    clock = ManualClock()
    agg = KvMetricsAggregator(clock=clock)
    assert agg.update_from_prometheus(4, _vllm_page(12000, 3000))
    ep = agg.get_metrics().endpoints[0]
    assert ep.source == "prometheus:vllm"
    assert (ep.request_active_slots, ep.num_requests_waiting) == (3, 2)
    assert (ep.kv_active_blocks, ep.kv_total_blocks, ep.gpu_cache_usage_perc) == (500, 1000, 0.5)
    assert ep.gpu_prefix_cache_hit_rate == 0.25  # first scrape: lifetime ratio
    agg.update_from_prometheus(4, _vllm_page(14000, 3800))
    assert agg.get_metrics().endpoints[0].gpu_prefix_cache_hit_rate == pytest.approx(0.4)
    agg.update_from_prometheus(4, _vllm_page(14000, 3800))  # no new queries: keep it
    assert agg.get_metrics().endpoints[0].gpu_prefix_cache_hit_rate == pytest.approx(0.4)
    agg.update_from_prometheus(4, _vllm_page(1000, 500))  # the engine restarted
    assert agg.get_metrics().endpoints[0].gpu_prefix_cache_hit_rate == pytest.approx(0.5)
    assert agg.stats().num_scrapes == 4


def test_push_then_scrape_keeps_total_slots() -> None:
    agg = KvMetricsAggregator(clock=ManualClock())
    agg.update(ForwardPassMetrics(worker_id=1, request_total_slots=256))
    agg.update_from_prometheus(1, _vllm_page(10, 5))
    assert agg.get_metrics().endpoints[0].request_total_slots == 256


def test_sglang_scrape() -> None:
    agg = KvMetricsAggregator(clock=ManualClock())
    text = (
        'sglang:num_running_reqs{tp_rank="0"} 5\n'
        'sglang:num_queue_reqs{tp_rank="0"} 1\n'
        'sglang:token_usage{tp_rank="0"} 0.28\n'
        'sglang:cache_hit_rate{tp_rank="0"} 0.61\n'
    )
    assert agg.update_from_prometheus(2, text, dp_rank=1)
    ep = agg.get_metrics().endpoints[0]
    assert (ep.worker_id, ep.dp_rank, ep.source) == (2, 1, "prometheus:sglang")
    assert (ep.request_active_slots, ep.num_requests_waiting) == (5, 1)
    assert (ep.gpu_cache_usage_perc, ep.gpu_prefix_cache_hit_rate) == (0.28, 0.61)


def test_bad_scrapes_are_counted() -> None:
    agg = KvMetricsAggregator(clock=ManualClock())
    assert not agg.update_from_prometheus(1, "garbage here please\nprocess_open_fds 9\n")
    assert agg.update_from_prometheus(1, "vllm:num_requests_running 2\n}{ bad\n")
    stats = agg.stats()
    assert (stats.num_scrapes, stats.num_unrecognised_scrapes, stats.num_malformed_lines) == (
        2,
        1,
        2,
    )
    assert stats.num_endpoints == 1


def test_stale_after_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stale_after_s"):
        KvMetricsAggregator(stale_after_s=0)
