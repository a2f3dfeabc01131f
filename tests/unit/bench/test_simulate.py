"""The virtual-time simulator, run with the real router and engine code."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from kvrouter.bench.results import FIGURE_KEYS, RunResult, results_document
from kvrouter.bench.simulate import SimConfig, Simulation, simulate, simulate_many
from kvrouter.bench.workloads import (
    Arrivals,
    Request,
    Segment,
    apply_arrivals,
    load_mooncake_trace,
    multi_turn_requests,
    shared_prefix_requests,
)
from kvrouter.engine import EngineConfig
from kvrouter.routing.policies import PrefixAffinityPolicy

SMALL_ENGINE = EngineConfig(block_size=16, num_gpu_blocks=2048)


def _shared_prefix() -> list[Request]:
    requests = shared_prefix_requests(
        num_groups=6, prompts_per_group=10, system_prompt_len=512, question_len=32, output_len=8
    )
    return apply_arrivals(requests, Arrivals("poisson", rate=40.0, seed=1))


def test_every_request_completes_with_sane_figures() -> None:
    requests = _shared_prefix()
    result = simulate(requests, "kv", SimConfig(num_workers=3, engine=SMALL_ENGINE))
    figures = result.figures
    assert set(FIGURE_KEYS) <= set(figures)
    assert figures["completed"] == 60
    assert result.extra["errors"] == 0
    assert result.extra["decode_errors"] == 0
    assert result.extra["rejected_events"] == 0
    assert 0 < figures["ttft_p50_ms"] <= figures["ttft_p90_ms"] <= figures["ttft_p99_ms"]
    assert figures["itl_mean_ms"] > 0
    assert figures["e2e_mean_ms"] > figures["ttft_mean_ms"]
    assert 0 < figures["prefix_reuse"] < 1
    assert len(result.ttft_ms) == 60
    assert sum(w["requests"] for w in result.per_worker.values()) == 60
    assert set(result.series.active) == {"0", "1", "2"}
    assert all(len(v) == len(result.series.t_s) for v in result.series.active.values())


def test_kv_reuses_more_prefix_than_round_robin() -> None:
    requests = _shared_prefix()
    config = SimConfig(num_workers=4, engine=SMALL_ENGINE)
    kv = simulate(requests, "kv", config)
    rr = simulate(requests, "round_robin", config)
    assert kv.figures["completed"] == rr.figures["completed"] == 60
    assert kv.figures["prefix_reuse"] > rr.figures["prefix_reuse"]
    assert kv.figures["ttft_mean_ms"] < rr.figures["ttft_mean_ms"]


def test_seeded_runs_are_deterministic() -> None:
    requests = _shared_prefix()
    config = SimConfig(num_workers=3, engine=SMALL_ENGINE, seed=7)
    a = simulate(requests, "random", config)
    b = simulate(requests, "random", config)
    figures_a = {k: v for k, v in a.figures.items() if k != "wall_s"}
    figures_b = {k: v for k, v in b.figures.items() if k != "wall_s"}
    assert figures_a == figures_b
    assert a.per_worker == b.per_worker
    assert a.ttft_ms == b.ttft_ms


def test_closed_loop_keeps_concurrency() -> None:
    requests = [Request(f"r{i}", 0.0, (Segment(i, 64),), 4) for i in range(12)]
    config = SimConfig(num_workers=2, engine=SMALL_ENGINE, sample_interval_s=0.005)
    sim = Simulation("round_robin", config)
    result = sim.run(requests, Arrivals("concurrency", concurrency=3))
    assert result.figures["completed"] == 12
    totals = [sum(col) for col in zip(*result.series.active.values(), strict=True)]
    assert len(totals) > 3
    assert max(totals) == 3


def test_closed_loop_latency_counts_from_send_time() -> None:
    # One at a time on one worker: each request meets an idle engine, so every TTFT is
    # one unloaded prefill step, however long the requests before it waited.
    requests = [Request(f"r{i}", 0.0, (Segment(i, 64),), 4) for i in range(20)]
    config = SimConfig(num_workers=1, engine=SMALL_ENGINE)
    result = Simulation("round_robin", config).run(requests, Arrivals("concurrency"))
    assert result.figures["completed"] == 20
    assert max(result.ttft_ms) < 2 * min(result.ttft_ms)
    # One ~31 ms prefill and three ~20 ms decode steps (DESIGN 5 timing).
    assert result.figures["e2e_mean_ms"] < 120


def test_a_request_too_big_for_the_cache_is_an_error_not_a_hang() -> None:
    tiny = EngineConfig(block_size=16, num_gpu_blocks=4)
    requests = [
        Request("big", 0.0, (Segment(1, 200),), 4),
        Request("ok", 0.1, (Segment(2, 20),), 2),
    ]
    result = simulate(requests, "kv", SimConfig(num_workers=1, engine=tiny))
    assert result.figures["completed"] == 1
    assert result.extra["errors"] == 1


def test_results_document_shape() -> None:
    requests = _shared_prefix()[:10]
    run = simulate(requests, "kv", SimConfig(num_workers=2, engine=SMALL_ENGINE))
    doc = results_document({"kv": run}, reuse_limit=0.5, full=False)
    assert set(doc) == {"policies", "reuse_limit"}
    entry = doc["policies"]["kv"]
    assert set(FIGURE_KEYS) <= set(entry)
    assert "series" not in entry and "ttft_ms" not in entry
    full = results_document({"kv": run}, reuse_limit=0.5)["policies"]["kv"]
    assert len(full["ttft_ms"]) == 10


def test_shared_trace_slice(trace_path: Path) -> None:
    requests = load_mooncake_trace(trace_path, limit=60)
    config = SimConfig(num_workers=2)
    result = simulate(requests, "kv", config, Arrivals("trace", speedup=1.0))
    assert result.figures["completed"] == 60
    assert result.extra["errors"] == 0
    assert result.figures["prefix_reuse"] == pytest.approx(
        sum(w["cached_tokens"] for w in result.per_worker.values())
        / sum(r.input_length for r in requests)
    )


def _multi_turn() -> list[Request]:
    requests = multi_turn_requests(
        num_sessions=6, turns=4, system_prompt_len=256, user_len=48, output_len=40, seed=3
    )
    return apply_arrivals(requests, Arrivals("trace", speedup=4.0))


def _run_windowed(
    requests: list[Request], policy: str, max_decode_steps: int, **overrides: object
) -> tuple[RunResult, Simulation]:
    config = SimConfig(
        num_workers=2, engine=SMALL_ENGINE, max_decode_steps=max_decode_steps, **overrides
    )  # type: ignore[arg-type]
    sim = Simulation(policy, config)
    return sim.run(requests), sim


@pytest.mark.parametrize("policy", ["kv", "round_robin"])
def test_decode_windows_keep_every_time_exact(policy: str) -> None:
    requests = _multi_turn()
    single, single_sim = _run_windowed(requests, policy, 1)
    windowed, windowed_sim = _run_windowed(requests, policy, 256)
    assert windowed_sim.num_windows > 0 and single_sim.num_windows == 0
    assert windowed.figures["completed"] == single.figures["completed"] == len(requests)
    # Windows are committed lazily but their steps are timed and delivered exactly as
    # single steps: the router sees the same events and metrics at every decision.
    assert windowed.ttft_ms == single.ttft_ms
    assert windowed.per_worker == single.per_worker
    assert windowed.extra == single.extra
    for key in ("e2e_mean_ms", "ttft_mean_ms", "prefix_reuse", "throughput_tok_s"):
        assert windowed.figures[key] == single.figures[key]
    # A window takes each request's blocks in one allocation, so evictions may be grouped
    # into fewer BlockRemoved events; what they remove is the same.
    assert replace(windowed_sim.indexer.stats(), events_applied=0) == replace(
        single_sim.indexer.stats(), events_applied=0
    )


@pytest.mark.parametrize("policy", ["kv", "round_robin"])
def test_lazy_windows_match_single_steps_on_a_trace_slice(trace_path: Path, policy: str) -> None:
    requests = apply_arrivals(
        load_mooncake_trace(trace_path, limit=120), Arrivals("trace", speedup=1.0)
    )
    runs = []
    for steps in (1, 256):
        sim = Simulation(policy, SimConfig(num_workers=4, max_decode_steps=steps))
        runs.append((sim.run(requests), sim))
    (single, _), (windowed, sim) = runs
    # Windows ran across arrivals, were rolled forward before decisions and were cut.
    assert sim.num_windows > 0 and sim.num_windows_cut > 0 and sim.num_window_flushes > 0
    assert windowed.ttft_ms == single.ttft_ms
    assert windowed.per_worker == single.per_worker
    assert windowed.extra == single.extra


def test_windows_with_a_separate_metrics_delay_stop_at_arrivals() -> None:
    requests = _multi_turn()
    single, _ = _run_windowed(requests, "kv", 1, metrics_delay_s=0.02)
    windowed, sim = _run_windowed(requests, "kv", 256, metrics_delay_s=0.02)
    assert sim.num_windows == 0  # windows cut at every arrival instead (inside the engine)
    assert windowed.ttft_ms == pytest.approx(single.ttft_ms, rel=1e-9)
    assert windowed.extra["engine_steps"] == single.extra["engine_steps"]


def test_a_policy_object_is_accepted() -> None:
    requests = _shared_prefix()[:20]
    policy = PrefixAffinityPolicy(cache_weight=8.0, rng=random.Random(0))
    result = simulate(requests, policy, SimConfig(num_workers=2, engine=SMALL_ENGINE))
    assert result.figures["completed"] == 20
    assert result.extra["decode_errors"] == result.extra["rejected_events"] == 0


def test_bad_window_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="max_decode_steps"):
        SimConfig(max_decode_steps=0)


def test_separate_metrics_delay_delivers_both_streams() -> None:
    requests = _shared_prefix()[:30]
    config = SimConfig(
        num_workers=2, engine=SMALL_ENGINE, event_delay_s=0.002, metrics_delay_s=0.05
    )
    sim = Simulation("kv", config)
    result = sim.run(requests)
    assert result.figures["completed"] == 30
    assert result.extra["decode_errors"] == result.extra["rejected_events"] == 0
    # Both engines' metrics reached the aggregator, and their events the index.
    assert {e.worker_id for e in sim.aggregator.get_metrics().endpoints} == {0, 1}
    assert sim.indexer.stats().events_applied > 0


def test_event_forms_give_identical_runs() -> None:
    # Structs handed over in-process and msgpack bytes in either wire form are the same
    # events to the router: every figure matches.
    requests = _multi_turn()
    runs = {
        form: Simulation("kv", SimConfig(num_workers=2, engine=SMALL_ENGINE, event_form=form))
        for form in ("direct", "array", "map", "map-batch")
    }
    results = {form: sim.run(requests) for form, sim in runs.items()}
    direct = results["direct"]
    assert direct.figures["completed"] == len(requests)
    assert runs["direct"].indexer.stats().events_applied > 0
    for form in ("array", "map", "map-batch"):
        assert results[form].ttft_ms == direct.ttft_ms
        assert results[form].per_worker == direct.per_worker
        assert results[form].extra == direct.extra
        assert runs[form].indexer.stats() == runs["direct"].indexer.stats()


def test_simulate_many_in_processes_equals_one_by_one() -> None:
    requests = _multi_turn()
    config = SimConfig(num_workers=2, engine=SMALL_ENGINE)
    runs = [("kv", Arrivals("trace", speedup=4.0)), ("round_robin", Arrivals("trace", speedup=2.0))]
    done: list[int] = []
    parallel = simulate_many(requests, runs, config, jobs=2, on_done=lambda i, _: done.append(i))
    serial = simulate_many(requests, runs, config)
    assert sorted(done) == [0, 1]
    for a, b in zip(parallel, serial, strict=True):
        assert a.ttft_ms == b.ttft_ms
        assert a.per_worker == b.per_worker
        assert a.extra == b.extra
    assert parallel[0].ttft_ms != parallel[1].ttft_ms  # two different runs, in order
    with pytest.raises(ValueError, match="jobs"):
        simulate_many(requests, runs, config, jobs=0)


# -- the router queue ----------------------------------------------------------------


def _overloaded_trace(trace_path: Path) -> list[Request]:
    # 240 trace requests at 6x on 2 engines: far more prefill than they can do.
    return apply_arrivals(load_mooncake_trace(trace_path, limit=240), Arrivals("trace", 6.0))


@pytest.mark.parametrize("queue_policy", ["fcfs", "wspt"])
def test_router_queue_runs_match_single_steps(trace_path: Path, queue_policy: str) -> None:
    """Queued requests are routed at other engines' step ends; windows are rolled forward
    and cut for them as for arrivals, so the run equals the step-by-step one."""
    requests = _overloaded_trace(trace_path)
    runs = []
    for steps in (1, 256):
        config = SimConfig(
            num_workers=2, max_decode_steps=steps, queue_threshold=1.0, queue_policy=queue_policy
        )  # type: ignore[arg-type]
        sim = Simulation("kv", config)
        runs.append((sim.run(requests), sim))
    (single, _), (windowed, sim) = runs
    assert single.figures["completed"] == len(requests) and single.extra["errors"] == 0
    assert single.extra["queued"] > len(requests) // 2  # the queue really held requests
    assert sim.num_windows > 0
    assert windowed.ttft_ms == single.ttft_ms
    assert windowed.per_worker == single.per_worker
    assert windowed.extra == single.extra


def test_router_queue_in_wspt_order_lowers_the_mean_ttft_under_overload(
    trace_path: Path,
) -> None:
    requests = _overloaded_trace(trace_path)
    runs = {
        name: simulate(requests, "kv", SimConfig(num_workers=2, **settings))  # type: ignore[arg-type]
        for name, settings in {
            "none": {},
            "fcfs": {"queue_threshold": 1.0},
            "wspt": {"queue_threshold": 1.0, "queue_policy": "wspt"},
        }.items()
    }
    assert all(r.figures["completed"] == len(requests) for r in runs.values())
    assert "queued" not in runs["none"].extra
    mean = {name: r.figures["ttft_mean_ms"] for name, r in runs.items()}
    # Shortest uncached work first: many short requests stop waiting behind long ones.
    assert mean["wspt"] < 0.7 * mean["fcfs"]
    assert mean["wspt"] < 0.7 * mean["none"]
    # ... while the median request waits far less than in arrival order.
    assert runs["wspt"].figures["ttft_p50_ms"] < runs["fcfs"].figures["ttft_p50_ms"]


def test_bad_queue_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="queue_threshold"):
        SimConfig(queue_threshold=0)
