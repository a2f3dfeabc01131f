"""A discrete-event simulation, in virtual time, of N engines behind the real router.

Nothing here re-implements the router or the engine: the simulation owns a heap of
timed events and a :class:`~kvrouter.clock.ManualClock`, and drives the real pieces::

    arrival ──▶ KvScheduler.schedule() ──▶ EngineCore[w].add_request()
                      ▲   ▲                        │ step(): StepResult(duration_s, ...)
                      │   │                        ▼ at now + duration_s
                      │   │ on_first_token / on_finish ◀── outputs
                      │   └── KvIndexer.apply_event ◀── VllmEventDecoder ◀── KVEventBatch
                      │                                   (kv_events, after event_delay_s)
                      └────── KvMetricsAggregator.update ◀── core.metrics()
                                                          (after metrics_delay_s)

An engine steps back to back while it has work, as the live server's loop does: the
batch is planned when the step starts and its outputs and KV events become visible when
it ends. KV events reach the router's real decoder, which checks them and re-hashes
their token ids as it does for a live engine: handed over in-process as the engine's
structs by default, or as msgpack bytes in vLLM's wire form (``event_form``); the runs
are identical either way (tested).

>>> from kvrouter.bench.workloads import shared_prefix_requests, Arrivals, apply_arrivals
>>> reqs = apply_arrivals(shared_prefix_requests(num_groups=2, prompts_per_group=4,
...     system_prompt_len=256, question_len=32, output_len=4), Arrivals("poisson", rate=20))
>>> simulate(reqs, "kv", SimConfig(num_workers=2)).figures["completed"]
8
"""

from __future__ import annotations

import bisect
import heapq
import math
import multiprocessing
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from kvrouter.bench.results import RequestRecord, RunResult, Series, summarize
from kvrouter.bench.workloads import Arrivals, Request, apply_arrivals
from kvrouter.clock import ManualClock
from kvrouter.engine import EngineConfig, EngineCore, EngineRequest, StepResult
from kvrouter.errors import AllWorkersBusy, ConfigError
from kvrouter.events.model import RouterEvent
from kvrouter.events.vllm import KVEventBatch, VllmEventDecoder, encode_batch
from kvrouter.hashing import hash_request
from kvrouter.index import KvIndexer
from kvrouter.load import KvMetricsAggregator
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.routing.policies import Decision, Policy
from kvrouter.routing.queue import QueueConfig, QueuePolicy, RouterQueue
from kvrouter.routing.scheduler import KvScheduler, ScheduleRequest

__all__ = ["SimConfig", "Simulation", "simulate", "simulate_many"]

# Heap entry kinds. Ties at one instant run in this order: finished steps first (they
# free capacity and report tokens), then transport deliveries, then new arrivals.
_STEP_DONE = 0
_DELIVERY = 1
_ARRIVAL = 2
_SAMPLE = 3

