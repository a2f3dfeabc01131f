"""Decode windows (``step(max_decode_steps=k)``) reach exactly the state single steps do."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

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


def drive(config: EngineConfig, seed: int, max_decode_steps: int) -> tuple[Trace, EngineCore]:
    """A virtual-time driver: the next arrival bounds every window."""
    core = EngineCore(config)
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


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_gpu_blocks=st.sampled_from([24, 64]),
    max_num_seqs=st.sampled_from([2, 8]),
)
def test_windows_match_single_steps(seed: int, num_gpu_blocks: int, max_num_seqs: int) -> None:
    config = small_config(
        num_gpu_blocks=num_gpu_blocks, max_num_batched_tokens=16, max_num_seqs=max_num_seqs
    )
    single, single_core = drive(config, seed, 1)
    window, window_core = drive(config, seed, 16)
    assert window.tokens == single.tokens
    assert window.cached_tokens == single.cached_tokens
    assert window.first_token_s == pytest.approx(single.first_token_s)
    assert window.finish_s == pytest.approx(single.finish_s)
    assert set(window.cache) == set(single.cache) == set(window_core.block_manager.cached_hashes())
    a, b = single_core.stats(), window_core.stats()
    assert (a.steps, a.output_tokens, a.preemptions) == (b.steps, b.output_tokens, b.preemptions)
    assert a.busy_s == pytest.approx(b.busy_s)
    assert window.num_results < single.num_results  # windows did happen


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
    core = EngineCore(small_config(num_gpu_blocks=10, watermark=0.5))
    core.add_request(EngineRequest("a", list(range(6)), max_tokens=10))
    core.add_request(EngineRequest("b", list(range(100, 116)), max_tokens=10))
    core.step()  # "b" is held back by the watermark, which the next step may lift
    assert core.num_waiting == 1
    result = core.step(max_decode_steps=100)
    assert [len(o.new_token_ids) for o in result.outputs] == [1]


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
