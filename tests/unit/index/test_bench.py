"""The indexer benchmark's stream builder (exact) and a small end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from kvrouter.events.model import Removed, Stored, StoredBlock, WorkerKey
from kvrouter.hashing import compute_sequence_hashes
from kvrouter.index import KvIndexer
from kvrouter.index import cli as index_cli
from kvrouter.index.bench import build_trace_stream, run_scale, run_trace
from kvrouter.index.predicted_bench import run_predicted


def test_stream_follows_the_lru_rule() -> None:
    # One worker: every request lands on it; the cache holds 4 blocks.
    prompts = [[0, 1, 2], [0, 1, 3], [0, 4]]
    stream = build_trace_stream(prompts, workers=1, cap_blocks=4, seed=0)
    w0 = WorkerKey(0)
    assert [r.worker for r in stream] == [w0, w0, w0]
    assert [r.cached_blocks for r in stream] == [0, 2, 1]
    seq = [compute_sequence_hashes(p) for p in prompts]
    first = stream[0].events
    assert len(first) == 1 and isinstance(first[0].data, Stored)
    assert first[0].data.parent_engine_hash is None
    assert [b.local_hash for b in first[0].data.blocks] == [0, 1, 2]
    # Request 2 needs one new block; the cache is full after it.
    second = stream[1].events
    assert len(second) == 1 and isinstance(second[0].data, Stored)
    salt = first[0].data.blocks[0].engine_hash ^ seq[0][0]
    assert second[0].data.parent_engine_hash == seq[1][1] ^ salt
    assert second[0].data.blocks == (StoredBlock(seq[1][2] ^ salt, 3),)
    # Request 3: cache holds [0, 0.1, 0.1.2, 0.1.3]; block 0.4 evicts the least recent
    # leaf, 0.1.2 (request 2 touched 0.1.3, 0.1, 0 after it).
    third = stream[2].events
    assert isinstance(third[0].data, Removed)
    assert third[0].data.engine_hashes == (seq[0][2] ^ salt,)
    assert [e.event_id for r in stream for e in r.events] == [0, 1, 2, 3]


def test_indexer_replay_agrees_with_the_simulated_caches() -> None:
    prompts = [[i % 3, 10 + i % 5, 100 + i] for i in range(60)]
    stream = build_trace_stream(prompts, workers=3, cap_blocks=8, seed=1)
    indexer = KvIndexer()
    for request in stream:
        scores = indexer.find_matches(request.local_hashes).scores
        assert scores.get(request.worker, 0) == request.cached_blocks
        assert indexer.apply_events(request.events) == len(request.events)
    assert indexer.stats().events_rejected == 0


def test_trace_run_reports_consistent_figures(trace_path: Path) -> None:
    result = run_trace(trace_path, workers=4, cap_blocks=500, limit=200, repeats=1)
    assert result.requests == 200
    assert result.matched_blocks_total == result.expected_matched_blocks
    assert result.blocks_removed > 0
    assert result.blocks_per_s > 0 and result.matches_per_s > 0
    assert 0 < result.match_p50_us <= result.match_p99_us <= result.match_max_us
    assert result.bytes_per_entry > 0


def test_scale_run_small() -> None:
    result = run_scale(workers=16, target_entries=4000, queries=20)
    assert result.entries >= 4000 - 16 * 48
    assert result.matched_workers_per_query == 8.0
    assert result.match_p99_us > 0


def test_cli_prints_json(trace_path: Path) -> None:
    app = typer.Typer()
    bench = typer.Typer()
    app.add_typer(bench, name="bench")
    index_cli.register(app, bench)
    args = ["bench", "indexer", "--trace", str(trace_path), "--limit", "50", "--repeats", "1"]
    result = CliRunner().invoke(app, [*args, "--workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    for name in (
        "blocks_per_s",
        "events_per_s",
        "matches_per_s",
        "match_p50_us",
        "match_p99_us",
        "bytes_per_entry",
        "matched_blocks_total",
    ):
        assert name in figures
    missing = CliRunner().invoke(app, ["bench", "indexer"])
    assert missing.exit_code != 0
    both = CliRunner().invoke(app, ["bench", "indexer", "--trace", str(trace_path), "--scale"])
    assert both.exit_code == 2
    assert "not used with --scale" in " ".join(both.output.split())


def test_predicted_run_exercises_pruning_and_expiry() -> None:
    result = run_predicted(workers=4, target_entries=3000)
    assert result.fill.requests > 0 and result.steady.requests == 2 * result.fill.requests
    assert result.num_predicted <= 3000
    assert result.predicted_pruned > 0 and result.predicted_expired > 0
    assert result.predicted_added == (
        result.num_predicted + result.predicted_pruned + result.predicted_expired
    )
    assert 0 < result.steady.booking_p50_us <= result.steady.booking_max_us


def test_cli_predicted_prints_both_phases() -> None:
    app = typer.Typer()
    bench = typer.Typer()
    app.add_typer(bench, name="bench")
    index_cli.register(app, bench)
    args = ["bench", "indexer", "--predicted", "--scale", "--scale-entries", "2000"]
    result = CliRunner().invoke(app, [*args, "--workers", "4", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["max_predicted_blocks"] == 2000
    for phase in ("fill", "steady"):
        for name in ("us_per_block", "booking_p50_us", "booking_p99_us", "booking_max_us"):
            assert figures[f"{phase}.{name}"] > 0