# KV events on their way to the router: the engine's structs ("direct") or msgpack bytes.
_Payload = KVEventBatch | bytes


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Settings of one simulated run (engine defaults: DESIGN 5).

    ``event_delay_s`` / ``metrics_delay_s`` model transport lag between an engine and
    the router; ``metrics_delay_s`` ``None`` means the same as ``event_delay_s``.
    ``max_decode_steps`` > 1 lets an engine run that many decode-only steps in one call
    when its batch cannot change before the next arrival (``EngineCore.step``'s decode
    windows): first tokens, finishes and admissions keep their exact virtual times; the
    window's tokens, KV events and metrics are delivered once, at its end. 1 is the
    step-by-step behaviour of the live server. ``event_form`` ``"direct"`` hands each
    step's KV event batch to the router's decoder as the engine's structs
    (:meth:`VllmEventDecoder.convert`: the same checks and re-hashing, no bytes);
    ``"array"`` / ``"map"`` send it through the msgpack wire codec in that form.
    """

    num_workers: int = 8
    engine: EngineConfig = field(default_factory=EngineConfig)
    event_delay_s: float = 0.005
    metrics_delay_s: float | None = None
    event_form: Literal["direct", "array", "map", "map-batch"] = "direct"
    sample_interval_s: float = 1.0
    seed: int = 0
    predict_cache: bool = True
    max_decode_steps: int = 256
    # The router queue (None: off): its threshold as a multiple of the engines'
    # max_num_batched_tokens, and its order.
    queue_threshold: float | None = None
    queue_policy: QueuePolicy = "fcfs"

    def __post_init__(self) -> None:
        if self.queue_threshold is not None and self.queue_threshold <= 0:
            raise ConfigError(f"queue_threshold must be positive, got {self.queue_threshold}")
        if self.max_decode_steps < 1:
            raise ConfigError(f"max_decode_steps must be >= 1, got {self.max_decode_steps}")
        if self.num_workers <= 0:
            raise ConfigError(f"num_workers must be positive, got {self.num_workers}")
        if self.event_delay_s < 0 or (self.metrics_delay_s or 0.0) < 0:
            raise ConfigError("transport delays must not be negative")
        if self.sample_interval_s <= 0:
            raise ConfigError(f"sample_interval_s must be positive, got {self.sample_interval_s}")


@dataclass(slots=True)
class _Window:
    """A decode window an engine may run, committed lazily (see ``Simulation``)."""

    ends_s: list[float]  # virtual end time of each planned step
    delivered_s: list[float]  # when each step's events and metrics reach the router
    generation: int  # tells its own window-end entry from a cancelled one's
    done: int = 0  # steps committed so far


@dataclass(slots=True)
class _Tracked:
    """A request in flight: what the record at its end needs."""

    request: Request
    worker: int
    first_token_s: float | None = None


class Simulation:
    """One run of one policy over one workload; call :meth:`run` once."""

    def __init__(self, policy: str | Policy, config: SimConfig) -> None:
        self.config = config
        self.clock = ManualClock()
        block_size = config.engine.block_size
        self.indexer = KvIndexer(block_size=block_size, clock=self.clock)
        self.aggregator = KvMetricsAggregator(clock=self.clock)
        self.scheduler = KvScheduler(
            self.indexer,
            self.aggregator,
            policy=policy,
            block_size=block_size,
            clock=self.clock,
            rng=random.Random(config.seed),
            predict_cache=config.predict_cache,
        )
        self.queue: RouterQueue[tuple[Request, Any]] | None = None
        if config.queue_threshold is not None:
            queue_config = QueueConfig.scaled(
                config.queue_threshold, config.engine.max_num_batched_tokens, config.queue_policy
            )
            self.queue = RouterQueue(self.scheduler, queue_config)
        self.cores: list[EngineCore] = []
        self._decoders: list[VllmEventDecoder] = []
        for worker in range(config.num_workers):
            # Sparse outputs: the records need first tokens and finishes only.
            self.cores.append(EngineCore(config.engine, worker_id=worker, sparse_outputs=True))
            self._decoders.append(VllmEventDecoder(block_size))
            self.scheduler.add_worker(worker, total_blocks=config.engine.num_gpu_blocks)
        self._stepping = [False] * config.num_workers
        self._windows: list[_Window | None] = [None] * config.num_workers
        self._generation = 0
        self._event_ids = [0] * config.num_workers
        self._in_flight = [0] * config.num_workers
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = 0
        self._tracked: dict[str, _Tracked] = {}
        self._records: list[RequestRecord] = []
        self._series = Series(active={str(w): [] for w in range(config.num_workers)})
        self._window = [0, 0]  # prompt tokens, cached tokens finished since the last sample
        self._pending: list[Request] = []
        self._next_arrival = 0
        # Virtual time of the next open-loop arrival: the horizon of decode windows.
        self._next_arrival_s = math.inf
        self._closed_loop = False
        self._metrics_delay_s = (
            config.event_delay_s if config.metrics_delay_s is None else config.metrics_delay_s
        )
        # Lazy windows need one delivery per step carrying both events and metrics.
        self._lazy_windows = (
            config.max_decode_steps > 1 and self._metrics_delay_s == config.event_delay_s
        )
        self.num_decode_errors = 0
        self.num_rejected_events = 0
        self.num_windows = 0  # decode windows opened (lazily committed)
        self.num_windows_cut = 0  # ... ended early by an arrival for their engine
        self.num_window_flushes = 0  # ... partly committed before a routing decision

    # -- the event loop ------------------------------------------------------------------

    def _push(self, at_s: float, kind: int, worker: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at_s, kind, self._seq, worker, payload))

    def run(self, requests: Sequence[Request], arrivals: Arrivals | None = None) -> RunResult:
        """Simulate until every request has finished (or nothing more can happen)."""
        started = time.perf_counter()
        arrivals = arrivals or Arrivals()
        self._pending = apply_arrivals(requests, arrivals)
        self._closed_loop = arrivals.closed_loop
        # Closed loop: arrivals follow finishes, which end windows anyway.
        self._lazy_windows = self._lazy_windows and not self._closed_loop
        if self._closed_loop:
            for _ in range(min(arrivals.concurrency, len(self._pending))):
                self._queue_next_arrival(0.0)
        elif self._pending:
            self._queue_next_arrival(self._pending[0].arrival_s)
        self._push(self.config.sample_interval_s, _SAMPLE, 0, None)
        self._loop()
        self._fail_unfinished()
        return summarize(
            self._records,
            wall_s=time.perf_counter() - started,
            series=self._series,
            extra=self._extra(),
        )

    def _loop(self) -> None:
        heap = self._heap
        pop = heapq.heappop
        clock = self.clock
        total = len(self._pending)
        while heap and len(self._records) < total:
            at_s, kind, _, worker, payload = pop(heap)
            clock.now_s = at_s  # the heap only ever moves forward
            if kind == _STEP_DONE:
                self._on_step_done(worker, payload)
            elif kind == _DELIVERY:
                self._on_delivery(worker, payload)
            elif kind == _ARRIVAL:
                self._on_arrival(payload)
            else:
                self._on_sample()

    def _queue_next_arrival(self, at_s: float) -> None:
        index = self._next_arrival
        if index < len(self._pending):
            self._next_arrival = index + 1
            request = self._pending[index]
            if self._closed_loop:
                # Sent when a slot frees: its latencies count from then, as replay's do.
                request = replace(request, arrival_s=at_s)
            else:
                self._next_arrival_s = at_s
            self._push(at_s, _ARRIVAL, 0, request)
        elif not self._closed_loop:
            self._next_arrival_s = math.inf

    # -- handlers ------------------------------------------------------------------------

    def _on_arrival(self, request: Request) -> None:
        now = self.clock.now_s
        if self._lazy_windows:
            self._roll_forward(now)
        if not self._closed_loop:
            following = self._next_arrival
            if following < len(self._pending):
                self._queue_next_arrival(max(now, self._pending[following].arrival_s))
        tokens = request.token_ids()
        # Hashed once, from the numpy array (fast path), as the gateway does.
        local, seq = hash_request(tokens, self.config.engine.block_size)
        routed = ScheduleRequest(
            request.request_id, local_hashes=local, seq_hashes=seq, num_tokens=len(tokens)
        )
        if self.queue is not None:
            self.queue.submit(routed, (request, tokens))
            self._dispatch_queued()
            return
        try:
            decision = self.scheduler.schedule(routed)
        except AllWorkersBusy as exc:
            self._fail(request, now, None, f"rejected: {exc}")
            return
        self._start_request(request, tokens, decision)

    def _dispatch_queued(self) -> None:
        """Route the requests the router queue lets go now, and start them."""
        queue = self.queue
        assert queue is not None
        if not queue.has_capacity():
            return
        now = self.clock.now_s
        if self._lazy_windows:
            self._roll_forward(now)  # the router sees what it would step by step
        for (request, tokens), outcome in queue.dispatch():
            if isinstance(outcome, Decision):
                self._start_request(request, tokens, outcome)
            else:
                self._fail(request, now, None, f"rejected: {outcome}")

    def _start_request(self, request: Request, tokens: Any, decision: Decision) -> None:
        now = self.clock.now_s
        worker = decision.worker.worker_id
        core = self.cores[worker]
        if self._windows[worker] is not None:
            self._cut_window(worker, now)
        try:
            # The numpy array itself: the engine neither copies nor changes a prompt.
            core.add_request(EngineRequest(request.request_id, tokens, request.output_length))
        except ValueError as exc:
            self.scheduler.on_finish(request.request_id)
            self._fail(request, now, worker, str(exc))
            return
        self._tracked[request.request_id] = _Tracked(request, worker)
        self._in_flight[worker] += 1
        if not self._stepping[worker]:
            self._start_step(worker)

    def _start_step(self, worker: int) -> None:
        core = self.cores[worker]
        if self._lazy_windows:
            durations = core.plan_window(self.config.max_decode_steps)
            if durations:
                self._open_window(worker, durations)
                return
            result = core.step()
        else:
            result = self._step_to_horizon(core)
        if result.duration_s <= 0 and not result.outputs and not result.kv_events:
            # Nothing could run (e.g. waiting for blocks): wait for the next arrival.
            self._stepping[worker] = False
            return
        self._stepping[worker] = True
        self._push(self.clock.now_s + result.duration_s, _STEP_DONE, worker, result)

    def _step_to_horizon(self, core: EngineCore) -> StepResult:
        # Nothing but an arrival can change an engine's batch, so a decode window may
        # run up to the next one (closed loop: arrivals follow finishes, which end a
        # window anyway).
        if self.queue is not None:
            return core.step()  # a queued request may be routed at any step's end
        horizon_s = self._next_arrival_s - self.clock.now_s
        return core.step(self.config.max_decode_steps, horizon_s)

    def _on_step_done(self, worker: int, result: StepResult | int) -> None:
        now = self.clock.now_s
        if isinstance(result, int):  # the end of a decode window
            window = self._windows[worker]
            if window is None or window.generation != result:
                return  # cut short by an arrival; its last step has its own entry
            self._windows[worker] = None
            result = self._close_window(worker, window, now)
        for output in result.outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue
            if tracked.first_token_s is None and output.num_output_tokens > 0:
                tracked.first_token_s = now
                self.scheduler.on_first_token(output.request_id)
            if output.finished:
                self._finish(tracked, output.num_cached_tokens, output.num_output_tokens)
        if self.queue is not None and len(self.queue):
            self._dispatch_queued()
        core = self.cores[worker]
        config = self.config
        payload = self._encode(result, now)
        metrics = core.metrics()
        if self._metrics_delay_s == config.event_delay_s:
            self._push(now + config.event_delay_s, _DELIVERY, worker, (payload, metrics))
        else:
            if payload is not None:
                self._push(now + config.event_delay_s, _DELIVERY, worker, (payload, None))
            self._push(now + self._metrics_delay_s, _DELIVERY, worker, (None, metrics))
        if core.has_unfinished_requests():
            self._start_step(worker)
        else:
            self._stepping[worker] = False

    def _on_delivery(
        self, worker: int, delivery: tuple[_Payload | None, ForwardPassMetrics | None]
    ) -> None:
        payload, metrics = delivery
        if payload is not None:
            self._on_kv_events(worker, payload)
        if metrics is not None:
            self.aggregator.update(metrics)

    def _on_kv_events(self, worker: int, payload: _Payload) -> None:
        decoder = self._decoders[worker]
        if isinstance(payload, KVEventBatch):
            batch = decoder.convert(payload)
        else:
            batch = decoder.decode(payload)
        self.num_decode_errors += len(batch.errors)
        apply = self.indexer.apply_event
        event_id = self._event_ids[worker]
        for data in batch.events:
            if not apply(RouterEvent(worker, batch.dp_rank, event_id, data)):
                self.num_rejected_events += 1
            event_id += 1
        self._event_ids[worker] = event_id

    def _on_sample(self) -> None:
        series = self._series
        series.t_s.append(round(self.clock.now_s, 6))
        for worker, count in enumerate(self._in_flight):
            series.active[str(worker)].append(count)
        prompt, cached = self._window
        series.hit_rate.append(cached / prompt if prompt else None)
        self._window = [0, 0]
        if self._heap:  # anything else left to happen: keep sampling
            self._push(self.clock.now_s + self.config.sample_interval_s, _SAMPLE, 0, None)

    # -- lazy decode windows -------------------------------------------------------------
    #
    # An engine whose batch is decode-only plans a window of up to max_decode_steps steps
    # and commits it lazily. The router must see exactly what it would step by step, so
    # before every routing decision each open window commits the steps whose delivery
    # (end + event delay) is due and hands their events and metrics over at once (nobody
    # looked in between); an arrival routed to the engine cuts its window after the step
    # in progress, whose outputs and deliveries then follow the step-by-step path.

    def _open_window(self, worker: int, durations: list[float]) -> None:
        ends_s: list[float] = []
        end_s = self.clock.now_s
        for duration_s in durations:
            end_s += duration_s  # summed as the step-by-step clock would be
            ends_s.append(end_s)
        delay_s = self.config.event_delay_s
        self._generation += 1
        self.num_windows += 1
        self._windows[worker] = _Window(ends_s, [e + delay_s for e in ends_s], self._generation)
        self._stepping[worker] = True
        self._push(ends_s[-1], _STEP_DONE, worker, self._generation)

    def _roll_forward(self, now: float) -> None:
        for worker, window in enumerate(self._windows):
            if window is not None:
                self._flush_window(worker, window, now)

    def _flush_window(self, worker: int, window: _Window, now: float) -> None:
        """Commit the steps whose delivery is due by ``now``; deliver them now."""
        due = bisect.bisect_right(window.delivered_s, now, window.done)
        due = min(due, len(window.ends_s) - 1)  # the last step ends the window
        if due > window.done:
            result = self.cores[worker].commit_window(due - window.done)
            assert not result.outputs, "a window reports only at its last step"
            window.done = due
            self.num_window_flushes += 1
            self._on_delivery(worker, (self._encode(result, now), self.cores[worker].metrics()))

    def _commit_steps_until(self, worker: int, window: _Window, until: int) -> None:
        """Commit steps one by one, each delivered at its own end + event delay."""
        core = self.cores[worker]
        while window.done < until:
            result = core.commit_window(1)
            payload = self._encode(result, window.ends_s[window.done])
            self._push(
                window.delivered_s[window.done], _DELIVERY, worker, (payload, core.metrics())
            )
            window.done += 1

    def _close_window(self, worker: int, window: _Window, now: float) -> StepResult:
        """At a window's end: commit what is left; the last step returns as a result."""
        self._flush_window(worker, window, now)
        self._commit_steps_until(worker, window, len(window.ends_s) - 1)
        return self.cores[worker].commit_window(1)

    def _cut_window(self, worker: int, now: float) -> None:
        """An arrival for ``worker``: end its window with the step in progress."""
        window = self._windows[worker]
        assert window is not None
        self._windows[worker] = None  # its window-end entry is now stale
        self.num_windows_cut += 1
        in_progress = bisect.bisect_right(window.ends_s, now, window.done)
        self._commit_steps_until(worker, window, in_progress)
        result = self.cores[worker].commit_window(1)
        self._push(window.ends_s[in_progress], _STEP_DONE, worker, result)

    def _encode(self, result: StepResult, at_s: float) -> _Payload | None:
        """A step's KV events as the router receives them (``None``: there are none)."""
        if not result.kv_events:
            return None
        batch = KVEventBatch(at_s, result.kv_events, self.config.engine.dp_rank)
        form = self.config.event_form
        return batch if form == "direct" else encode_batch(batch, form=form)

    # -- bookkeeping ---------------------------------------------------------------------

    def _finish(self, tracked: _Tracked, cached_tokens: int, output_tokens: int) -> None:
        request = tracked.request
        now = self.clock.now_s
        del self._tracked[request.request_id]
        self.scheduler.on_finish(request.request_id)
        self._in_flight[tracked.worker] -= 1
        prompt_tokens = request.input_length
        self._window[0] += prompt_tokens
        self._window[1] += cached_tokens
        self._records.append(
            RequestRecord(
                request.request_id,
                request.arrival_s,
                tracked.first_token_s,
                now,
                prompt_tokens,
                cached_tokens,
                output_tokens,
                tracked.worker,
            )
        )
        if self._closed_loop:
            self._queue_next_arrival(now)

    def _fail(self, request: Request, now: float, worker: int | None, error: str) -> None:
        self._records.append(
            RequestRecord(
                request.request_id,
                request.arrival_s,
                None,
                None,
                request.input_length,
                0,
                0,
                worker,
                error,
            )
        )
        if self._closed_loop:
            self._queue_next_arrival(now)

    def _fail_unfinished(self) -> None:
        now = self.clock.now_s
        for tracked in list(self._tracked.values()):
            self._fail(tracked.request, now, tracked.worker, "unfinished when the run stopped")
        self._tracked.clear()

    def _extra(self) -> dict[str, Any]:
        stats = [core.stats() for core in self.cores]
        sched = self.scheduler.stats()
        return {
            "virtual_s": self.clock.now_s,
            "preemptions": sum(s.preemptions for s in stats),
            "engine_steps": sum(s.steps for s in stats),
            "router_overlap_blocks": sched.overlap_blocks_total,
            "router_prompt_blocks": sched.prompt_blocks_total,
            "decode_errors": self.num_decode_errors,
            "rejected_events": self.num_rejected_events,
            **self._queue_extra(),
        }

    def _queue_extra(self) -> dict[str, Any]:
        if self.queue is None:
            return {}
        stats = self.queue.stats()
        return {"queued": stats.num_queued, "queue_max_pending": stats.max_pending_seen}


