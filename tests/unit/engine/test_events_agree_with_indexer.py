"""An indexer fed only by a worker's events agrees with that worker's actual cache.

The path is the real one: engine events -> ``encode_batch`` (both wire forms) ->
``VllmEventDecoder`` -> ``RouterEvent`` -> ``KvIndexer.apply_event``, or the engine's
structs handed to ``VllmEventDecoder.convert`` as the simulator does. Requests carry
LoRA adapters and cache salts: the router's hashes of a prompt under the same adapter
and salt must find exactly what the worker would reuse, and nothing across salts.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvrouter.engine import EngineCore
from kvrouter.engine.block_manager import engine_hash_seed, engine_root_hash, hash_token_blocks
from kvrouter.events.model import RouterEvent, WorkerKey
from kvrouter.events.vllm import KVEventBatch, VllmEventDecoder, encode_batch
from kvrouter.hashing import compute_block_hashes, make_salt
from kvrouter.index import KvIndexer

from .helpers import RandomWorkload, small_config

WORKER = WorkerKey(worker_id=3, dp_rank=1)


def engine_prefix_blocks(
    core: EngineCore, tokens: list[int], lora: str | None, cache_salt: str | None
) -> int:
    """How many leading blocks of ``tokens`` the engine's cache holds right now."""
    size = core.config.block_size
    hashes = hash_token_blocks(
        tokens,
        0,
        len(tokens) // size,
        block_size=size,
        parent_hash=engine_root_hash(cache_salt),
        seed=engine_hash_seed(lora),
    )
    return len(core.block_manager.find_cached_prefix(hashes, len(hashes)))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_gpu_blocks=st.sampled_from([12, 24]),
    form=st.sampled_from(["array", "map", "map-batch", "direct"]),
)
def test_indexer_agrees_with_the_workers_cache(seed: int, num_gpu_blocks: int, form: str) -> None:
    config = small_config(num_gpu_blocks=num_gpu_blocks, max_num_batched_tokens=16, dp_rank=1)
    core = EngineCore(config, worker_id=WORKER.worker_id)
    indexer = KvIndexer(block_size=config.block_size)
    decoder = VllmEventDecoder(block_size=config.block_size)
    workload = RandomWorkload(seed, config)
    event_id = 0
    matched = 0
    for step, result in enumerate(workload.drive(core, 120)):
        if result.kv_events:
            sent = KVEventBatch(float(step), result.kv_events, config.dp_rank)
            if form == "direct":
                batch = decoder.convert(sent)
            else:
                batch = decoder.decode(encode_batch(sent, form=form))  # type: ignore[arg-type]
            assert batch.errors == []
            for data in batch.events:
                assert indexer.apply_event(
                    RouterEvent(WORKER.worker_id, batch.dp_rank, event_id, data)
                )
                event_id += 1
        assert indexer.tree_size(WORKER) == core.block_manager.num_cached_blocks
        if step % 10 == 0:
            matched += check_every_prompt(core, indexer, workload)
    check_every_prompt(core, indexer, workload)
    assert indexer.stats().events_rejected == 0
    assert matched > 0, "the workload never produced a cache hit to compare"


def check_every_prompt(core: EngineCore, indexer: KvIndexer, workload: RandomWorkload) -> int:
    """Compare every prompt seen so far; returns the number of blocks matched."""
    size = core.config.block_size
    total = 0
    for tokens, lora, cache_salt in workload.prompts:
        salt = make_salt(lora_name=lora) if lora else None
        local = compute_block_hashes(tokens, size, salt=salt, cache_salt=cache_salt)
        routed = indexer.find_matches(local).scores.get(WORKER, 0)
        assert routed == engine_prefix_blocks(core, tokens, lora, cache_salt)
        total += routed
    return total
