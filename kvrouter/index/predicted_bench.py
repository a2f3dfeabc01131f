"""``kvrouter bench indexer --predicted``: what booking predicted entries costs.

The workload (fixed, so figures compare across implementations):

* Conversations of 4 turns. Conversation ``c`` uses one of 8 system prompts of 32
  blocks (``c mod 8``) followed by its own body; turn ``t`` sends the system prompt and
  the first ``56 * (t + 1)`` body blocks (88, 144, 200, 256 blocks), so each turn
  refreshes the previous turn's blocks and adds 56 new ones.
* Turns interleave: the stream sends turn 0 of conversation ``c``, turn 1 of ``c - 1``,
  turn 2 of ``c - 2``, turn 3 of ``c - 3``, then moves to ``c + 1``.
* A request goes to worker ``c mod N`` with probability 0.8, otherwise to a uniformly
  random worker (seeded). A virtual clock advances 1 ms per request.
* Per request: one ``find_matches_sequence`` (what the scheduler does before it
  books), then one ``add_predicted_sequence`` (the booking). Both are timed one by one
  with ``perf_counter_ns``; hashing is done before the clock starts.
* ``max_predicted_blocks`` is the target size. The *fill* phase runs until that many
  entries are live (nothing expires in it); the *steady* phase then sends twice as
  many requests. Every other steady booking has a TTL of a quarter of the fill phase's
  duration and expires; the others never do and are pruned oldest-first by the bound,
  so both removal paths run on the request path.
"""

from __future__ import annotations

import gc
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash

from kvrouter.clock import ManualClock
from kvrouter.events.model import WorkerKey
from kvrouter.hashing import compute_sequence_hashes
from kvrouter.index.indexer import KvIndexer

__all__ = ["SMALL_ENTRIES", "PhaseResult", "PredictedResult", "run_predicted"]

SMALL_ENTRIES = 200_000  # the bound of the small run (``--scale`` uses --scale-entries)

_SYSTEM_PROMPTS = 8
_SYSTEM_BLOCKS = 32
_TURN_BLOCKS = 56
_TURNS = 4
_STEP_S = 0.001
_pack = struct.Struct("<QQ").pack


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """Figures of one phase: bookings and the lookups before them."""

    requests: int
    blocks: int
    us_per_block: float
    booking_p50_us: float
    booking_p99_us: float
    booking_max_us: float
    match_p50_us: float
    match_p99_us: float
    match_max_us: float


@dataclass(frozen=True, slots=True)
class PredictedResult:
    """The whole run: settings, both phases, and the indexer's counters at the end."""

    workers: int
    max_predicted_blocks: int
    ttl_s: float
    fill: PhaseResult
    steady: PhaseResult
    num_predicted: int
    predicted_added: int
    predicted_expired: int
    predicted_pruned: int
    wall_s: float


def _local(a: int, b: int) -> int:
    return xxhash.xxh3_64_intdigest(_pack(a, b), 11)


def _conversation_chain(conversation: int) -> list[int]:
    """Sequence hashes of a conversation's longest prompt (every turn is a prefix)."""
    system = conversation % _SYSTEM_PROMPTS
    locals_ = [_local(1 << 40 | system, i) for i in range(_SYSTEM_BLOCKS)]
    locals_ += [_local(conversation, i) for i in range(_TURNS * _TURN_BLOCKS)]
    return compute_sequence_hashes(locals_)


def _requests(workers: int, seed: int) -> Iterator[tuple[WorkerKey, list[int]]]:
    """The endless request stream of the workload rule (see the module docstring)."""
    rng = random.Random(seed)
    keys = [WorkerKey(w) for w in range(workers)]
    chains: dict[int, list[int]] = {}
    conversation = 0
    while True:
        chains[conversation] = _conversation_chain(conversation)
        for turn in range(_TURNS):
            c = conversation - turn
            if c < 0:
                continue
            home = rng.random() < 0.8
            worker = keys[c % workers] if home else keys[rng.randrange(workers)]
            yield worker, chains[c][: _SYSTEM_BLOCKS + _TURN_BLOCKS * (turn + 1)]
        chains.pop(conversation - _TURNS + 1, None)
        conversation += 1


def _percentile_us(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


def _phase(
    indexer: KvIndexer,
    clock: ManualClock,
    stream: Iterator[tuple[WorkerKey, list[int]]],
    *,
    until: int | None,
    requests: int | None,
    short_ttl_s: float | None = None,
) -> PhaseResult:
    """Run requests until ``until`` entries are live (or the bound pruned some), or
    ``requests`` of them."""
    book = indexer.add_predicted_sequence
    find = indexer.find_matches_sequence
    now = time.perf_counter_ns
    booking: list[int] = []
    matching: list[int] = []
    blocks = 0
    live = 0
    while (until is None or live < until) and (requests is None or len(booking) < requests):
        if until is not None and len(booking) % 64 == 0:
            stats = indexer.stats()  # not timed; every 64 requests is close enough
            # Pruning may keep the live count under the bound: reaching it ends the fill.
            live = until if stats.predicted_pruned else stats.num_predicted
        worker, seq = next(stream)
        clock.advance(_STEP_S)
        ttl_s = short_ttl_s if short_ttl_s and len(booking) % 2 else None
        t0 = now()
        find(seq)
        t1 = now()
        book(worker, seq, ttl_s=ttl_s)
        t2 = now()
        matching.append(t1 - t0)
        booking.append(t2 - t1)
        blocks += len(seq)
    total_ns = sum(booking)
    booking.sort()
    matching.sort()
    return PhaseResult(
        requests=len(booking),
        blocks=blocks,
        us_per_block=total_ns / 1000.0 / max(1, blocks),
        booking_p50_us=_percentile_us(booking, 0.50),
        booking_p99_us=_percentile_us(booking, 0.99),
        booking_max_us=booking[-1] / 1000.0,
        match_p50_us=_percentile_us(matching, 0.50),
        match_p99_us=_percentile_us(matching, 0.99),
        match_max_us=matching[-1] / 1000.0,
    )


def run_predicted(
    *, workers: int = 16, target_entries: int = SMALL_ENTRIES, seed: int = 0
) -> PredictedResult:
    """Book the workload's requests into an indexer bounded at ``target_entries``
    predicted entries; see the module docstring for the rule."""
    if target_entries <= 0:
        raise ValueError(f"target_entries must be positive, got {target_entries}")
    started = time.perf_counter()
    clock = ManualClock()
    # The default TTL never expires; the steady phase gives half its bookings a short one.
    indexer = KvIndexer(clock=clock, predicted_ttl_s=1e9, max_predicted_blocks=target_entries)
    stream = _requests(workers, seed)
    gc.collect()
    fill = _phase(indexer, clock, stream, until=target_entries, requests=None)
    ttl_s = fill.requests * _STEP_S / 4
    steady = _phase(
        indexer, clock, stream, until=None, requests=2 * fill.requests, short_ttl_s=ttl_s
    )
    stats = indexer.stats()
    return PredictedResult(
        workers=workers,
        max_predicted_blocks=target_entries,
        ttl_s=ttl_s,
        fill=fill,
        steady=steady,
        num_predicted=stats.num_predicted,
        predicted_added=stats.predicted_added,
        predicted_expired=stats.predicted_expired,
        predicted_pruned=stats.predicted_pruned,
        wall_s=time.perf_counter() - started,
    )