def simulate(
    requests: Sequence[Request],
    policy: str | Policy,
    config: SimConfig | None = None,
    arrivals: Arrivals | None = None,
) -> RunResult:
    """Simulate ``requests`` (arrival times as given, or set by ``arrivals``) under
    ``policy`` and summarise; see the module docstring."""
    return Simulation(policy, config or SimConfig()).run(requests, arrivals)


# Requests of the running simulate_many(), set once per worker process.
_shared_requests: Sequence[Request] = ()


def _init_worker(requests: Sequence[Request]) -> None:
    global _shared_requests
    _shared_requests = requests


def _simulate_shared(policy: str, config: SimConfig, arrivals: Arrivals) -> RunResult:
    return simulate(_shared_requests, policy, config, arrivals)


def simulate_many(
    requests: Sequence[Request],
    runs: Sequence[tuple[str, Arrivals]],
    config: SimConfig | None = None,
    *,
    jobs: int = 1,
    on_done: Callable[[int, RunResult], None] | None = None,
) -> list[RunResult]:
    """Simulate each ``(policy, arrivals)`` of ``runs`` over ``requests``, in that order.

    ``jobs`` > 1 runs that many simulations at once in worker processes (each is
    single-threaded and deterministic, so the figures do not depend on ``jobs``; only
    ``wall_s`` does). ``on_done(index, result)`` is called as each run finishes.
    Policies are named here (a process cannot receive a policy object).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    config = config or SimConfig()
    results: list[RunResult | None] = [None] * len(runs)
    if jobs == 1 or len(runs) <= 1:
        for index, (policy, arrivals) in enumerate(runs):
            result = simulate(requests, policy, config, arrivals)
            results[index] = result
            if on_done is not None:
                on_done(index, result)
    else:
        context = multiprocessing.get_context("spawn")  # no inherited state or threads
        with ProcessPoolExecutor(
            max_workers=min(jobs, len(runs)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(list(requests),),
        ) as pool:
            futures = {
                pool.submit(_simulate_shared, policy, config, arrivals): index
                for index, (policy, arrivals) in enumerate(runs)
            }
            for future in as_completed(futures):
                index = futures[future]
                result = future.result()
                results[index] = result
                if on_done is not None:
                    on_done(index, result)
    return [r for r in results if r is not None]
