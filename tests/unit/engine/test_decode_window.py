"""Decode windows (``step(max_decode_steps=k)``) reach exactly the state single steps do."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrouter.engine import EngineConfig, EngineCore, EngineRequest

from .helpers import replay, small_config


@dataclass
class Trace:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    first_token_s: dict[str, float] = field(default_factory=dict)
    finish_s: dict[str, float] = field(default_factory=dict)
    cached_tokens: dict[str, int] = field(default_factory=dict)
    cache: dict[int, list[int]] = field(default_factory=dict)
    num_results: int = 0


def arrivals(seed: int, block_size: int) -> list[tuple[float, EngineRequest]]:
    rng = random.Random(seed)
    shared = [rng.randrange(500) for _ in range(3 * block_size)]
    out = []
    now = 0.0
    for index in range(12):
        now += rng.expovariate(1 / 0.15)
        length = rng.randrange(1, 5 * block_size)
        prompt = [
            *shared[: rng.randrange(len(shared))],
            *(rng.randrange(500) for _ in range(length)),
        ]
        out.append((now, EngineRequest(f"r{index}", prompt, rng.randrange(1, 40))))
    return out


def drive(
    config: EngineConfig, seed: int, max_decode_steps: int, *, sparse: bool = False
) -> tuple[Trace, EngineCore]:
    """A virtual-time driver: the next arrival bounds every window."""
    core = EngineCore(config, sparse_outputs=sparse)
    pending = arrivals(seed, config.block_size)
    trace = Trace()
    now = 0.0
    while pending or core.has_unfinished_requests():
        while pending and pending[0][0] <= now:
            core.add_request(pending.pop(0)[1])
        horizon = pending[0][0] - now if pending else math.inf
        result = core.step(max_decode_steps, horizon)
        if result.duration_s == 0 and not result.outputs and not result.kv_events:
            now = pending[0][0]
            continue
        now += result.duration_s
        trace.num_results += 1
        replay(result.kv_events, trace.cache)
        for output in result.outputs:
            trace.tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            trace.first_token_s.setdefault(output.request_id, now)
            trace.cached_tokens[output.request_id] = output.num_cached_tokens
            if output.finished:
                trace.finish_s[output.request_id] = now
    return trace, core


def _free_contents(core: EngineCore) -> list[int | None]:
    manager = core.block_manager
    return [manager.block_hash(block_id) for block_id in manager.free_queue()]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_gpu_blocks=st.sampled_from([24, 64]),
    max_num_seqs=st.sampled_from([2, 8]),
    watermark=st.sampled_from([0.0, 0.1]),
    sparse=st.booleans(),
)
def test_windows_match_single_steps(
    seed: int, num_gpu_blocks: int, max_num_seqs: int, watermark: float, sparse: bool
) -> None:
    config = small_config(
        num_gpu_blocks=num_gpu_blocks,
        max_num_batched_tokens=16,
        max_num_seqs=max_num_seqs,
        watermark=watermark,
    )
    single, single_core = drive(config, seed, 1)
    window, window_core = drive(config, seed, 16, sparse=sparse)
    assert window.tokens == single.tokens
    assert window.cached_tokens == single.cached_tokens
    assert window.first_token_s == pytest.approx(single.first_token_s)
    assert window.finish_s == pytest.approx(single.finish_s)
    assert set(window.cache) == set(single.cache) == set(window_core.block_manager.cached_hashes())
    a, b = single_core.stats(), window_core.stats()
    assert (a.steps, a.output_tokens, a.preemptions) == (b.steps, b.output_tokens, b.preemptions)
    assert a.busy_s == pytest.approx(b.busy_s)
    assert a.blocks_evicted == b.blocks_evicted
    # A window hands a request its blocks at once, so block ids differ; the LRU order of
    # contents (what later evictions depend on) does not.
    assert _free_contents(single_core) == _free_contents(window_core)
    assert window.num_results < single.num_results  # windows did happen


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_gpu_blocks=st.sampled_from([24, 64]))
def test_sparse_outputs_carry_the_same_tokens(seed: int, num_gpu_blocks: int) -> None:
    config = small_config(num_gpu_blocks=num_gpu_blocks, max_num_batched_tokens=16)
    full, full_core = drive(config, seed, 1)
    sparse, sparse_core = drive(config, seed, 1, sparse=True)
    assert sparse.tokens == full.tokens
    assert sparse.first_token_s == full.first_token_s
    assert sparse.finish_s == full.finish_s
    assert sparse.cached_tokens == full.cached_tokens
    assert sparse.cache == full.cache
    assert sparse_core.stats() == full_core.stats()


def test_a_window_reports_all_new_tokens_at_once() -> None:
    core = EngineCore(small_config())
    core.add_request(EngineRequest("r", list(range(6)), max_tokens=10))
    core.step()  # prefill + token 1
    result = core.step(max_decode_steps=100)
    (output,) = result.outputs
    assert len(output.new_token_ids) == 9
    assert (output.finished, output.finish_reason, output.num_output_tokens) == (True, "length", 10)
    assert core.stats().steps == 10


def test_a_window_stops_at_the_duration_limit() -> None:
    cores = [EngineCore(small_config()) for _ in range(2)]
    for core in cores:
        core.add_request(EngineRequest("r", list(range(6)), max_tokens=50))
        core.step()
    single = [cores[0].step().duration_s for _ in range(3)]  # the third one needs a block
    limit = single[0] + single[1] + single[2] / 2
    result = cores[1].step(max_decode_steps=100, max_duration_s=limit)
    assert len(result.outputs[0].new_token_ids) == 3  # the third step crosses the limit
    assert result.duration_s == pytest.approx(sum(single))
    assert single[2] > single[0]


def test_no_window_while_a_request_could_be_admitted() -> None:
    core = EngineCore(small_config())
    core.add_request(EngineRequest("a", list(range(6)), max_tokens=10))
    core.step()
    core.add_request(EngineRequest("b", list(range(100, 116)), max_tokens=10))
    result = core.step(max_decode_steps=100)  # "b" is admitted in this very step
    assert [(o.request_id, len(o.new_token_ids)) for o in result.outputs] == [("a", 1), ("b", 1)]


def _blocked_head_core() -> EngineCore:
    # 10 blocks, 5 kept free: "b" (4 blocks) waits while "a" holds 2 and grows.
    core = EngineCore(small_config(num_gpu_blocks=10, watermark=0.5))
    core.add_request(EngineRequest("a", list(range(6)), max_tokens=10))
    core.add_request(EngineRequest("b", list(range(100, 116)), max_tokens=10))
    core.step()
    return core


def test_a_window_while_the_head_waits_for_blocks() -> None:
    single, window = _blocked_head_core(), _blocked_head_core()
    assert window.num_waiting == 1
    result = window.step(max_decode_steps=100)  # runs until "a" finishes
    assert [(o.request_id, len(o.new_token_ids), o.finished) for o in result.outputs] == [
        ("a", 9, True)
    ]
    singles = [single.step() for _ in range(9)]
    assert [len(s.outputs) for s in singles] == [1] * 9
    assert singles[-1].outputs[0].finished
    assert result.duration_s == pytest.approx(sum(s.duration_s for s in singles))
    assert window.block_manager.cached_hashes() == single.block_manager.cached_hashes()
    assert window.block_manager.free_queue() == single.block_manager.free_queue()
    assert window.stats() == single.stats()
    assert window.step().outputs[0].request_id == single.step().outputs[0].request_id == "b"


def _head_with_cached_prefix() -> EngineCore:
    core = EngineCore(small_config(num_gpu_blocks=8))
    shared = list(range(200, 208))  # two blocks, cached by "p" and then freed
    core.add_request(EngineRequest("p", [*shared, 1], max_tokens=1))
    core.step()
    core.add_request(EngineRequest("a", list(range(6)), max_tokens=26))
    core.step()
    # "b" needs 5 new blocks plus its 2 cached ones: more than the 6 free.
    core.add_request(EngineRequest("b", [*shared, *range(300, 320)], max_tokens=3))
    return core


def test_a_window_stops_before_evicting_the_heads_cached_prefix() -> None:
    window, single = _head_with_cached_prefix(), _head_with_cached_prefix()
    assert window.block_manager.free_queue() == [5, 6, 7, 2, 1, 0]
    result = window.step(max_decode_steps=100)
    # "a" takes a block at steps 3, 7, 11, 15 and 19; the fifth would evict block 1,
    # the head's cached prefix, so the window ends after step 18.
    assert [(o.request_id, len(o.new_token_ids)) for o in result.outputs] == [("a", 18)]
    assert window.num_waiting == 1
    for _ in range(18):
        single.step()
    assert window.block_manager.free_queue() == single.block_manager.free_queue() == [1, 0]
    assert window.stats() == single.stats()
    # Step 19 evicts block 1 on its own; afterwards windows resume up to the next block.
    assert [len(o.new_token_ids) for o in window.step(max_decode_steps=100).outputs] == [1]
    assert [len(o.new_token_ids) for o in window.step(max_decode_steps=100).outputs] == [3]


def test_a_window_while_every_slot_is_taken() -> None:
    core = EngineCore(small_config(max_num_seqs=1))
    core.add_request(EngineRequest("a", list(range(6)), max_tokens=10))
    core.add_request(EngineRequest("b", list(range(6)), max_tokens=10))
    core.step()
    result = core.step(max_decode_steps=100)  # "b" cannot start before "a" finishes
    assert [(o.request_id, len(o.new_token_ids), o.finished) for o in result.outputs] == [
        ("a", 9, True)
    ]
    assert core.step().outputs[0].request_id == "b"


def test_no_window_while_a_request_prefills() -> None:
    core = EngineCore(small_config(max_num_batched_tokens=8))
    core.add_request(EngineRequest("a", list(range(4)), max_tokens=10))
    core.step()
    core.add_request(EngineRequest("b", list(range(100, 130)), max_tokens=10))
    core.step()  # "b" starts its chunked prefill
    result = core.step(max_decode_steps=100)
    assert [len(o.new_token_ids) for o in result.outputs] == [1]


def _decoding_core(sparse: bool = False) -> EngineCore:
    core = EngineCore(small_config(), sparse_outputs=sparse)
    core.add_request(EngineRequest("a", list(range(6)), max_tokens=20))
    core.add_request(EngineRequest("b", list(range(50, 59)), max_tokens=12))
    core.step()
    return core


def test_a_planned_window_is_committed_piece_by_piece() -> None:
    lazy, single = _decoding_core(), _decoding_core()
    durations = lazy.plan_window(100)
    assert len(durations) == 11  # "b" finishes at the 11th step
    single_durations = []
    for _ in range(11):
        single_durations.append(single.step().duration_s)
    assert durations == single_durations  # each step timed exactly as a single step
    first = lazy.commit_window(4)
    assert lazy.plan_window(100) == durations[4:]  # the rest of the plan still holds
    rest = lazy.commit_window(7)
    assert first.duration_s == pytest.approx(sum(durations[:4]))
    assert [(o.request_id, len(o.new_token_ids)) for o in first.outputs] == [("a", 4), ("b", 4)]
    assert [(o.request_id, o.finished) for o in rest.outputs] == [("a", False), ("b", True)]
    a, b = lazy.stats(), single.stats()
    assert replace(a, busy_s=0.0) == replace(b, busy_s=0.0)
    assert a.busy_s == pytest.approx(b.busy_s)
    assert set(lazy.block_manager.cached_hashes()) == set(single.block_manager.cached_hashes())
    assert _free_contents(lazy) == _free_contents(single)


def test_sparse_windows_report_only_finishes() -> None:
    core = _decoding_core(sparse=True)
    assert core.commit_window(3).outputs == []
    (output,) = core.commit_window(8).outputs
    assert (output.request_id, output.finished, output.num_output_tokens) == ("b", True, 12)
    assert len(output.new_token_ids) == 11  # every token since its first output


def test_committing_more_than_the_plan_is_refused() -> None:
    core = _decoding_core()
    with pytest.raises(ValueError, match="12 steps"):
        core.commit_window(12)
    core.add_request(EngineRequest("c", [1, 2, 3], max_tokens=2))
    assert core.plan_window(100) == []  # "c" can be admitted: no window


def test_windows_around_a_finish_that_frees_the_heads_prefix_match_single_steps() -> None:
    # "b" shares "a"'s first block and waits for blocks; "a" finishes inside a window.
    def build() -> EngineCore:
        core = EngineCore(small_config(num_gpu_blocks=8))
        core.add_request(EngineRequest("a", list(range(6)), max_tokens=3))
        core.add_request(EngineRequest("k", list(range(50, 56)), max_tokens=12))
        core.step()
        core.add_request(EngineRequest("b", [*range(4), *range(100, 116)], max_tokens=2))
        return core

    window, single = build(), build()
    while window.has_unfinished_requests():
        result = window.step(max_decode_steps=100)
        for _ in range(max(len(o.new_token_ids) for o in result.outputs) if result.outputs else 1):
            single.step()
        assert window.num_waiting == single.num_waiting
        assert window.stats().steps == single.stats().steps
    assert window.stats().prefix_cache_hits == single.stats().prefix_cache_hits
