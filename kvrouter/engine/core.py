"""The simulated engine's core: a pure, synchronous step function.

:class:`EngineCore` ties the block manager, the scheduler and a timing model together.
It knows nothing about time or I/O: :meth:`EngineCore.step` plans and "runs" one batch
and says how long it took. The live server sleeps for ``duration_s`` and then delivers
the outputs and publishes the KV events as one batch; the simulator does the same in
virtual time.

>>> core = EngineCore(EngineConfig(block_size=4, num_gpu_blocks=16), worker_id=3)
>>> core.add_request(EngineRequest("r1", [1, 2, 3, 4, 5], max_tokens=2))
>>> first = core.step()               # prefill: 5 tokens, the first output token
>>> [o.num_output_tokens for o in first.outputs], round(first.duration_s, 6)
([1], 0.026571)
>>> core.step().outputs[0].finish_reason
'length'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from kvrouter.engine.block_manager import BlockManager
from kvrouter.engine.scheduler import (
    EngineConfig,
    EngineRequest,
    Request,
    RequestOutput,
    Scheduler,
)
from kvrouter.engine.timing import DefaultTiming, TimingModel, step_ms
from kvrouter.events.vllm import KVCacheEvent
from kvrouter.load.metrics import ForwardPassMetrics

__all__ = [
    "EngineConfig",
    "EngineCore",
    "EngineRequest",
    "EngineStats",
    "RequestOutput",
    "StepResult",
]


class StepResult(NamedTuple):
    """One step: how long it took, what became visible at its end, the KV events it made."""

    duration_s: float
    outputs: list[RequestOutput]
    kv_events: list[KVCacheEvent]


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of an engine's counters and cache (prefix-cache figures in tokens)."""

    steps: int
    busy_s: float
    preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    requests_added: int
    requests_finished: int
    requests_aborted: int
    num_running: int
    num_waiting: int
    prefill_tokens_computed: int
    output_tokens: int
    blocks_total: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    blocks_evicted: int
    blocks_stored: int
    blocks_deduplicated: int


