"""``kvrouter bench gateway``: what the gateway adds over talking to a worker directly.

Two child processes: a trivial backend (:mod:`kvrouter.gateway.backend`, fixed answers)
and the gateway in front of it (``kvrouter serve``, kv routing, built-in tokenizer).
This process drives the same requests (``num_groups`` groups of prompts sharing a
prefix, ``prompt_chars`` characters each) at a fixed concurrency, first straight to the
backend, then through the gateway, and prints requests/s and latency percentiles.
Nothing is asserted; the figures depend on the machine.

Other routers are measured the same way, in the same run, by ``peers``: commands that
start one in front of the same backend, with ``{backend}`` (the backend's base URL) and
``{port}`` (a free port for it to listen on) filled in, e.g. ::

    kvrouter bench gateway --rounds 3 --peer "sglang=python -m sglang_router.launch_router \
        --worker-urls {backend} --port {port} --policy cache_aware"

With ``rounds`` > 1 every target is measured once per round, in turn, and the round
with the median requests/s is reported, so a slow spell of a shared machine does not
land on one target alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kvrouter.bench.net import free_port

__all__ = [
    "BenchOptions",
    "BenchResult",
    "PeerFigures",
    "RunFigures",
    "parse_peer",
    "run_gateway_bench",
]


@dataclass(frozen=True, slots=True)
class BenchOptions:
    num_requests: int = 4000
    concurrency: int = 32
    num_groups: int = 16
    prompt_chars: int = 4000
    stream: bool = False
    router_mode: str = "kv"
    warmup_requests: int = 300
    peers: tuple[str, ...] = ()  # "[LABEL=]COMMAND" templates (module docstring)
    rounds: int = 1
    peer_start_timeout_s: float = 60.0  # until a peer's first completion succeeds

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.num_requests < 1 or self.concurrency < 1:
            raise ValueError("num_requests and concurrency must be positive")
        for peer in self.peers:
            parse_peer(peer)


@dataclass(frozen=True, slots=True)
class RunFigures:
    """One measured run."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    num_errors: int
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class PeerFigures:
    """Another router, measured like the gateway."""

    label: str
    command: str
    figures: RunFigures


