"""Shared helpers for the engine tests."""

from __future__ import annotations

from collections.abc import Iterator

from kvrouter.engine import EngineConfig, EngineCore, EngineRequest, StepResult
from kvrouter.engine.block_manager import engine_hash_seed, engine_root_hash, hash_token_blocks
from kvrouter.events.vllm import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent


def small_config(**overrides: object) -> EngineConfig:
    """A tiny engine: 4-token blocks, so tests can reason block by block."""
    values: dict[str, object] = {
        "block_size": 4,
        "num_gpu_blocks": 32,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 64,
        "watermark": 0.0,
    }
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


def run_to_completion(core: EngineCore, max_steps: int = 10_000) -> list[StepResult]:
    """Step until the engine has nothing left; fail if it never gets there."""
    results: list[StepResult] = []
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            return results
        results.append(core.step())
    raise AssertionError(f"engine still busy after {max_steps} steps")


def _announced_cache_salt(event: BlockStored) -> str | None:
    """The cache salt a chain's first event lists last among block 0's extra keys."""
    keys = event.extra_keys[0] if event.extra_keys else None
    if not keys or len(keys) == (1 if event.lora_name else 0):
        return None
    salt = keys[-1]
    assert isinstance(salt, str)
    return salt


def replay(events: list[KVCacheEvent], model: dict[int, list[int]]) -> None:
    """Apply engine KV events to a naive model: engine hash -> the block's token ids."""
    for event in events:
        if isinstance(event, BlockStored):
            size = event.block_size
            if event.parent_block_hash is not None:
                assert event.parent_block_hash in model, "stored under an unknown parent"
            assert len(event.token_ids) == size * len(event.block_hashes)
            # The announced tokens are exactly what the announced hashes were made from.
            assert event.block_hashes == hash_token_blocks(
                event.token_ids,
                0,
                len(event.block_hashes),
                block_size=size,
                parent_hash=(
                    engine_root_hash(_announced_cache_salt(event))
                    if event.parent_block_hash is None
                    else event.parent_block_hash
                ),
                seed=engine_hash_seed(event.lora_name),
            )
            for index, block_hash in enumerate(event.block_hashes):
                assert block_hash not in model, "stored twice without a removal"
                model[block_hash] = event.token_ids[index * size : (index + 1) * size]
        elif isinstance(event, BlockRemoved):
            for block_hash in event.block_hashes:
                assert block_hash in model, "removed a block that was never stored"
                del model[block_hash]
        elif isinstance(event, AllBlocksCleared):
            model.clear()
        else:  # pragma: no cover - the union is closed
            raise AssertionError(f"unexpected event {event!r}")


class RandomWorkload:
    """Random requests over a few shared prefixes, on a cache small enough to evict and
    preempt; with aborts, LoRA requests, cache salts and cache clears. Deterministic per
    seed."""

    LORAS = (None, None, None, "sql")
    CACHE_SALTS = (None, None, None, "tenant-a", "tenant-b")

    def __init__(self, seed: int, config: EngineConfig) -> None:
        import random

        self.rng = random.Random(seed)
        self.config = config
        self.prefixes = [
            [self.rng.randrange(1000) for _ in range(self.rng.randrange(1, 4) * config.block_size)]
            for _ in range(3)
        ]
        self.prompts: list[tuple[list[int], str | None, str | None]] = []
        self.next_id = 0

    def new_request(self) -> EngineRequest:
        rng = self.rng
        tail = [rng.randrange(1000) for _ in range(rng.randrange(1, 3 * self.config.block_size))]
        tokens = [*rng.choice(self.prefixes), *tail]
        lora = rng.choice(self.LORAS)
        cache_salt = rng.choice(self.CACHE_SALTS)
        self.prompts.append((tokens, lora, cache_salt))
        self.next_id += 1
        return EngineRequest(
            f"w{self.next_id}",
            tokens,
            rng.randrange(1, 12),
            lora_name=lora,
            cache_salt=cache_salt,
        )

    def drive(self, core: EngineCore, num_steps: int) -> Iterator[StepResult]:
        """Step ``core`` ``num_steps`` times, adding, aborting and clearing at random."""
        rng = self.rng
        live: list[str] = []
        for _ in range(num_steps):
            if rng.random() < 0.5:
                request = self.new_request()
                core.add_request(request)
                live.append(request.request_id)
            if live and rng.random() < 0.05:
                core.abort_request(live.pop(rng.randrange(len(live))))
            if rng.random() < 0.02:
                core.clear_cache()
            result = core.step()
            finished = {o.request_id for o in result.outputs if o.finished}
            live = [r for r in live if r not in finished]
            yield result
