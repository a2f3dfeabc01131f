"""``kvrouter top``: one frame rendered from a canned ``/dashboard/data`` document."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from kvrouter.gateway.top import PIPED_WIDTH, Poll, default_console, render_frame, run_top


def _document(decisions: int, requests: int, overlap: int, prompt: int) -> dict[str, Any]:
    return {
        "core": {
            "policy": "kv",
            "block_size": 16,
            "index_blocks": 1234,
            "decisions": decisions,
            "overlap_blocks_total": overlap,
            "prompt_blocks_total": prompt,
            "workers": {
                "0": {
                    "index_size": 980,
                    "active_blocks": 120,
                    "prefill_tokens": 512,
                    "metrics_age_s": 0.4,
                    "load": 0.12,
                    "kv_usage": 0.1,
                    "prefix_hit_rate": 0.55,
                    "waiting": 2,
                    "decisions": decisions,
                }
            },
        },
        "in_flight": 3,
        "retries": 1,
        "upstream_errors": {"status": 2},
        "requests": requests,
        "workers": [
            {
                "worker_id": 0,
                "dp_rank": 0,
                "url": "http://w0:8001",
                "healthy": True,
                "num_in_flight": 3,
                "num_requests": requests,
                "metrics_age_s": 0.4,
            },
            {
                "worker_id": 1,
                "dp_rank": 1,
                "url": "http://w1:8001",
                "healthy": False,
                "num_in_flight": 0,
                "num_requests": 0,
                "metrics_age_s": None,
            },
        ],
    }


def _text(renderable: Any) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def _row(text: str, url: str) -> list[str]:
    line = next(line for line in text.splitlines() if url in line)
    return [cell.strip() for cell in line.strip("│┃ ").split("│")]


def test_one_frame_with_rates_from_two_polls() -> None:
    before = Poll(10.0, _document(decisions=100, requests=100, overlap=50, prompt=100))
    now = Poll(12.0, _document(decisions=182, requests=180, overlap=110, prompt=180))
    text = _text(render_frame(now, before, url="http://gw:8000"))
    assert "kvrouter http://gw:8000" in text
    assert "requests/s 40.0" in text
    assert "router hit rate 75%" in text  # (110 - 50) / (180 - 100)
    assert "upstream errors 2" in text
    assert _row(text, "http://w0:8001") == [
        "0", "http://w0:8001", "up", "3", "120", "512", "12%", "10%", "55%", "2",
        "0.4 s", "980", "41.0", "180",
    ]  # fmt: skip
    assert _row(text, "http://w1:8001") == [
        "1 dp1", "http://w1:8001", "DOWN", "0", "0", "0", "-", "-", "-", "-", "-", "0", "-", "0",
    ]  # fmt: skip


def test_first_frame_has_no_rates_and_lifetime_hit_rate() -> None:
    text = _text(render_frame(Poll(1.0, _document(10, 10, 3, 12))))
    assert "requests/s -" in text
    assert "router hit rate 25%" in text
    assert _row(text, "http://w0:8001")[12] == "-"


def test_run_top_draws_frames_and_reports_an_unreachable_gateway() -> None:
    documents: list[dict[str, Any] | OSError] = [
        _document(1, 1, 0, 4),
        OSError("connection refused"),
    ]

    def fetch(url: str) -> dict[str, Any]:
        item = documents.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None, force_terminal=False)
    run_top("http://gw:8000", 0.001, console=console, fetch=fetch, max_frames=2)
    # Not a terminal: every poll prints its frame, the table first, then the error.
    text = out.getvalue()
    assert "kvrouter http://gw:8000" in text and "connection refused" in text
    assert text.index("kvrouter http://gw:8000") < text.index("connection refused")


def test_a_piped_frame_is_wide_enough_for_every_column(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()  # not a terminal, as under ``kvrouter top | tee log``
    console = default_console(out)
    assert console.width == PIPED_WIDTH
    console.print(render_frame(Poll(0.0, _document(1, 1, 0, 4)), None, url="http://gw:8000"))
    text = out.getvalue()
    assert "…" not in text
    assert "http://w0:8001" in text and "requests" in text


def test_columns_still_sets_a_piped_frame_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert default_console(io.StringIO()).width == 100
