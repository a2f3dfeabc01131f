"""Commands of this area; see :mod:`kvrouter.cli`.

``kvrouter bench hashing`` measures how fast a prompt turns into block hashes (local
and sequence hashes, what the router computes once per request) and, with
``--events``, how fast KV event batches decode (which includes recomputing the local
hashes of every stored block). It prints figures; nothing is asserted.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import typer

_INPUT_KINDS = ("list", "numpy-int64", "numpy-uint32")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to the top-level ``app`` and the ``bench`` group."""

    @bench.command("hashing")
    def bench_hashing(
        num_tokens: int = typer.Option(32_768, help="Prompt length in tokens."),
        block_size: list[int] = typer.Option(
            [16, 64], "--block-size", help="Block sizes to measure (repeatable)."
        ),
        duration_s: float = typer.Option(0.5, help="Measuring time per case, in seconds."),
        events: bool = typer.Option(False, "--events", help="Also measure KV event decoding."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Tokens hashed per second (local + sequence hashes), list and numpy input."""
        if duration_s <= 0 or any(bs <= 0 or bs > num_tokens for bs in block_size):
            raise typer.BadParameter(
                "duration must be positive and every block size between 1 and num-tokens"
            )
        report: dict[str, Any] = {
            "num_tokens": num_tokens,
            "hashing": measure_hashing(num_tokens, block_size, duration_s),
        }
        if events:
            report["events"] = measure_event_decoding(num_tokens, block_size, duration_s)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            typer.echo(format_report(report))


def time_call(fn: Callable[[], object], duration_s: float) -> float:
    """Median seconds per call of ``fn`` over about ``duration_s`` (after a warm-up call)."""
    fn()
    samples: list[float] = []
    deadline = time.perf_counter() + duration_s
    while True:
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        samples.append(end - start)
        if end >= deadline and len(samples) >= 5:
            return statistics.median(samples)


def _prompt_inputs(num_tokens: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(1337)
    tokens = rng.integers(0, 150_000, size=num_tokens, dtype=np.int64)
    return {
        "list": tokens.tolist(),
        "numpy-int64": tokens,
        "numpy-uint32": tokens.astype(np.uint32),
    }


def measure_hashing(
    num_tokens: int, block_sizes: list[int], duration_s: float
) -> list[dict[str, Any]]:
    """One row per (block size, input kind): local, sequence and total timings."""
    from kvrouter.hashing import compute_block_hashes, compute_sequence_hashes, hash_request

    inputs = _prompt_inputs(num_tokens)
    rows = []
    for block_size in block_sizes:
        for kind in _INPUT_KINDS:
            tokens = inputs[kind]
            local = compute_block_hashes(tokens, block_size)
            local_s = time_call(partial(compute_block_hashes, tokens, block_size), duration_s)
            seq_s = time_call(partial(compute_sequence_hashes, local), duration_s)
            total_s = time_call(partial(hash_request, tokens, block_size), duration_s)
            rows.append(
                {
                    "block_size": block_size,
                    "input": kind,
                    "num_blocks": len(local),
                    "local_us": local_s * 1e6,
                    "sequence_us": seq_s * 1e6,
                    "total_us": total_s * 1e6,
                    "tokens_per_s": num_tokens / total_s,
                }
            )
    return rows


def _event_payloads(num_tokens: int, block_size: int) -> dict[str, tuple[bytes, int, int]]:
    """Payloads like an engine's: ``(payload, num_events, num_blocks)`` per scenario.

    * prefill: one BlockStored holding the whole prompt's full blocks;
    * decode step: 64 requests each completing one block, plus 16 evictions.
    """
    from kvrouter.events.vllm import (
        EVENT_FORMS,
        BlockRemoved,
        BlockStored,
        KVEventBatch,
        encode_batch,
    )

    tokens = _prompt_inputs(num_tokens)["list"]
    num_blocks = num_tokens // block_size
    prefill = BlockStored(
        list(range(1, num_blocks + 1)), None, tokens[: num_blocks * block_size], block_size
    )
    step_tokens = _prompt_inputs(64 * block_size)["list"]
    step: list[BlockStored | BlockRemoved] = [
        BlockStored([10_000 + i], i, step_tokens[i * block_size : (i + 1) * block_size], block_size)
        for i in range(64)
    ]
    step += [BlockRemoved([20_000 + i]) for i in range(16)]
    out = {}
    for form in EVENT_FORMS:
        out[f"prefill/{form}"] = (
            encode_batch(KVEventBatch(0.0, [prefill], 0), form=form),
            1,
            num_blocks,
        )
        out[f"decode-step/{form}"] = (
            encode_batch(KVEventBatch(0.0, list(step), 0), form=form),
            len(step),
            64 + 16,
        )
    return out


def measure_event_decoding(
    num_tokens: int, block_sizes: list[int], duration_s: float
) -> list[dict[str, Any]]:
    """One row per (block size, scenario, form): events, blocks and tokens per second."""
    from kvrouter.events.vllm import VllmEventDecoder

    rows = []
    for block_size in block_sizes:
        decoder = VllmEventDecoder(block_size)
        for name, (payload, num_events, num_blocks) in _event_payloads(
            num_tokens, block_size
        ).items():
            batch = decoder.decode(payload)
            assert not batch.errors, batch.errors
            seconds = time_call(partial(decoder.decode, payload), duration_s)
            rows.append(
                {
                    "block_size": block_size,
                    "scenario": name,
                    "payload_bytes": len(payload),
                    "batch_us": seconds * 1e6,
                    "events_per_s": num_events / seconds,
                    "blocks_per_s": num_blocks / seconds,
                }
            )
    return rows


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned text tables."""
    lines = [
        f"block hashing of a {report['num_tokens']}-token prompt (local + sequence hashes)",
        f"{'block':>5}  {'input':<13} {'blocks':>6} {'local us':>9} {'seq us':>8} "
        f"{'total us':>9} {'Mtok/s':>8}",
    ]
    for row in report["hashing"]:
        lines.append(
            f"{row['block_size']:>5}  {row['input']:<13} {row['num_blocks']:>6} "
            f"{row['local_us']:>9.1f} {row['sequence_us']:>8.1f} {row['total_us']:>9.1f} "
            f"{row['tokens_per_s'] / 1e6:>8.1f}"
        )
    if "events" in report:
        lines += [
            "",
            "KV event decoding (msgpack -> router events, local hashes recomputed)",
            f"{'block':>5}  {'scenario':<21} {'bytes':>8} {'batch us':>9} "
            f"{'events/s':>11} {'blocks/s':>11}",
        ]
        for row in report["events"]:
            lines.append(
                f"{row['block_size']:>5}  {row['scenario']:<21} {row['payload_bytes']:>8} "
                f"{row['batch_us']:>9.1f} {row['events_per_s']:>11,.0f} "
                f"{row['blocks_per_s']:>11,.0f}"
            )
    return "\n".join(lines)