class EngineCore:
    """One simulated vLLM-like worker (DESIGN 5).

    Requests whose prompt plus ``max_tokens`` could never fit in the cache are refused
    with ValueError, as are duplicate ids and empty prompts.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        timing: TimingModel | None = None,
        worker_id: int = 0,
        sparse_outputs: bool = False,
    ) -> None:
        self.config = config if config is not None else EngineConfig()
        self.timing: TimingModel = timing if timing is not None else DefaultTiming()
        self._decode_monotone = _decode_is_monotone(self.timing)
        self.worker_id = worker_id
        self.block_manager = BlockManager(
            self.config.num_gpu_blocks,
            self.config.block_size,
            enable_prefix_caching=self.config.enable_prefix_caching,
        )
        self._scheduler = Scheduler(self.config, self.block_manager, sparse_outputs=sparse_outputs)
        self._requests: dict[str, Request] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._steps = 0
        self._busy_s = 0.0
        self._requests_added = 0
        self._requests_finished = 0
        self._requests_aborted = 0
        self._prefill_tokens_computed = 0

    # -- requests ----------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request (FCFS). Raises ValueError for a request that can never run."""
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id!r} is already in the engine")
        if len(request.prompt_token_ids) == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if request.max_tokens < 1:
            raise ValueError(
                f"request {request.request_id!r}: max_tokens must be >= 1, got {request.max_tokens}"
            )
        config = self.config
        capacity = config.num_gpu_blocks * config.block_size
        # The last sampled token is never computed, hence the -1.
        needed = len(request.prompt_token_ids) + request.max_tokens - 1
        if needed > capacity:
            raise ValueError(
                f"request {request.request_id!r} needs {needed} token slots; "
                f"the cache holds {capacity}"
            )
        state = Request(request, config.block_size, config.enable_prefix_caching, config.vocab_size)
        self._requests[request.request_id] = state
        self._scheduler.add(state)
        self._requests_added += 1

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its blocks; False if it is not in the engine.

        Its final output (``finish_reason="abort"``) comes with the next :meth:`step`.
        """
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        self._scheduler.remove(request)
        self._requests_aborted += 1
        self._pending_outputs.append(
            RequestOutput(
                request_id,
                [],
                True,
                "abort",
                request.num_prompt_tokens,
                max(request.num_cached_tokens, 0),
                request.num_output_tokens,
            )
        )
        return True

    def has_unfinished_requests(self) -> bool:
        """True while :meth:`step` has work to do or results to deliver."""
        return bool(
            self._requests or self._pending_outputs or self.block_manager.has_pending_events()
        )

    @property
    def num_running(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self._scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission (new or preempted)."""
        return len(self._scheduler.waiting)

    # -- stepping ----------------------------------------------------------------------

    def step(self, max_decode_steps: int = 1, max_duration_s: float = math.inf) -> StepResult:
        """Run one batch; a step with nothing to run takes 0 s (pending results still come).

        With ``max_decode_steps > 1``, a batch of decodes only (nothing that could be
        admitted, no request finishing early, no preemption; see
        :meth:`Scheduler.plan_decode_window`) runs up to that many steps back to back,
        stopping after the step that reaches ``max_duration_s``: the end state and total
        duration equal those single steps, and each request reports one output with all
        its new tokens. A virtual-time driver passes the time to its next arrival as
        ``max_duration_s`` so admissions happen exactly when they would step by step.
        """
        scheduler = self._scheduler
        outputs = self._pending_outputs
        self._pending_outputs = []
        duration_s = 0.0
        if max_decode_steps > 1 and scheduler.running and self._window_may_last(max_duration_s):
            plan = scheduler.plan_decode_window(max_decode_steps)
            if plan is not None and len(plan) > 1:
                duration_s = self._run_window(plan, max_duration_s, outputs)
                return StepResult(duration_s, outputs, self.block_manager.drain_events())
        if scheduler.running or scheduler.waiting:
            batch = scheduler.schedule()
            if batch.requests:
                manager = self.block_manager
                active = manager.num_used_blocks / manager.num_blocks
                duration_ms = step_ms(
                    self.timing, batch.num_prefill_tokens, batch.num_decodes, active
                )
                duration_s = duration_ms / (1000.0 * self.config.speedup_ratio)
                self._steps += 1
                self._busy_s += duration_s
                self._prefill_tokens_computed += batch.num_prefill_tokens
                outputs.extend(self._finish_step(scheduler.update(batch)))
        return StepResult(duration_s, outputs, self.block_manager.drain_events())

    def _window_may_last(self, max_duration_s: float) -> bool:
        """False when a window would surely stop after its first step (not worth planning).

        With a decode time that never falls as blocks fill up, a decode step takes at least
        ``decode_ms`` at the current usage.
        """
        if max_duration_s == math.inf or not self._decode_monotone:
            return True
        manager = self.block_manager
        first_ms = self.timing.decode_ms(manager.num_used_blocks / manager.num_blocks)
        return first_ms / (1000.0 * self.config.speedup_ratio) < max_duration_s

    def _window_durations(self, plan: list[int]) -> list[float]:
        """Each planned decode step's duration, computed exactly as a single step's."""
        manager = self.block_manager
        decode_ms = self.timing.decode_ms
        divisor = 1000.0 * self.config.speedup_ratio
        used = manager.num_used_blocks
        total = manager.num_blocks
        durations: list[float] = []
        for new_blocks in plan:
            used += new_blocks
            durations.append(decode_ms(used / total) / divisor)
        return durations

    def _run_window(
        self, plan: list[int], max_duration_s: float, outputs: list[RequestOutput]
    ) -> float:
        """Time the planned decode steps, cut at ``max_duration_s``, then run them."""
        duration_s = 0.0
        num_steps = 0
        for step_s in self._window_durations(plan):
            duration_s += step_s
            num_steps += 1
            if duration_s >= max_duration_s:
                break
        self._commit_window(num_steps, duration_s, outputs)
        return duration_s

    def _commit_window(
        self, num_steps: int, duration_s: float, outputs: list[RequestOutput]
    ) -> None:
        self._steps += num_steps
        self._busy_s += duration_s
        outputs.extend(self._finish_step(self._scheduler.run_decode_window(num_steps)))

    def plan_window(self, max_steps: int) -> list[float]:
        """The durations of the decode window that could run now; ``[]`` if none.

        For a virtual-time driver that commits windows lazily: it may run any prefix of
        the plan with :meth:`commit_window`, as long as nothing else touches the engine
        in between (an :meth:`add_request` included). Planning changes nothing. A window
        here may have one step; it is then exactly one decode-only :meth:`step`.
        """
        if not self._scheduler.running:
            return []
        plan = self._scheduler.plan_decode_window(max_steps)
        return self._window_durations(plan) if plan else []

    def commit_window(self, num_steps: int) -> StepResult:
        """Run the first ``num_steps`` steps of the window :meth:`plan_window` offered.

        The state afterwards equals ``num_steps`` single steps; the result's duration
        is their sum, its outputs the window's (see :meth:`step`) and its KV events those
        of the steps run.
        """
        plan = self._scheduler.plan_decode_window(num_steps)
        if plan is None or len(plan) < num_steps:
            raise ValueError(f"no decode window of {num_steps} steps can run now")
        outputs = self._pending_outputs
        self._pending_outputs = []
        duration_s = math.fsum(self._window_durations(plan))
        self._commit_window(num_steps, duration_s, outputs)
        return StepResult(duration_s, outputs, self.block_manager.drain_events())

    def _finish_step(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        requests = self._requests
        for output in outputs:
            if output.finished:
                del requests[output.request_id]
                self._requests_finished += 1
        return outputs

    def clear_cache(self) -> bool:
        """Forget every cached block (``AllBlocksCleared`` comes with the next step).

        Refused (False) while any request is running.
        """
        if self._scheduler.running:
            return False
        return self.block_manager.clear()

    # -- reporting ---------------------------------------------------------------------

    def metrics(self) -> ForwardPassMetrics:
        """The load snapshot this worker publishes (DESIGN 3.3)."""
        manager = self.block_manager
        scheduler = self._scheduler
        queries = scheduler.num_prefix_query_tokens
        return ForwardPassMetrics(
            worker_id=self.worker_id,
            request_active_slots=len(scheduler.running),
            request_total_slots=self.config.max_num_seqs,
            num_requests_waiting=len(scheduler.waiting),
            kv_active_blocks=manager.num_used_blocks,
            kv_total_blocks=manager.num_blocks,
            gpu_cache_usage_perc=manager.num_used_blocks / manager.num_blocks,
            gpu_prefix_cache_hit_rate=(
                scheduler.num_prefix_hit_tokens / queries if queries else 0.0
            ),
            data_parallel_rank=self.config.dp_rank,
        )

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters and cache."""
        blocks = self.block_manager.stats()
        scheduler = self._scheduler
        return EngineStats(
            steps=self._steps,
            busy_s=self._busy_s,
            preemptions=scheduler.num_preemptions,
            prefix_cache_queries=scheduler.num_prefix_query_tokens,
            prefix_cache_hits=scheduler.num_prefix_hit_tokens,
            requests_added=self._requests_added,
            requests_finished=self._requests_finished,
            requests_aborted=self._requests_aborted,
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            prefill_tokens_computed=self._prefill_tokens_computed,
            output_tokens=scheduler.num_output_tokens,
            blocks_total=blocks.num_blocks,
            blocks_used=blocks.num_used_blocks,
            blocks_free=blocks.num_free_blocks,
            blocks_cached=blocks.num_cached_blocks,
            blocks_evicted=blocks.num_evicted_blocks,
            blocks_stored=blocks.num_stored_blocks,
            blocks_deduplicated=blocks.num_deduplicated_blocks,
        )


def _decode_is_monotone(timing: TimingModel) -> bool:
    """Whether ``decode_ms`` never decreases on [0, 1] (known for the default quadratic)."""
    if not isinstance(timing, DefaultTiming):
        return False
    # The derivative 2 a p + b is linear in p: non-negative at both ends is enough.
    return timing.decode_b >= 0 and 2 * timing.decode_a + timing.decode_b >= 0
