"""Commands of this area; see :mod:`kvrouter.cli`.

``kvrouter bench decision`` measures what one routing decision costs on a large fleet:
hashing an 8k-token prompt, matching it against an index of millions of blocks, and
scoring every worker. It prints figures; nothing is asserted.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from kvrouter.index import KvIndexer
    from kvrouter.routing.scheduler import KvScheduler


@dataclass(frozen=True, slots=True)
class _Setup:
    workers: int
    blocks: int
    prompt_tokens: int
    block_size: int
    iterations: int
    prompts: int
    holders_per_prompt: int
    seed: int
    policy: str


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] * 1e3

    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1e3}


def _store_chain(
    indexer: KvIndexer, worker_id: int, event_id: int, engine_base: int, local: list[int]
) -> None:
    from kvrouter.events.model import RouterEvent, Stored, StoredBlock

    blocks = tuple(StoredBlock(engine_base + i, h) for i, h in enumerate(local))
    indexer.apply_event(RouterEvent(worker_id, 0, event_id, Stored(None, blocks)))


def _build_index(setup: _Setup) -> tuple[KvIndexer, list[list[int]], float]:
    """An index of ``setup.blocks`` (block, worker) entries: each prompt's prefixes on
    ``holders_per_prompt`` random workers (random depths), the rest random chains of a
    prompt's length spread evenly over the fleet."""
    import numpy as np

    from kvrouter.hashing import compute_block_hashes
    from kvrouter.index import KvIndexer

    rng = np.random.default_rng(setup.seed)
    indexer = KvIndexer(block_size=setup.block_size)
    prompt_blocks = setup.prompt_tokens // setup.block_size
    prompts = [
        rng.integers(0, 50_000, size=setup.prompt_tokens).tolist() for _ in range(setup.prompts)
    ]
    start = time.perf_counter()
    event_ids = [0] * setup.workers
    engine_next = [0] * setup.workers
    stored = 0

    def store(worker: int, local: list[int]) -> None:
        nonlocal stored
        _store_chain(indexer, worker, event_ids[worker], engine_next[worker], local)
        event_ids[worker] += 1
        engine_next[worker] += len(local)
        stored += len(local)

    for tokens in prompts:
        local = compute_block_hashes(tokens, setup.block_size)
        holders = rng.choice(setup.workers, size=setup.holders_per_prompt, replace=False)
        for worker in holders.tolist():
            store(worker, local[: int(rng.integers(1, prompt_blocks + 1))])
    worker = 0
    while stored < setup.blocks:
        length = min(prompt_blocks, setup.blocks - stored)
        store(worker, rng.integers(0, 1 << 62, size=length).tolist())
        worker = (worker + 1) % setup.workers
    return indexer, prompts, time.perf_counter() - start


def _build_scheduler(setup: _Setup, indexer: KvIndexer) -> KvScheduler:
    import random

    from kvrouter.events.model import WorkerKey
    from kvrouter.load.aggregator import KvMetricsAggregator
    from kvrouter.load.metrics import ForwardPassMetrics
    from kvrouter.routing.scheduler import KvScheduler, ScheduleRequest

    rng = random.Random(setup.seed)
    aggregator = KvMetricsAggregator()
    sched = KvScheduler(
        indexer,
        aggregator,
        policy=setup.policy,
        block_size=setup.block_size,
        rng=rng,
        timer=time.perf_counter,
    )
    for w in range(setup.workers):
        sched.add_worker(WorkerKey(w), total_blocks=16384)
        usage = rng.random() * 0.8
        aggregator.update(ForwardPassMetrics(worker_id=w, gpu_cache_usage_perc=usage))
    # Background load: two decoding requests per worker.
    for i in range(2 * setup.workers):
        tokens = [rng.randrange(50_000) for _ in range(rng.randrange(64, 2048))]
        sched.schedule(ScheduleRequest(f"bg{i}", token_ids=tokens, worker=i % setup.workers))
        sched.on_first_token(f"bg{i}")
    return sched


