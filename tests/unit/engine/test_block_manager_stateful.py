"""The block manager held against a naive model (lists and dicts) by Hypothesis."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvrouter.engine.block_manager import (
    ROOT_PARENT_HASH,
    BlockManager,
    engine_hash_seed,
    hash_token_blocks,
)

from .helpers import replay

BS = 2
NUM_BLOCKS = 6


def tokens_of(contents: list[int]) -> list[int]:
    # A tiny alphabet of block contents, so requests share prefixes and duplicates happen.
    return [token for content in contents for token in (content, content + 10)]


def hashes_of(contents: list[int]) -> list[int]:
    return hash_token_blocks(
        tokens_of(contents),
        0,
        len(contents),
        block_size=BS,
        parent_hash=ROOT_PARENT_HASH,
        seed=engine_hash_seed(None),
    )


@dataclass
class NaiveCache:
    free: list[int] = field(default_factory=lambda: list(range(NUM_BLOCKS)))
    ref: list[int] = field(default_factory=lambda: [0] * NUM_BLOCKS)
    hash_of: dict[int, int] = field(default_factory=dict)

    def cached(self) -> dict[int, int]:
        return {h: b for b, h in self.hash_of.items()}

    def allocate(self, n: int) -> list[int]:
        out = self.free[:n]
        del self.free[:n]
        for block in out:
            self.hash_of.pop(block, None)
            self.ref[block] = 1
        return out

    def touch(self, block: int) -> None:
        if self.ref[block] == 0:
            self.free.remove(block)
        self.ref[block] += 1

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free.append(block)


@dataclass
class Req:
    contents: list[int]
    blocks: list[int]
    num_cached: int


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BS)
        self.model = NaiveCache()
        self.requests: list[Req] = []
        self.replayed: dict[int, list[int]] = {}

    @rule(contents=st.lists(st.integers(0, 2), min_size=1, max_size=4))
    def start_request(self, contents: list[int]) -> None:
        hashes = hashes_of(contents)
        cached = self.model.cached()
        expected_hits: list[int] = []
        for block_hash in hashes:
            if block_hash not in cached:
                break
            expected_hits.append(cached[block_hash])
        hits = self.bm.find_cached_prefix(hashes, len(hashes))
        assert hits == expected_hits
        needed = len(contents) - len(hits)
        taken = needed + sum(1 for b in hits if self.model.ref[b] == 0)
        assert self.bm.count_unreferenced(hits) == taken - needed
        if taken > len(self.model.free):
            return  # no room: a scheduler would leave the request waiting
        self.bm.touch(hits)
        for block in hits:
            self.model.touch(block)
        new = self.bm.allocate(needed)
        assert new == self.model.allocate(needed)
        self.requests.append(Req(contents, hits + new, len(hits)))

    @rule(n=st.integers(1, NUM_BLOCKS + 1))
    def allocate_too_many_is_refused_or_served(self, n: int) -> None:
        if n > len(self.model.free):
            assert self.bm.allocate(n) is None
            return
        blocks = self.bm.allocate(n)
        assert blocks == self.model.allocate(n)
        self.requests.append(Req([], blocks, 0))  # scratch blocks, never cached

    @precondition(lambda self: any(r.num_cached < len(r.contents) for r in self.requests))
    @rule(data=st.data())
    def fill_next_block(self, data: st.DataObject) -> None:
        candidates = [r for r in self.requests if r.num_cached < len(r.contents)]
        req = data.draw(st.sampled_from(candidates))
        index = req.num_cached
        hashes = hashes_of(req.contents)
        existing = self.model.cached().get(hashes[index])
        own = req.blocks[index]
        self.bm.cache_full_blocks(
            req.blocks, index, index + 1, block_hashes=hashes, token_ids=tokens_of(req.contents)
        )
        if existing is None:
            self.model.hash_of[own] = hashes[index]
            assert req.blocks[index] == own
        else:
            # Adoption: the request now shares the cached block; its copy is free first.
            self.model.touch(existing)
            self.model.ref[own] = 0
            self.model.free.insert(0, own)
            assert req.blocks[index] == existing
        req.num_cached += 1

    @precondition(lambda self: bool(self.requests))
    @rule(data=st.data())
    def finish_request(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.requests))
        self.requests.remove(req)
        self.bm.free(req.blocks)
        self.model.release(req.blocks)

    @rule()
    def clear(self) -> None:
        cleared = self.bm.clear()
        assert cleared == (not self.requests or all(not r.blocks for r in self.requests))
        if cleared:
            self.model = NaiveCache()

    @invariant()
    def matches_the_model(self) -> None:
        assert self.bm.free_queue() == self.model.free
        assert [self.bm.ref_count(b) for b in range(NUM_BLOCKS)] == self.model.ref
        assert self.bm.cached_hashes() == self.model.cached()
        assert self.bm.num_used_blocks == NUM_BLOCKS - len(self.model.free)

    @invariant()
    def events_replay_to_the_cached_set(self) -> None:
        replay(self.bm.drain_events(), self.replayed)
        assert set(self.replayed) == set(self.bm.cached_hashes())


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
