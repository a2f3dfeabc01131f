"""The engine core: scheduling rules, outputs, timing of steps, metrics and stats."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from kvrouter.engine import (
    DefaultTiming,
    EngineConfig,
    EngineCore,
    EngineRequest,
    RequestOutput,
    StepResult,
    TableTiming,
)
from kvrouter.errors import ConfigError
from kvrouter.events.vllm import (
    AllBlocksCleared,
    BlockStored,
    KVEventBatch,
    VllmEventDecoder,
    encode_batch,
)
from kvrouter.load.metrics import ForwardPassMetrics

from .helpers import run_to_completion, small_config

T = DefaultTiming()


def prompt(start: int, length: int) -> list[int]:
    return list(range(start, start + length))


def outputs_by_request(results: list[StepResult]) -> dict[str, list[RequestOutput]]:
    by_request: dict[str, list[RequestOutput]] = {}
    for result in results:
        for output in result.outputs:
            by_request.setdefault(output.request_id, []).append(output)
    return by_request


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [token for output in outputs for token in output.new_token_ids]


# -- a single request ----------------------------------------------------------------


def test_prefill_then_decode_until_length() -> None:
    core = EngineCore(small_config(), worker_id=7)
    core.add_request(EngineRequest("r1", prompt(0, 10), max_tokens=3))
    first = core.step()
    assert first.duration_s == pytest.approx(T.prefill_ms(10) / 1000)
    (out,) = first.outputs
    assert (out.request_id, out.finished, out.finish_reason) == ("r1", False, None)
    assert (out.num_prompt_tokens, out.num_cached_tokens, out.num_output_tokens) == (10, 0, 1)
    # Two full blocks were computed; the partial third is not published.
    assert [type(e) for e in first.kv_events] == [BlockStored]
    assert first.kv_events[0].token_ids == prompt(0, 8)  # type: ignore[union-attr]
    second = core.step()  # decode: 11 token slots in 3 of 32 blocks
    assert second.duration_s == pytest.approx(T.decode_ms(3 / 32) / 1000)
    assert second.kv_events == []  # token 11 is computed now; block 3 fills on the next step
    third = core.step()
    (last,) = third.outputs
    assert (last.finished, last.finish_reason, last.num_output_tokens) == (True, "length", 3)
    # Tokens 0..11 computed: the third block became full during decode.
    (stored,) = third.kv_events
    assert isinstance(stored, BlockStored)
    assert stored.token_ids[:2] == [8, 9]
    assert stored.parent_block_hash == first.kv_events[0].block_hashes[-1]  # type: ignore[union-attr]
    assert not core.has_unfinished_requests()
    assert core.step() == StepResult(0.0, [], [])


def test_output_tokens_are_deterministic_and_within_vocab() -> None:
    def generate(request_id: str, vocab_size: int = 50) -> list[int]:
        core = EngineCore(small_config(vocab_size=vocab_size))
        core.add_request(EngineRequest(request_id, prompt(0, 5), max_tokens=20))
        return tokens_of(outputs_by_request(run_to_completion(core))[request_id])

    tokens = generate("a")
    assert len(tokens) == 20
    assert tokens == generate("a")
    assert tokens != generate("b")
    assert all(0 <= t < 50 for t in tokens)
    assert len(set(tokens)) > 5


def test_min_tokens_and_ignore_eos_are_trivially_satisfied() -> None:
    core = EngineCore(small_config())
    core.add_request(EngineRequest("r", prompt(0, 5), max_tokens=4, min_tokens=4, ignore_eos=True))
    outputs = outputs_by_request(run_to_completion(core))["r"]
    assert [o.num_output_tokens for o in outputs] == [1, 2, 3, 4]
    assert outputs[-1].finish_reason == "length"


def test_speedup_ratio_divides_every_duration() -> None:
    core = EngineCore(small_config(speedup_ratio=4.0))
    core.add_request(EngineRequest("r", prompt(0, 10), max_tokens=2))
    assert core.step().duration_s == pytest.approx(T.prefill_ms(10) / 4000)
    assert core.step().duration_s == pytest.approx(T.decode_ms(3 / 32) / 4000)


def test_numpy_prompts_are_accepted() -> None:
    core = EngineCore(small_config())
    core.add_request(EngineRequest("r", np.arange(10, dtype=np.uint32), max_tokens=1))
    result = core.step()
    assert result.outputs[0].finished
    stored = result.kv_events[0]
    assert isinstance(stored, BlockStored)
    # The event holds a slice of the prompt as given (no copy) ...
    assert isinstance(stored.token_ids, np.ndarray)
    assert stored.token_ids.tolist() == prompt(0, 8)
    # ... and goes on the wire as plain msgpack ints.
    wire = msgspec.msgpack.decode(encode_batch(KVEventBatch(0.0, [stored])))
    assert wire[1][0][3] == prompt(0, 8)
    decoded = VllmEventDecoder(block_size=4).decode(encode_batch(KVEventBatch(0.0, [stored])))
    assert (
        decoded.events == VllmEventDecoder(block_size=4).convert(KVEventBatch(0.0, [stored])).events
    )


# -- scheduling ------------------------------------------------------------------------


def test_chunked_prefill_across_steps() -> None:
    core = EngineCore(small_config(max_num_batched_tokens=8))
    core.add_request(EngineRequest("r", prompt(0, 20), max_tokens=1))
    durations, stored = [], []
    for _ in range(3):
        result = core.step()
        durations.append(result.duration_s)
        stored.append([len(e.block_hashes) for e in result.kv_events])  # type: ignore[union-attr]
        if result.outputs:
            break
    assert durations == pytest.approx([T.prefill_ms(n) / 1000 for n in (8, 8, 4)])
    assert stored == [[2], [2], [1]]
    assert result.outputs[0].finished
    assert core.stats().prefill_tokens_computed == 20


def test_token_budget_is_shared_by_decodes_and_a_prefill_chunk() -> None:
    core = EngineCore(small_config(max_num_batched_tokens=8))
    core.add_request(EngineRequest("a", prompt(0, 4), max_tokens=10))
    core.add_request(EngineRequest("b", prompt(100, 4), max_tokens=10))
    core.step()  # both prefilled (4 + 4 tokens)
    core.add_request(EngineRequest("c", prompt(200, 20), max_tokens=10))
    mixed = core.step()  # a, b decode (1 + 1), c prefills a 6-token chunk
    used = 2 + 2 + 2  # a and b: 5 slots each -> 2 blocks; c: 6 slots -> 2 blocks
    assert mixed.duration_s == pytest.approx((T.prefill_ms(6) + T.decode_ms(used / 32)) / 1000)
    assert sorted(o.request_id for o in mixed.outputs) == ["a", "b"]
    assert core.stats().prefill_tokens_computed == 8 + 6


def test_max_num_seqs_limits_the_batch() -> None:
    core = EngineCore(small_config(max_num_seqs=2))
    for index in range(3):
        core.add_request(EngineRequest(f"r{index}", prompt(index * 100, 5), max_tokens=2))
    core.step()
    assert (core.num_running, core.num_waiting) == (2, 1)
    core.step()  # r0 and r1 finish
    assert (core.num_running, core.num_waiting) == (0, 1)
    result = core.step()
    assert [o.request_id for o in result.outputs] == ["r2"]


def test_fcfs_order_of_admission() -> None:
    core = EngineCore(small_config(max_num_seqs=1))
    for index in range(5):
        core.add_request(EngineRequest(f"r{index}", prompt(index * 50, 6), max_tokens=2))
    finished = [o.request_id for r in run_to_completion(core) for o in r.outputs if o.finished]
    assert finished == ["r0", "r1", "r2", "r3", "r4"]


def test_watermark_holds_new_requests_back() -> None:
    core = EngineCore(small_config(num_gpu_blocks=10, watermark=0.5))  # keep 5 blocks free
    core.add_request(EngineRequest("a", prompt(0, 8), max_tokens=3))
    core.add_request(EngineRequest("b", prompt(100, 16), max_tokens=1))
    core.step()  # a: 2 blocks; b would leave 10 - 2 - 4 = 4 free < 5
    assert (core.num_running, core.num_waiting) == (1, 1)
    core.step()
    assert (core.num_running, core.num_waiting) == (1, 1)
    core.step()  # a finishes
    result = core.step()  # nothing running: b is admitted
    assert [o.request_id for o in result.outputs] == ["b"]


def test_preemption_by_recompute_then_everything_completes() -> None:
    # 6 blocks of 4 slots; each request needs up to 5 blocks: they cannot both fit.
    core = EngineCore(small_config(num_gpu_blocks=6))
    core.add_request(EngineRequest("old", prompt(0, 8), max_tokens=10))
    core.add_request(EngineRequest("new", prompt(100, 8), max_tokens=10))
    results = run_to_completion(core)
    stats = core.stats()
    assert stats.preemptions >= 1
    assert (stats.requests_finished, stats.num_running, stats.num_waiting) == (2, 0, 0)
    outputs = outputs_by_request(results)
    for request_id in ("old", "new"):
        counts = [o.num_output_tokens for o in outputs[request_id]]
        assert counts == list(range(1, 11)), "every token exactly once, in order"
        assert outputs[request_id][-1].finish_reason == "length"
    # The oldest request is never the victim: it finishes first.
    finished = [o.request_id for r in results for o in r.outputs if o.finished]
    assert finished == ["old", "new"]
    # A preempted request produces the same tokens as one never preempted.
    alone = EngineCore(small_config())
    alone.add_request(EngineRequest("new", prompt(100, 8), max_tokens=10))
    assert tokens_of(outputs["new"]) == tokens_of(
        outputs_by_request(run_to_completion(alone))["new"]
    )
    assert core.block_manager.num_used_blocks == 0


def test_the_newest_running_request_is_the_victim() -> None:
    core = EngineCore(small_config(num_gpu_blocks=4))  # 4 blocks of 4 slots
    core.add_request(EngineRequest("a", prompt(0, 6), max_tokens=8))  # 2 blocks
    core.add_request(EngineRequest("b", prompt(100, 3), max_tokens=8))  # 1 block
    core.add_request(EngineRequest("c", prompt(200, 3), max_tokens=8))  # 1 block
    core.step()  # all admitted, no block free
    core.step()  # slots 6 / 3 / 3: no new blocks
    assert core.stats().preemptions == 0
    result = core.step()  # "b" needs a block for slot 4: the newest, "c", gives way
    assert core.stats().preemptions == 1
    assert [r.request_id for r in core._scheduler.running] == ["a", "b"]
    assert [r.request_id for r in core._scheduler.waiting] == ["c"]
    assert sorted(o.request_id for o in result.outputs) == ["a", "b"]


def test_a_preempted_request_is_readmitted_at_the_head_of_the_queue() -> None:
    core = EngineCore(small_config(num_gpu_blocks=6, max_num_seqs=2))
    core.add_request(EngineRequest("a", prompt(0, 8), max_tokens=10))
    core.add_request(EngineRequest("b", prompt(100, 8), max_tokens=10))
    core.add_request(EngineRequest("c", prompt(200, 4), max_tokens=1))
    while core.stats().preemptions == 0:
        core.step()
    scheduler = core._scheduler
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]


# -- prefix caching ------------------------------------------------------------------


def test_prefix_hits_on_admission_keep_at_least_one_token_to_compute() -> None:
    core = EngineCore(small_config())
    base = prompt(0, 12)
    core.add_request(EngineRequest("a", base, max_tokens=1))
    run_to_completion(core)
    core.add_request(EngineRequest("same", base, max_tokens=1))
    result = core.step()
    # 12 tokens = 3 full blocks cached, but the last token must be computed: 2 blocks hit.
    assert result.outputs[0].num_cached_tokens == 8
    assert result.duration_s == pytest.approx(T.prefill_ms(4) / 1000)
    core.add_request(EngineRequest("longer", [*base, 1, 2, 3], max_tokens=2))
    outputs = outputs_by_request(run_to_completion(core))["longer"]
    assert [o.num_cached_tokens for o in outputs] == [12, 12]
    stats = core.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (12 + 12 + 15, 8 + 12)
    assert core.metrics().gpu_prefix_cache_hit_rate == pytest.approx(20 / 39)


def test_lora_requests_do_not_share_the_base_models_cache() -> None:
    core = EngineCore(small_config())
    core.add_request(EngineRequest("base", prompt(0, 12), max_tokens=1))
    run_to_completion(core)
    core.add_request(EngineRequest("lora", prompt(0, 12), max_tokens=1, lora_name="sql"))
    result = core.step()
    assert result.outputs[0].num_cached_tokens == 0
    (stored,) = result.kv_events
    assert isinstance(stored, BlockStored)
    assert stored.lora_name == "sql"


def test_without_prefix_caching_there_are_no_hits_and_no_events() -> None:
    core = EngineCore(small_config(enable_prefix_caching=False))
    for index in range(2):
        core.add_request(EngineRequest(f"r{index}", prompt(0, 12), max_tokens=3))
    results = run_to_completion(core)
    assert all(not r.kv_events for r in results)
    assert all(o.num_cached_tokens == 0 for r in results for o in r.outputs)


# -- abort, clear, validation ----------------------------------------------------------


def test_abort_frees_blocks_and_reports_with_the_next_step() -> None:
    core = EngineCore(small_config())
    core.add_request(EngineRequest("run", prompt(0, 10), max_tokens=50))
    core.add_request(EngineRequest("wait", prompt(100, 10), max_tokens=50))
    core.step()
    assert core.abort_request("run") is True
    assert core.abort_request("run") is False
    assert core.abort_request("unknown") is False
    assert core.block_manager.num_used_blocks == 3  # only "wait"'s blocks
    assert core.abort_request("wait") is True
    assert core.has_unfinished_requests()  # the abort outputs are still to be delivered
    result = core.step()
    assert result.duration_s == 0.0
    assert [(o.request_id, o.finished, o.finish_reason) for o in result.outputs] == [
        ("run", True, "abort"),
        ("wait", True, "abort"),
    ]
    assert result.outputs[0].num_output_tokens == 1
    assert not core.has_unfinished_requests()
    assert core.stats().requests_aborted == 2


def test_clear_cache_only_when_idle() -> None:
    core = EngineCore(small_config())
    core.add_request(EngineRequest("r", prompt(0, 10), max_tokens=2))
    core.step()
    assert core.clear_cache() is False
    run_to_completion(core)
    assert core.clear_cache() is True
    assert core.has_unfinished_requests()
    assert core.step() == StepResult(0.0, [], [AllBlocksCleared()])
    assert core.stats().blocks_cached == 0


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (EngineRequest("dup", [1, 2], max_tokens=1), "already"),
        (EngineRequest("empty", [], max_tokens=1), "empty prompt"),
        (EngineRequest("zero", [1], max_tokens=0), "max_tokens"),
        (EngineRequest("big", list(range(120)), max_tokens=10), "token slots"),
        (EngineRequest("neg", [1, -2], max_tokens=1), "token ids"),
    ],
)
def test_requests_that_can_never_run_are_refused(request_: EngineRequest, message: str) -> None:
    core = EngineCore(small_config())  # 32 blocks x 4 = 128 slots
    core.add_request(EngineRequest("dup", [1, 2], max_tokens=1))
    with pytest.raises(ValueError, match=message):
        core.add_request(request_)


@pytest.mark.parametrize(
    "overrides",
    [{"block_size": 0}, {"watermark": 1.0}, {"speedup_ratio": 0.0}, {"vocab_size": 1}],
)
def test_bad_configs_are_rejected(overrides: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        EngineConfig(**overrides)  # type: ignore[arg-type]


# -- reporting -------------------------------------------------------------------------


def test_metrics_snapshot() -> None:
    core = EngineCore(small_config(max_num_seqs=1, dp_rank=2), worker_id=5)
    core.add_request(EngineRequest("a", prompt(0, 10), max_tokens=4))
    core.add_request(EngineRequest("b", prompt(100, 10), max_tokens=4))
    core.step()
    assert core.metrics() == ForwardPassMetrics(
        worker_id=5,
        request_active_slots=1,
        request_total_slots=1,
        num_requests_waiting=1,
        kv_active_blocks=3,
        kv_total_blocks=32,
        gpu_cache_usage_perc=3 / 32,
        gpu_prefix_cache_hit_rate=0.0,
        data_parallel_rank=2,
    )


def test_stats_snapshot_after_a_run() -> None:
    core = EngineCore(small_config())
    core.add_request(EngineRequest("a", prompt(0, 10), max_tokens=3))
    results = run_to_completion(core)
    stats = core.stats()
    assert stats.steps == 3
    assert stats.busy_s == pytest.approx(sum(r.duration_s for r in results))
    assert (stats.requests_added, stats.requests_finished, stats.output_tokens) == (1, 1, 3)
    assert (stats.blocks_total, stats.blocks_used, stats.blocks_free) == (32, 0, 32)
    assert (stats.blocks_cached, stats.blocks_stored, stats.blocks_evicted) == (3, 3, 0)
    assert core.config.block_size == 4


def test_the_timing_model_is_pluggable() -> None:
    timing = TableTiming(prefill=[(0, 100.0), (100, 200.0)], decode=[(0.0, 10.0), (1.0, 20.0)])
    core = EngineCore(small_config(), timing=timing)
    core.add_request(EngineRequest("r", prompt(0, 10), max_tokens=2))
    assert core.step().duration_s == pytest.approx(0.110)  # 100 + 10 tokens * 1 ms
    assert core.step().duration_s == pytest.approx((10.0 + 10.0 * 3 / 32) / 1000)