def _measure(setup: _Setup, sched: KvScheduler, prompts: list[list[int]]) -> dict[str, object]:
    from kvrouter.hashing import hash_request
    from kvrouter.routing.scheduler import ScheduleRequest

    indexer = sched.indexer
    assert indexer is not None
    phases: dict[str, list[float]] = {"hash": [], "match": [], "decision": [], "schedule": []}
    clock = time.perf_counter
    overlaps = 0
    for i in range(setup.iterations):
        tokens = prompts[i % len(prompts)]
        t0 = clock()
        local, _ = hash_request(tokens, setup.block_size)
        t1 = clock()
        indexer.find_matches(local)
        t2 = clock()
        decision = sched.preview(ScheduleRequest(f"p{i}", token_ids=tokens))
        t3 = clock()
        phases["hash"].append(t1 - t0)
        phases["match"].append(t2 - t1)
        phases["decision"].append(t3 - t2)
        overlaps += decision.overlap_blocks
    # The full path, booking included (predicted entries, active load), then freed.
    for i in range(min(setup.iterations, 500)):
        tokens = prompts[i % len(prompts)]
        t0 = clock()
        sched.schedule(ScheduleRequest(f"s{i}", token_ids=tokens))
        phases["schedule"].append(clock() - t0)
        sched.on_finish(f"s{i}")
    result: dict[str, object] = {name: _percentiles(xs) for name, xs in phases.items()}
    result["mean_overlap_blocks"] = overlaps / setup.iterations
    return result


def _print(setup: _Setup, build_s: float, num_entries: int, result: dict[str, object]) -> None:
    typer.echo(
        f"decision benchmark: {setup.workers} workers, {num_entries:,} indexed (block, worker)"
        f" entries, {setup.prompt_tokens}-token prompts, block size {setup.block_size},"
        f" policy {setup.policy}; index built in {build_s:.1f} s"
    )
    labels = {
        "hash": f"hash ({setup.prompt_tokens:,} tokens)",
        "match": "find_matches",
        "decision": "hash + match + score",
        "schedule": "schedule (with booking)",
    }
    typer.echo(f"{'phase':<26}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for key, label in labels.items():
        row = result[key]
        assert isinstance(row, dict)
        typer.echo(
            f"{label:<26}{row['p50_ms']:>9.3f}{row['p90_ms']:>9.3f}"
            f"{row['p99_ms']:>9.3f}{row['max_ms']:>9.3f}"
        )
    typer.echo(f"mean overlap: {result['mean_overlap_blocks']:.1f} blocks")


def bench_decision(  # noqa: PLR0917 (typer maps each parameter to an option)
    workers: int = typer.Option(1024, help="Workers in the fleet."),
    blocks: int = typer.Option(
        10_000_000, help="(block, worker) entries in the index (at least the prompts' prefixes)."
    ),
    prompt_tokens: int = typer.Option(8192, help="Tokens per prompt."),
    block_size: int = typer.Option(16, help="Tokens per block."),
    iterations: int = typer.Option(2000, help="Decisions to time."),
    prompts: int = typer.Option(16, help="Distinct prompts, each cached on some workers."),
    holders: int = typer.Option(64, help="Workers holding a prefix of each prompt."),
    policy: str = typer.Option("kv", help="Routing policy."),
    seed: int = typer.Option(0, help="Random seed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """p50/p99 of hash + match + score for one routing decision on a large fleet."""
    setup = _Setup(
        workers=workers,
        blocks=blocks,
        prompt_tokens=prompt_tokens,
        block_size=block_size,
        iterations=iterations,
        prompts=prompts,
        holders_per_prompt=min(holders, workers),
        seed=seed,
        policy=policy,
    )
    indexer, prompt_list, build_s = _build_index(setup)
    num_entries = indexer.stats().num_entries
    sched = _build_scheduler(setup, indexer)
    result = _measure(setup, sched, prompt_list)
    if as_json:
        out = {"setup": asdict(setup), "index_entries": num_entries, "build_s": build_s}
        typer.echo(json.dumps({**out, **result}, indent=2))
    else:
        _print(setup, build_s, num_entries, result)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to the top-level ``app`` and the ``bench`` group."""
    bench.command("decision")(bench_decision)
