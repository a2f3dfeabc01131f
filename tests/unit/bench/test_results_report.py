"""Summaries of per-request records, results files and rendered reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrouter.bench.report import collect_runs, load_imbalance, markdown_table, write_report
from kvrouter.bench.results import (
    RequestRecord,
    RunResult,
    Series,
    load_results,
    percentile,
    results_document,
    save_results,
    summarize,
)
from kvrouter.errors import ConfigError


def _records() -> list[RequestRecord]:
    return [
        RequestRecord("a", 0.0, 0.1, 1.1, 100, 50, 11, worker=0),
        RequestRecord("b", 1.0, 1.3, 2.3, 200, 0, 6, worker=1),
        RequestRecord("c", 2.0, None, None, 300, 0, 0, worker=1, error="HTTP 500"),
    ]


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([0.0, 10.0], 90) == 9.0


def test_summarize_exact_figures() -> None:
    result = summarize(_records(), wall_s=2.0)
    f = result.figures
    assert f["completed"] == 2
    assert result.extra == {"requests": 3, "errors": 1, "error_messages": {"HTTP 500": 1}}
    assert f["ttft_mean_ms"] == pytest.approx(200.0)
    assert f["ttft_p50_ms"] == pytest.approx(200.0)
    assert f["e2e_mean_ms"] == pytest.approx((1100.0 + 1300.0) / 2)
    # 2000 ms of decoding over 10 + 5 gaps
    assert f["itl_mean_ms"] == pytest.approx(2000.0 / 15)
    assert f["throughput_tok_s"] == pytest.approx(17 / 2.3)
    assert f["prefix_reuse"] == pytest.approx(50 / 300)
    assert result.per_worker["0"] == {
        "requests": 1,
        "prompt_tokens": 100,
        "cached_tokens": 50,
        "prefix_reuse": 0.5,
    }
    assert result.per_worker["1"]["requests"] == 1
    assert load_imbalance(result) == pytest.approx(200 / 150)


def test_summarize_with_nothing_done() -> None:
    result = summarize([_records()[2]], wall_s=0.1)
    assert result.figures["completed"] == 0
    assert result.figures["ttft_mean_ms"] is None
    assert result.figures["prefix_reuse"] is None


def test_results_round_trip(tmp_path: Path) -> None:
    series = Series(t_s=[1.0, 2.0], active={"0": [1, 0], "1": [2, 1]}, hit_rate=[None, 0.5])
    run = summarize(_records(), wall_s=2.0, series=series)
    path = save_results(tmp_path / "out" / "r.json", results_document({"kv": run}, reuse_limit=0.4))
    doc = load_results(path)
    back = RunResult.from_json(doc["policies"]["kv"])
    assert back.figures == run.figures
    assert back.per_worker == run.per_worker
    assert back.series == series
    assert back.ttft_ms == run.ttft_ms
    assert back.extra == run.extra
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not a results file"):
        load_results(tmp_path / "bad.json")
    (tmp_path / "notes.md").write_text("# results\n")
    with pytest.raises(ConfigError) as caught:
        load_results(tmp_path / "notes.md")
    assert str(caught.value) == (
        f"{tmp_path / 'notes.md'} is not JSON (Expecting value at line 1 column 1)"
    )
    (tmp_path / "binary.json").write_bytes(b"\x80")
    with pytest.raises(ConfigError, match=r"binary\.json is not JSON \(not UTF-8 text\)"):
        load_results(tmp_path / "binary.json")


def _results_file(
    tmp_path: Path, name: str, ttft_scale: float, limit: float = 0.5, file: str | None = None
) -> Path:
    series = Series(
        t_s=[1.0, 2.0, 3.0], active={"0": [1, 2, 0], "1": [0, 1, 1]}, hit_rate=[0.1, None, 0.3]
    )
    records = [
        RequestRecord(f"r{i}", float(i), i + 0.05 * ttft_scale, i + 1.0, 100, 40, 5, worker=i % 2)
        for i in range(6)
    ]
    run = summarize(records, wall_s=0.5, series=series)
    doc = results_document({name: run}, reuse_limit=limit)
    return save_results(tmp_path / f"{file or name}.json", doc)


def test_report_renders_every_file(tmp_path: Path) -> None:
    kv = _results_file(tmp_path, "kv", 1.0)
    rr = _results_file(tmp_path, "round_robin", 4.0)
    sweep = tmp_path / "sweep.json"
    sweep.write_text(
        json.dumps(
            {
                "sweep": [
                    {
                        "speedup": 1,
                        "policies": {
                            "kv": {"ttft_mean_ms": 50.0},
                            "random": {"ttft_mean_ms": 80.0},
                        },
                    },
                    {
                        "speedup": 2,
                        "policies": {
                            "kv": {"ttft_mean_ms": 70.0, "throughput_tok_s": 120.0},
                            "random": {"ttft_mean_ms": 900.0, "throughput_tok_s": 95.5},
                        },
                    },
                ],
                "reuse_limit": 0.5,
            }
        )
    )
    files = write_report([kv, rr, sweep], tmp_path / "report")
    names = sorted(p.name for p in files.images)
    assert names == [
        "hit_rate.png",
        "load.png",
        "sweep.png",
        "sweep_throughput.png",
        "ttft_cdf.png",
    ]
    for image in files.images:
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = files.markdown.read_text()
    assert "| kv |" in markdown and "| round_robin |" in markdown
    assert "| 2 | 70.0 | 900.0 |" in markdown
    assert "| 2 | 120.0 | 95.5 |" in markdown  # output tokens/s
    assert "| 1 | - | - |" in markdown  # a figure the sweep point lacks
    page = files.html.read_text()
    assert page.count("data:image/png;base64,") == 5
    assert "<td>round_robin</td>" in page


def test_markdown_table_columns(tmp_path: Path) -> None:
    runs, limits = collect_runs([_results_file(tmp_path, "kv", 1.0)])
    assert limits == {"kv": 0.5}
    table = markdown_table(runs, limits)
    header, rule, row = table.splitlines()[:3]
    assert header.startswith("| run | TTFT mean ms |")
    assert rule.count("|") == header.count("|")
    assert "80.0%" in row  # 40% reuse of a 50% limit


def test_runs_of_several_files_keep_their_own_limit(tmp_path: Path) -> None:
    (tmp_path / "live").mkdir()
    files = [
        _results_file(tmp_path, "kv", 1.0, limit=0.5, file="sim"),
        _results_file(tmp_path, "kv", 1.0, limit=0.8, file="live/results"),
        _results_file(tmp_path, "round_robin", 4.0, limit=0.8, file="rr"),
    ]
    runs, limits = collect_runs(files)
    assert limits == {"sim:kv": 0.5, "live:kv": 0.8, "round_robin": 0.8}
    table = markdown_table(runs, limits)
    rows = {line.split(" | ")[0]: line for line in table.splitlines()}
    assert "| 80.0% |" in rows["| sim:kv"]  # 40% reuse of a 50% limit
    assert "| 50.0% |" in rows["| live:kv"]  # of an 80% limit
    assert "its own workload" in table
    assert "Prefix-reuse limit" not in table  # no one limit to name