@dataclass(frozen=True, slots=True)
class BenchResult:
    options: BenchOptions
    direct: RunFigures
    gateway: RunFigures
    peers: list[PeerFigures] = field(default_factory=list)

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
        rows = [("straight", self.direct), ("through gateway", self.gateway)]
        rows += [(f"through {peer.label}", peer.figures) for peer in self.peers]
        width = max(18, *(len(name) + 2 for name, _ in rows))
        out.write(f"{'':{width}}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}\n")
        for name, fig in rows:
            out.write(
                f"{name:{width}}{fig.requests_per_s:12.0f}{fig.p50_ms:10.2f}"
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
    proc.wait()
    proc.stdout.close()
    raise RuntimeError(f"{command[2:4]} did not start")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def _bodies(options: BenchOptions, count: int) -> list[bytes]:
    import msgspec

    encode = msgspec.json.encode
    return [
        encode({"model": "bench", "prompt": p, "max_tokens": 1, "stream": options.stream})
        for p in make_prompts(options.num_groups, options.prompt_chars, count)
    ]


def parse_peer(spec: str) -> tuple[str, str]:
    """``(label, command)`` of a peer: ``LABEL=COMMAND``, or a bare command labelled by
    its ``-m`` module or program name. Raises ``ValueError`` for an empty command, bad
    quoting, or one without ``{port}``.

    >>> parse_peer("sgl=python -m sglang_router.launch_router --port {port}")[0]
    'sgl'
    >>> parse_peer("python -m sglang_router.launch_router --port={port}")[0]
    'sglang_router.launch_router'
    """
    head, sep, rest = spec.partition("=")
    if sep and head and not any(c.isspace() for c in head):
        label, command = head, rest.strip()
    else:
        label, command = "", spec.strip()
    argv = shlex.split(command)
    if not argv:
        raise ValueError(f"empty peer command in {spec!r}")
    if "{port}" not in command:
        raise ValueError(f"a peer command must listen on {{port}}: {command!r}")
    if not label:
        label = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else Path(argv[0]).name
    return label, command


class _PeerProcess:
    """A peer router started in front of the backend; its output goes to a temp file,
    shown when it fails to come up."""

    def __init__(self, spec: str, backend_url: str) -> None:
        self.label, self.command = parse_peer(spec)
        port = free_port()
        argv = [
            arg.replace("{port}", str(port)).replace("{backend}", backend_url)
            for arg in shlex.split(self.command)
        ]
        self.url = f"http://127.0.0.1:{port}/v1/completions"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        try:
            self._proc = subprocess.Popen(
                argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as exc:
            self._log.close()
            raise RuntimeError(f"peer {self.label!r} did not start: {exc}") from exc

    async def wait_ready(self, probe: bytes, timeout_s: float) -> None:
        """Until a completion through the peer succeeds; its exit or the timeout raises."""
        import aiohttp

        deadline = time.monotonic() + timeout_s
        headers = {"Content-Type": "application/json"}
        last = "no answer"
        # A peer that accepts and then hangs must not outlast the deadline.
        probe_timeout = aiohttp.ClientTimeout(total=5.0)
        async with aiohttp.ClientSession(timeout=probe_timeout) as session:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise RuntimeError(f"peer {self.label!r} exited with {code}: {self._tail()}")
                try:
                    async with session.post(self.url, data=probe, headers=headers) as response:
                        await response.read()
                        if response.status == 200:
                            return
                        last = f"last answer {response.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = f"last try: {exc!r}"
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"peer {self.label!r} did not answer within {timeout_s:.0f} s "
                        f"({last}): {self._tail()}"
                    )
                await asyncio.sleep(0.2)

    def _tail(self, limit: int = 800) -> str:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip()
        return text[-limit:] or "(no output)"

    def stop(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)  # the whole session: launchers fork
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._log.close()


def _median_run(runs: Sequence[RunFigures]) -> RunFigures:
    """The run with the median requests/s (the lower one of an even count)."""
    ordered = sorted(runs, key=lambda run: run.requests_per_s)
    return ordered[(len(ordered) - 1) // 2]


def _measure(
    urls: Sequence[str],
    options: BenchOptions,
    progress: Callable[[str], None],
    names: Sequence[str],
) -> list[RunFigures]:
    """Warm every target, then ``rounds`` rounds over all of them in turn; the median."""
    bodies = _bodies(options, options.num_requests)
    warm = _bodies(options, options.warmup_requests)

    def drive(url: str, batch: list[bytes]) -> RunFigures:
        return asyncio.run(_drive(url, batch, options.concurrency, options.stream))

    for url in urls:
        drive(url, warm)
    runs: list[list[RunFigures]] = [[] for _ in urls]
    for round_index in range(options.rounds):
        for name, url, mine in zip(names, urls, runs, strict=True):
            mine.append(drive(url, bodies))
            progress(
                f"round {round_index + 1}/{options.rounds} {name}: "
                f"{mine[-1].requests_per_s:.0f} requests/s"
            )
    return [_median_run(mine) for mine in runs]


def run_gateway_bench(
    options: BenchOptions, progress: Callable[[str], None] | None = None
) -> BenchResult:
    """Start the backend, the gateway and any peers, measure every path, stop them all.

    ``progress`` gets a line after every measured run (``None``: silent).
    """
    from kvrouter.gateway.server import install_uvloop

    install_uvloop()
    say = progress or (lambda _line: None)
    backend, backend_port = _start(
        [sys.executable, "-m", "kvrouter.gateway.backend", "--port", "0"], r"port (\d+)"
    )
    backend_url = f"http://127.0.0.1:{backend_port}"
    gateway = None
    peers: list[_PeerProcess] = []
    try:
        gateway, gateway_port = _start(
            [
                sys.executable, "-m", "kvrouter", "serve", "--port", "0",
                "--workers", backend_url,
                "--router-mode", options.router_mode, "--tokenizer", "builtin",
                "--log-level", "WARNING",
            ],
            r"gateway on http://[\d.]+:(\d+)",
        )  # fmt: skip
        probe = _bodies(options, 1)[0]
        for spec in options.peers:
            peers.append(_PeerProcess(spec, backend_url))
            asyncio.run(peers[-1].wait_ready(probe, options.peer_start_timeout_s))
        urls = [f"{backend_url}/v1/completions", f"http://127.0.0.1:{gateway_port}/v1/completions"]
        names = ["straight", "gateway", *(peer.label for peer in peers)]
        figures = _measure([*urls, *(peer.url for peer in peers)], options, say, names)
    finally:
        for peer in peers:
            peer.stop()
        for proc in (gateway, backend):
            if proc is not None:
                _stop(proc)
    return BenchResult(
        options,
        figures[0],
        figures[1],
        [
            PeerFigures(peer.label, peer.command, fig)
            for peer, fig in zip(peers, figures[2:], strict=True)
        ],
    )
