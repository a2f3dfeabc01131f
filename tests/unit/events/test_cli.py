"""`kvrouter bench hashing` runs and reports every case (figures are not asserted)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from kvrouter.cli import app


def test_bench_hashing_json() -> None:
    args = ["bench", "hashing", "--json", "--num-tokens", "256", "--duration-s", "0.001"]
    result = CliRunner().invoke(app, [*args, "--block-size", "16", "--events"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["num_tokens"] == 256
    assert [(r["block_size"], r["input"], r["num_blocks"]) for r in report["hashing"]] == [
        (16, "list", 16),
        (16, "numpy-int64", 16),
        (16, "numpy-uint32", 16),
    ]
    assert all(r["tokens_per_s"] > 0 for r in report["hashing"])
    assert [r["scenario"] for r in report["events"]] == [
        "prefill/array",
        "decode-step/array",
        "prefill/map",
        "decode-step/map",
        "prefill/map-batch",
        "decode-step/map-batch",
    ]


def test_bench_hashing_text() -> None:
    args = ["bench", "hashing", "--num-tokens", "128", "--duration-s", "0.001"]
    result = CliRunner().invoke(app, [*args, "--block-size", "64"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "block hashing of a 128-token prompt (local + sequence hashes)"
    assert [line.split()[:3] for line in lines[2:]] == [
        ["64", "list", "2"],
        ["64", "numpy-int64", "2"],
        ["64", "numpy-uint32", "2"],
    ]


def test_bench_hashing_rejects_bad_sizes() -> None:
    result = CliRunner().invoke(app, ["bench", "hashing", "--block-size", "0"])
    assert result.exit_code != 0
