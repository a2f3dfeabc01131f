"""``kvrouter top``: a live terminal view of a running gateway.

It polls the gateway's ``GET /dashboard/data`` (the document the web dashboard reads)
every ``--interval`` seconds and redraws one table, one row per worker::

    kvrouter top --url http://127.0.0.1:8000 --interval 1

    worker  health  in flight  active blk  prefill tok  load  kv usage  metrics age  dec/s
    0       up              3         120          512   12%       10%        0.4 s   41.0
    1 dp1   DOWN            0           0            0    0%         -            -    0.0

A worker is shown by its id, with its data-parallel rank when that is not 0.

Rates (decisions/s, requests/s) are differences between two polls, so the first frame
shows none. The fleet's cache hit rate is the router's: matched prompt blocks over all
routed prompt blocks, since the previous poll. Ctrl-C exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

__all__ = ["Poll", "fetch_dashboard_data", "render_frame", "run_top"]

DATA_PATH = "/dashboard/data"


@dataclass(frozen=True, slots=True)
class Poll:
    """One document from ``/dashboard/data`` and when it was read (monotonic seconds)."""

    time_s: float
    data: Mapping[str, Any]


def fetch_dashboard_data(
    url: str, timeout_s: float = 2.0, api_key: str | None = None
) -> dict[str, Any]:
    """``GET {url}/dashboard/data`` as a dict; raises ``OSError`` when unreachable (or
    refused: a gateway with an admin key wants ``api_key``)."""
    request = urllib.request.Request(url.rstrip("/") + DATA_PATH)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        data = json.loads(resp.read())
    if not isinstance(data, dict):
        raise ValueError(f"{url}{DATA_PATH} did not answer a JSON object")
    return data


def render_frame(current: Poll, previous: Poll | None = None, *, url: str = "") -> Group:
    """The view of ``current``; rates need the ``previous`` poll."""
    data = current.data
    core = data.get("core") or {}
    elapsed_s = current.time_s - previous.time_s if previous is not None else 0.0
    before = previous.data if previous is not None and elapsed_s > 0 else None
    return Group(_header(data, core, before, elapsed_s, url), _table(data, core, before, elapsed_s))


def _header(
    data: Mapping[str, Any],
    core: Mapping[str, Any],
    before: Mapping[str, Any] | None,
    elapsed_s: float,
    url: str,
) -> Text:
    requests_rate = _rate(data.get("requests"), before and before.get("requests"), elapsed_s)
    hit = _hit_rate(core, before.get("core") if before else None)
    errors = sum((data.get("upstream_errors") or {}).values())
    parts = [
        f"kvrouter {url}".rstrip(),
        f"policy {core.get('policy', '?')}",
        f"block size {core.get('block_size', '?')}",
        f"in flight {data.get('in_flight', 0)}",
        f"requests/s {_num(requests_rate)}",
        f"router hit rate {_pct(hit)}",
        f"index blocks {core.get('index_blocks', 0)}",
        f"retries {data.get('retries', 0)}",
        f"upstream errors {errors}",
    ]
    return Text("  ".join(parts), style="bold")


_COLUMNS = (
    "worker",
    "url",
    "health",
    "in flight",
    "active blk",
    "prefill tok",
    "load",
    "kv usage",
    "engine hit",
    "waiting",
    "metrics age",
    "index",
    "dec/s",
    "requests",
)


def _table(
    data: Mapping[str, Any],
    core: Mapping[str, Any],
    before: Mapping[str, Any] | None,
    elapsed_s: float,
) -> Table:
    table = Table(expand=False, header_style="bold cyan")
    for name in _COLUMNS:
        table.add_column(name, justify="left" if name in ("worker", "url", "health") else "right")
    routing = core.get("workers") or {}
    old_routing = ((before or {}).get("core") or {}).get("workers") or {}
    for worker in data.get("workers") or []:
        key = str(worker.get("worker_id"))
        state = routing.get(key) or {}
        old = old_routing.get(key) or {}
        decisions_rate = _rate(state.get("decisions"), old.get("decisions"), elapsed_s)
        table.add_row(*_row(worker, state, decisions_rate))
    return table


def _row(
    worker: Mapping[str, Any], state: Mapping[str, Any], decisions_rate: float | None
) -> list[str | Text]:
    healthy = bool(worker.get("healthy"))
    age = worker.get("metrics_age_s")
    return [
        _worker_label(worker),
        str(worker.get("url", "")),
        Text("up", style="green") if healthy else Text("DOWN", style="bold red"),
        str(worker.get("num_in_flight", 0)),
        str(state.get("active_blocks", 0)),
        str(state.get("prefill_tokens", 0)),
        _pct(state.get("load")),
        _pct(state.get("kv_usage")),
        _pct(state.get("prefix_hit_rate")),
        "-" if state.get("waiting") is None else str(state["waiting"]),
        "-" if age is None else f"{age:.1f} s",
        str(state.get("index_size", 0)),
        _num(decisions_rate),
        str(worker.get("num_requests", 0)),
    ]


def _rate(now: Any, before: Any, elapsed_s: float) -> float | None:
    if not isinstance(now, int | float) or not isinstance(before, int | float) or elapsed_s <= 0:
        return None
    return max(0.0, (now - before) / elapsed_s)


def _hit_rate(core: Mapping[str, Any], before: Mapping[str, Any] | None) -> float | None:
    """Matched over routed prompt blocks since ``before`` (or since the start)."""
    matched = core.get("overlap_blocks_total")
    total = core.get("prompt_blocks_total")
    if not isinstance(matched, int) or not isinstance(total, int):
        return None
    if before is not None:
        matched -= int(before.get("overlap_blocks_total") or 0)
        total -= int(before.get("prompt_blocks_total") or 0)
    return matched / total if total > 0 else None


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{100 * value:.0f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


PIPED_WIDTH = 200  # columns of a frame written to a pipe or a file


def default_console(file: IO[str] | None = None) -> Console:
    """A console on stdout (or ``file``). A terminal sets its own width; piped or logged,
    rich would assume 80 columns and squeeze the table's 14 columns into ellipses, so
    the frame gets :data:`PIPED_WIDTH` unless ``COLUMNS`` says otherwise."""
    console = Console(file=file)
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(file=file, width=PIPED_WIDTH)


def run_top(
    url: str,
    interval_s: float = 1.0,
    *,
    console: Console | None = None,
    fetch: Callable[[str], Mapping[str, Any]] = fetch_dashboard_data,
    clock: Callable[[], float] = time.monotonic,
    max_frames: int | None = None,
) -> None:
    """Poll ``url`` and redraw until Ctrl-C (or ``max_frames`` frames)."""
    from rich.live import Live

    if interval_s <= 0:
        raise ValueError(f"interval must be positive, got {interval_s}")
    console = console or default_console()
    previous: Poll | None = None
    frames = 0
    # On a terminal one frame is redrawn in place; piped or logged, every poll prints
    # its frame below the last (as ``top -b`` does), so the output is never empty.
    live = (
        Live(Text(f"connecting to {url} ..."), console=console, auto_refresh=False)
        if console.is_terminal
        else None
    )

    def show(frame: RenderableType) -> None:
        if live is not None:
            live.update(frame, refresh=True)
        else:
            console.print(frame)

    try:
        with live if live is not None else contextlib.nullcontext():
            while max_frames is None or frames < max_frames:
                try:
                    current = Poll(clock(), fetch(url))
                except (OSError, ValueError) as exc:
                    show(Text(f"{url}: {exc}", style="bold red"))
                else:
                    show(render_frame(current, previous, url=url))
                    previous = current
                frames += 1
                if max_frames is None or frames < max_frames:
                    time.sleep(interval_s)
    except KeyboardInterrupt:
        pass


def _worker_label(worker: Mapping[str, Any]) -> str:
    rank = worker.get("dp_rank") or 0
    return f"{worker.get('worker_id')}" + (f" dp{rank}" if rank else "")
