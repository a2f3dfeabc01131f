"""A core's KV events, replayed into a plain dict, always equal its cached blocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvrouter.engine import EngineCore

from .helpers import RandomWorkload, replay, small_config


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_gpu_blocks=st.sampled_from([12, 20, 40]))
def test_replayed_events_equal_the_cached_set(seed: int, num_gpu_blocks: int) -> None:
    config = small_config(num_gpu_blocks=num_gpu_blocks, max_num_batched_tokens=16)
    core = EngineCore(config)
    workload = RandomWorkload(seed, config)
    model: dict[int, list[int]] = {}
    for result in workload.drive(core, 150):
        replay(result.kv_events, model)
        assert set(model) == set(core.block_manager.cached_hashes())


def test_random_workloads_do_evict_and_preempt() -> None:
    """The workload above is not vacuous: it exercises evictions and preemptions."""
    config = small_config(num_gpu_blocks=12, max_num_batched_tokens=16)
    core = EngineCore(config)
    for _ in RandomWorkload(7, config).drive(core, 300):
        pass
    stats = core.stats()
    assert stats.blocks_evicted > 0
    assert stats.preemptions > 0
    assert stats.requests_aborted > 0
    assert stats.blocks_deduplicated > 0
