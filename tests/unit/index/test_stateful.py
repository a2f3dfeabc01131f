"""KvIndexer held against a naive model through random interleavings.

The model keeps, per worker and medium, ``{engine_hash: prefix}`` (a prefix is the
tuple of local hashes from the root), plus one insertion-ordered
``{(worker, prefix): expiry_s}`` for predictions (a refresh moves an entry to the end,
unless the entry already expires no earlier: the clock moves in whole seconds, more
than any refresh slack here; pruning drops from the front until ``MAX_PREDICTED`` are
left). A worker's score for a prompt is the largest ``i`` such that it holds every
prefix ``prompt[:1] .. prompt[:i]``. After every step, find_matches is checked for
every prefix any worker holds, each extended by one block nobody holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvrouter.clock import ManualClock
from kvrouter.events.model import Cleared, Removed, RouterEvent, Stored, StoredBlock, WorkerKey
from kvrouter.hashing import compute_sequence_hashes
from kvrouter.index import KvIndexer

WORKERS = [WorkerKey(0, 0), WorkerKey(0, 1), WorkerKey(1, 0), WorkerKey(2, 0)]
MEDIA = ["GPU", "GPU", "CPU"]
TTL_S = 10
MAX_PREDICTED = 5  # small, so that pruning runs often
Prefix = tuple[int, ...]

workers_st = st.sampled_from(WORKERS)
locals_st = st.lists(st.integers(1, 2), min_size=1, max_size=3)


@dataclass
class ModelWorker:
    blocks: dict[str, dict[int, Prefix]] = field(default_factory=dict)
    last_event_id: int | None = None

    def held(self, medium: str) -> set[Prefix]:
        return set(self.blocks.get(medium, {}).values())

    def lookup(self, engine_hash: int, medium: str) -> Prefix | None:
        media = [medium, *(m for m in self.blocks if m != medium)]
        for m in media:
            found = self.blocks.get(m, {}).get(engine_hash)
            if found is not None:
                return found
        return None


def score(held: set[Prefix], prompt: Prefix) -> int:
    depth = 0
    while depth < len(prompt) and prompt[: depth + 1] in held:
        depth += 1
    return depth


class IndexerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.indexer = KvIndexer(
            block_size=16,
            clock=self.clock,
            predicted_ttl_s=TTL_S,
            max_predicted_blocks=MAX_PREDICTED,
        )
        self.model: dict[WorkerKey, ModelWorker] = {}
        # (worker, prefix) -> expiry, oldest (by insertion or refresh) first
        self.predicted: dict[tuple[WorkerKey, Prefix], int] = {}
        self.next_engine_hash = 1000

    def worker(self, key: WorkerKey) -> ModelWorker:
        return self.model.setdefault(key, ModelWorker())

    def next_id(self, key: WorkerKey, id_shift: int) -> tuple[int, bool]:
        """An event id (usually the next one) and whether the model accepts it."""
        last = self.worker(key).last_event_id
        if last is None:
            return 5 + id_shift, True
        event_id = last + 1 + id_shift
        return event_id, event_id > last

    def send(self, key: WorkerKey, event_id: int, data: Stored | Removed | Cleared) -> bool:
        return self.indexer.apply_event(RouterEvent(key.worker_id, key.dp_rank, event_id, data))

    @rule(
        key=workers_st,
        medium=st.sampled_from(MEDIA),
        new=locals_st,
        parent=st.sampled_from(["root", "root", "known", "known", "known", "unknown"]),
        pick=st.integers(0, 20),
        reuse=st.booleans(),
        id_shift=st.sampled_from([0, 0, 0, 0, 2, -1, -2]),
        bad_size=st.integers(0, 15),
    )
    def store(
        self,
        key: WorkerKey,
        medium: str,
        new: list[int],
        parent: str,
        pick: int,
        reuse: bool,
        id_shift: int,
        bad_size: int,
    ) -> None:
        model = self.worker(key)
        event_id, fresh = self.next_id(key, id_shift)
        known = sorted({h for blocks in model.blocks.values() for h in blocks})
        parent_hash = None
        if parent == "known" and known:
            parent_hash = known[pick % len(known)]
        elif parent == "unknown":
            parent_hash = 7 + pick  # engine hashes handed out start at 1000
        base: Prefix | None = () if parent_hash is None else model.lookup(parent_hash, medium)
        blocks = []
        for local in new:
            engine = self.next_engine_hash
            self.next_engine_hash += 1
            held = model.blocks.get(medium, {})
            if reuse and held:
                engine = sorted(held)[local % len(held)]
            blocks.append(StoredBlock(engine, local, medium))
        size = 32 if bad_size == 0 else 16
        ok = self.send(key, event_id, Stored(parent_hash, tuple(blocks), block_size=size))
        expect = fresh and size == 16 and base is not None
        assert ok == expect
        if not fresh:
            return
        model.last_event_id = event_id
        if not expect or base is None:
            return
        prefix = base
        target = model.blocks.setdefault(medium, {})
        for block in blocks:
            prefix = (*prefix, block.local_hash)
            target[block.engine_hash] = prefix
            if medium == "GPU":
                self.predicted.pop((key, prefix), None)

    @rule(
        key=workers_st,
        medium=st.sampled_from(MEDIA),
        picks=st.lists(st.integers(0, 30), max_size=4),
        id_shift=st.sampled_from([0, 0, 0, 1, -1]),
    )
    def remove(self, key: WorkerKey, medium: str, picks: list[int], id_shift: int) -> None:
        model = self.worker(key)
        event_id, fresh = self.next_id(key, id_shift)
        held = sorted(model.blocks.get(medium, {}))
        hashes = []
        for pick in picks:
            hashes.append(held[pick % len(held)] if held and pick < 25 else 99_000 + pick)
        hashes = list(dict.fromkeys(hashes))
        ok = self.send(key, event_id, Removed(tuple(hashes), medium))
        if not fresh:
            assert not ok
            return
        model.last_event_id = event_id
        target = model.blocks.get(medium, {})
        unknown = [h for h in hashes if h not in target]
        for h in hashes:
            target.pop(h, None)
        assert ok == (not unknown)

    @rule(key=workers_st)
    def clear(self, key: WorkerKey) -> None:
        model = self.worker(key)
        event_id, _ = self.next_id(key, 0)
        assert self.send(key, event_id, Cleared())
        model.last_event_id = event_id
        model.blocks.clear()
        self.forget_predictions(lambda k: k == key)

    @rule(key=workers_st)
    def reset(self, key: WorkerKey) -> None:
        self.indexer.reset_worker(key)
        if key in self.model:
            self.model[key] = ModelWorker()
        self.forget_predictions(lambda k: k == key)

    @rule(worker_id=st.sampled_from([0, 1, 2]), all_ranks=st.booleans())
    def remove_worker(self, worker_id: int, all_ranks: bool) -> None:
        self.indexer.remove_worker(worker_id, None if all_ranks else 0)
        for key in list(self.model):
            if key.worker_id == worker_id and (all_ranks or key.dp_rank == 0):
                del self.model[key]
        self.forget_predictions(
            lambda k: k.worker_id == worker_id and (all_ranks or k.dp_rank == 0)
        )

    def forget_predictions(self, which: Callable[[WorkerKey], bool]) -> None:
        self.predicted = {p: e for p, e in self.predicted.items() if not which(p[0])}

    @rule(
        key=workers_st,
        new=locals_st,
        ttl=st.sampled_from([None, 3]),
        cap=st.sampled_from([None, None, 1, 3]),
    )
    def predict(self, key: WorkerKey, new: list[int], ttl: int | None, cap: int | None) -> None:
        self.indexer.add_predicted(key, new, ttl_s=ttl, max_blocks=cap)
        model = self.worker(key)
        now = int(self.clock())
        predicted = {p: e for p, e in self.predicted.items() if e > now}
        real = model.held("GPU")
        expiry = now + (TTL_S if ttl is None else ttl)
        for i in range(1, len(new) + 1):
            prefix = tuple(new[:i])
            if prefix not in real:
                if predicted.get((key, prefix), -1) >= expiry:
                    continue  # fresh enough: not refreshed, and never shortened
                predicted.pop((key, prefix), None)  # a refresh makes it the youngest
                predicted[(key, prefix)] = expiry
        if cap is not None:  # the worker's capacity: its oldest predictions go first
            mine = [p for p in predicted if p[0] == key]
            for p in mine[: max(0, len(mine) - cap)]:
                del predicted[p]
        while len(predicted) > MAX_PREDICTED:
            del predicted[next(iter(predicted))]
        self.predicted = predicted

    @rule(delta=st.integers(0, 6))
    def advance(self, delta: int) -> None:
        self.clock.advance(delta)

    @rule()
    def snapshot_round_trip(self) -> None:
        self.indexer = KvIndexer.restore(self.indexer.snapshot(), clock=self.clock)

    @invariant()
    def matches_agree(self) -> None:
        now = self.clock()
        prompts: set[Prefix] = set()
        device: dict[WorkerKey, set[Prefix]] = {}
        for key, model in self.model.items():
            live = {p for (k, p), e in self.predicted.items() if k == key and e > now}
            device[key] = model.held("GPU") | live
            prompts |= device[key]
            for blocks in model.blocks.values():
                prompts |= set(blocks.values())
        for prompt in prompts:
            query = (*prompt, 9)
            found = self.indexer.find_matches(list(query))
            by_sequence = self.indexer.find_matches_sequence(compute_sequence_hashes(query))
            assert by_sequence == found
            expected = {k: s for k, held in device.items() if (s := score(held, query))}
            assert found.scores == expected, (query, found.scores, expected)
            for medium in ("CPU",):
                tier = {k: s for k, m in self.model.items() if (s := score(m.held(medium), query))}
                assert found.tiers.get(medium, {}) == tier
            sizes = {}
            for k in expected:
                real = self.model[k].blocks.get("GPU", {})
                sizes[k] = len(real) + len(device[k] - set(real.values()))
            assert found.tree_sizes == sizes

    @invariant()
    def stats_agree(self) -> None:
        stats = self.indexer.stats()
        entries = sum(len(b) for m in self.model.values() for b in m.blocks.values())
        assert stats.num_entries == entries
        now = self.clock()
        assert stats.num_predicted == sum(1 for e in self.predicted.values() if e > now)
        for key in WORKERS:
            expected = self.model[key].last_event_id if key in self.model else None
            assert self.indexer.last_event_id(key) == expected


IndexerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIndexerAgainstModel = IndexerMachine.TestCase
