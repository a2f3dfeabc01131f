"""The bench commands, run through the real ``kvrouter`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvrouter.bench import cli as bench_cli
from kvrouter.bench.results import FIGURE_KEYS
from kvrouter.cli import app

runner = CliRunner()


def test_simulate_json_prints_one_object(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "bench", "simulate", "--workload", "no-reuse", "--limit", "12", "--workers", "2",
            "--rate", "20", "--policies", "kv,round_robin", "--json", "--out", str(tmp_path),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {"policies", "reuse_limit"}
    assert doc["reuse_limit"] == 0.0
    assert set(doc["policies"]) == {"kv", "round_robin"}
    for entry in doc["policies"].values():
        assert set(FIGURE_KEYS) <= set(entry)
        assert entry["completed"] == 12
    assert (tmp_path / "results.json").exists()
    assert (tmp_path / "report.html").exists()


def test_simulate_sweep(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "bench", "simulate", "--workload", "no-reuse", "--limit", "6", "--workers", "2",
            "--policies", "random", "--sweep", "1,2", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [p["speedup"] for p in doc["sweep"]] == [1.0, 2.0]
    assert doc["sweep"][1]["policies"]["random"]["completed"] == 6


def test_sweep_in_worker_processes_matches_one_process() -> None:
    args = [
        "bench", "simulate", "--workload", "multi-turn", "--limit", "24", "--workers", "2",
        "--policies", "kv,round_robin", "--sweep", "1,4", "--json",
    ]  # fmt: skip
    docs = []
    for jobs in ("1", "2"):
        result = runner.invoke(app, [*args, "--jobs", jobs])
        assert result.exit_code == 0, result.output
        docs.append(json.loads(result.stdout))
    for doc in docs:
        for point in doc["sweep"]:
            assert list(point["policies"]) == ["kv", "round_robin"]
            for figures in point["policies"].values():
                figures.pop("wall_s")
    assert docs[0] == docs[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "nope"], "nope"),
        (["--policies", "kv,direct"], "a workload names none"),
        (["--limit", "0"], "greater than or equal to 1"),
    ],
)
def test_bad_simulate_options_are_usage_errors(args: list[str], message: str) -> None:
    base = ["bench", "simulate", "--workload", "no-reuse", "--limit", "2"]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_report_command(tmp_path: Path) -> None:
    sim = runner.invoke(
        app,
        [
            "bench", "simulate", "--workload", "no-reuse", "--limit", "4", "--workers", "2",
            "--policies", "round_robin", "--out", str(tmp_path / "sim"),
        ],
    )  # fmt: skip
    assert sim.exit_code == 0, sim.output
    result = runner.invoke(
        app,
        ["bench", "report", str(tmp_path / "sim" / "results.json"), "--out", str(tmp_path / "r")],
    )
    assert result.exit_code == 0, result.output
    assert "round_robin" in result.stdout
    assert (tmp_path / "r" / "report.md").read_text().count("| round_robin |") == 1


def test_simulate_step_by_step_and_a_bad_window() -> None:
    args = [
        "bench", "simulate", "--workload", "shared-prefix", "--limit", "16", "--workers", "2",
        "--rate", "20", "--policies", "prefix_affinity", "--json",
    ]  # fmt: skip
    single = runner.invoke(app, [*args, "--max-decode-steps", "1"])
    windowed = runner.invoke(app, args)
    assert single.exit_code == windowed.exit_code == 0, single.output + windowed.output
    a = json.loads(single.stdout)["policies"]["prefix_affinity"]
    b = json.loads(windowed.stdout)["policies"]["prefix_affinity"]
    assert a["completed"] == b["completed"] == 16
    assert a["engine_steps"] == b["engine_steps"]
    assert abs(a["ttft_mean_ms"] - b["ttft_mean_ms"]) < 1e-6
    bad = runner.invoke(app, [*args, "--max-decode-steps", "0"])
    assert bad.exit_code == 2
    assert "max-decode-steps" in bad.output


def test_simulate_metrics_delay_option(tmp_path: Path) -> None:
    args = [
        "bench", "simulate", "--workload", "shared-prefix", "--limit", "20", "--workers", "2",
        "--rate", "40", "--policies", "kv", "--metrics-delay-ms", "400", "--out", str(tmp_path),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "results.json").read_text())
    assert (doc["meta"]["event_delay_ms"], doc["meta"]["metrics_delay_ms"]) == (5.0, 400.0)
    assert doc["policies"]["kv"]["completed"] == 20
    common = {"workers": 2, "engine_speedup": 1.0, "block_size": 16, "num_gpu_blocks": 64}
    config = bench_cli._sim_config(event_delay_ms=5.0, metrics_delay_ms=400.0, seed=0, **common)
    assert (config.event_delay_s, config.metrics_delay_s) == (0.005, 0.4)
    same = bench_cli._sim_config(event_delay_ms=5.0, seed=0, **common)
    assert same.metrics_delay_s is None  # the events' delay


def test_simulate_takes_the_option_names_of_serve_and_mocker(tmp_path: Path) -> None:
    args = [
        "bench", "simulate", "--workload", "no-reuse", "--limit", "8", "--workers", "2",
        "--rate", "20", "--policies", "kv", "--speedup-ratio", "2",
        "--router-queue-threshold", "4", "--router-queue-policy", "wspt", "--out", str(tmp_path),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["engine_speedup"] == 2.0
    assert meta["queue"] == {"threshold": 4.0, "policy": "wspt"}


def _trace(path: Path, *records: object) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD_RECORD = {"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}


def test_demo_with_no_workers_is_one_error_line() -> None:
    result = runner.invoke(app, ["demo", "--workers", "0"])
    assert result.exit_code == 2
    assert result.stderr == "error: --workers must be at least 1, got 0\n"


def test_demo_with_a_zero_speedup_is_one_error_line(tmp_path: Path) -> None:
    trace = _trace(tmp_path / "t.jsonl", GOOD_RECORD)
    result = runner.invoke(app, ["demo", "--speedup", "0", "--trace", str(trace)])
    assert result.exit_code == 2
    assert result.stderr == "error: speedup must be positive, got 0.0\n"


def test_a_trace_that_is_not_json_lines_names_file_and_line(tmp_path: Path) -> None:
    trace = tmp_path / "notes.md"
    trace.write_text(json.dumps(GOOD_RECORD) + "\n# not a record\n")
    for command in (["demo"], ["bench", "simulate"]):
        result = runner.invoke(app, [*command, "--trace", str(trace)])
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            f"error: trace {trace} line 2: not JSON (Expecting value at column 1)\n"
        )


def test_report_of_a_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text("# kvrouter\n")
    result = runner.invoke(app, ["bench", "report", str(path)])
    assert result.exit_code == 2
    assert result.stderr == f"error: {path} is not JSON (Expecting value at line 1 column 1)\n"


def test_report_of_json_that_is_not_results(tmp_path: Path) -> None:
    path = _trace(tmp_path / "t.json", GOOD_RECORD)
    result = runner.invoke(app, ["bench", "report", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.stderr == f"error: {path}: not a results file (no 'policies' object)\n"


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("1,x", "--sweep: 'x' is not a positive number (e.g. --sweep 1,2,4)"),
        ("2,0", "--sweep: '0' is not a positive number (e.g. --sweep 1,2,4)"),
        ("nan", "--sweep: 'nan' is not a positive number (e.g. --sweep 1,2,4)"),
        (",", "--sweep: no speedup in ',' (e.g. --sweep 1,2,4)"),
    ],
)
def test_bad_sweeps_are_one_error_line(sweep: str, message: str) -> None:
    result = runner.invoke(app, ["bench", "simulate", "--workload", "no-reuse", "--sweep", sweep])
    assert result.exit_code == 2
    assert result.stderr == f"error: {message}\n"


def test_simulate_with_a_zero_block_size_is_one_error_line() -> None:
    result = runner.invoke(app, ["bench", "simulate", "--block-size", "0"])
    assert result.exit_code == 2
    assert result.stderr == "error: block_size must be positive, got 0\n"
