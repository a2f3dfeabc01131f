"""``kvrouter bench gateway``: what the gateway adds over talking to a worker directly.

Two child processes: a trivial backend (:mod:`kvrouter.gateway.backend`, fixed answers)
and the gateway in front of it (``kvrouter serve``, kv routing, built-in tokenizer).
This process drives the same requests (``num_groups`` groups of prompts sharing a
prefix, ``prompt_chars`` characters each) at a fixed concurrency, first straight to the
backend, then through the gateway, and prints requests/s and latency percentiles.
Nothing is asserted; the figures depend on the machine.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO

__all__ = ["BenchOptions", "BenchResult", "RunFigures", "run_gateway_bench"]


@dataclass(frozen=True, slots=True)
class BenchOptions:
    num_requests: int = 4000
    concurrency: int = 32
    num_groups: int = 16
    prompt_chars: int = 4000
    stream: bool = False
    router_mode: str = "kv"
    warmup_requests: int = 300


@dataclass(frozen=True, slots=True)
class RunFigures:
    """One measured run."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    num_errors: int
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class BenchResult:
    options: BenchOptions
    direct: RunFigures
    gateway: RunFigures

    @property
    def added_p50_ms(self) -> float:
        return self.gateway.p50_ms - self.direct.p50_ms

    @property
    def added_p99_ms(self) -> float:
        return self.gateway.p99_ms - self.direct.p99_ms

    def print_table(self, out: IO[str]) -> None:
        o = self.options
        out.write(
            f"{o.num_requests} requests, concurrency {o.concurrency}, {o.num_groups} groups of "
            f"{o.prompt_chars}-char prompts, stream={o.stream}, router mode {o.router_mode}\n"
        )
        out.write(f"{'':18}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}\n")
        for name, fig in (("straight", self.direct), ("through gateway", self.gateway)):
            out.write(
                f"{name:18}{fig.requests_per_s:12.0f}{fig.p50_ms:10.2f}"
                f"{fig.p99_ms:10.2f}{fig.num_errors:8d}\n"
            )
        out.write(
            f"added latency: p50 {self.added_p50_ms:.2f} ms, p99 {self.added_p99_ms:.2f} ms\n"
        )


def make_prompts(num_groups: int, prompt_chars: int, count: int) -> list[str]:
    """``count`` prompts: group ``i % num_groups`` shares a 3/4-length prefix."""
    prefix_len = prompt_chars * 3 // 4
    prefixes = [
        (f"Group {g} system prompt. " * (prefix_len // 20 + 1))[:prefix_len]
        for g in range(num_groups)
    ]
    prompts = []
    for i in range(count):
        suffix = (f" question {i} " * (prompt_chars // 10 + 1))[: prompt_chars - prefix_len]
        prompts.append(prefixes[i % num_groups] + suffix)
    return prompts


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def _drive(url: str, bodies: list[bytes], concurrency: int, stream: bool) -> RunFigures:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    next_index = 0
    headers = {"Content-Type": "application/json"}

    async def lane(session: aiohttp.ClientSession) -> None:
        nonlocal next_index, errors
        while next_index < len(bodies):
            body = bodies[next_index]
            next_index += 1
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(lane(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return RunFigures(
        requests_per_s=len(bodies) / elapsed,
        p50_ms=1000 * _percentile(latencies, 0.5),
        p99_ms=1000 * _percentile(latencies, 0.99),
        num_errors=errors,
        elapsed_s=elapsed,
    )


def _start(command: list[str], pattern: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise RuntimeError(f"{command[2:4]} did not start")


def _bodies(options: BenchOptions, count: int) -> list[bytes]:
    import msgspec

    encode = msgspec.json.encode
    return [
        encode({"model": "bench", "prompt": p, "max_tokens": 1, "stream": options.stream})
        for p in make_prompts(options.num_groups, options.prompt_chars, count)
    ]


def run_gateway_bench(options: BenchOptions) -> BenchResult:
    """Start the backend and the gateway, measure both paths, stop both."""
    from kvrouter.gateway.server import install_uvloop

    install_uvloop()
    backend, backend_port = _start(
        [sys.executable, "-m", "kvrouter.gateway.backend", "--port", "0"], r"port (\d+)"
    )
    gateway = None
    try:
        gateway, gateway_port = _start(
            [
                sys.executable, "-m", "kvrouter", "serve", "--port", "0",
                "--workers", f"http://127.0.0.1:{backend_port}",
                "--router-mode", options.router_mode, "--tokenizer", "builtin",
                "--log-level", "WARNING",
            ],
            r"gateway on http://[\d.]+:(\d+)",
        )  # fmt: skip
        bodies = _bodies(options, options.num_requests)
        warm = _bodies(options, options.warmup_requests)
        direct_url = f"http://127.0.0.1:{backend_port}/v1/completions"
        gateway_url = f"http://127.0.0.1:{gateway_port}/v1/completions"
        asyncio.run(_drive(direct_url, warm, options.concurrency, options.stream))
        direct = asyncio.run(_drive(direct_url, bodies, options.concurrency, options.stream))
        asyncio.run(_drive(gateway_url, warm, options.concurrency, options.stream))
        through = asyncio.run(_drive(gateway_url, bodies, options.concurrency, options.stream))
    finally:
        for proc in (gateway, backend):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)
    return BenchResult(options, direct, through)
