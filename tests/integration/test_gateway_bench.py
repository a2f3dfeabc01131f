"""``kvrouter bench gateway`` with real processes: backend, gateway and a peer router."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from kvrouter.cli import app
from kvrouter.gateway.bench import BenchOptions, run_gateway_bench

# A second kvrouter gateway stands in for another router: it is started from a command
# template like any peer, in front of the same backend.
_PEER = (
    f"second={sys.executable} -m kvrouter serve --port {{port}} --workers {{backend}} "
    "--tokenizer builtin --log-level WARNING"
)
# The backend module's forwarding mode: the plainest proxy, a reference for the others.
_PLAIN = (
    f"plain={sys.executable} -m kvrouter.gateway.backend --forward-to {{backend}} --port {{port}}"
)


def test_measures_the_gateway_and_peers_on_the_same_requests() -> None:
    lines: list[str] = []
    options = BenchOptions(
        num_requests=60, concurrency=4, warmup_requests=8, prompt_chars=400,
        peers=(_PEER, _PLAIN), rounds=2,
    )  # fmt: skip
    result = run_gateway_bench(options, lines.append)

    assert [peer.label for peer in result.peers] == ["second", "plain"]
    for figures in (result.direct, result.gateway, *(peer.figures for peer in result.peers)):
        assert figures.num_errors == 0
        assert figures.requests_per_s > 0
        assert 0 < figures.p50_ms <= figures.p99_ms
    # Two rounds over four targets, one progress line each, in turn.
    targets = ("straight", "gateway", "second", "plain")
    assert [line.split(":")[0] for line in lines] == [
        f"round {r}/2 {name}" for r in (1, 2) for name in targets
    ]


def test_cli_prints_a_row_per_peer_and_json() -> None:
    args = ["bench", "gateway", "--num-requests", "30", "--concurrency", "2",
            "--prompt-chars", "200", "--peer", _PEER]  # fmt: skip
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "through second" in table.output
    assert "round 1/1 second" in table.output  # progress, on stderr

    as_json = CliRunner().invoke(app, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["peers"][0]["label"] == "second"
    assert data["peers"][0]["figures"]["num_errors"] == 0


def test_a_peer_that_exits_is_a_clear_error_and_stops_everything() -> None:
    dead = f"dead={sys.executable} -c 'import sys; print(\"no such option\"); sys.exit(3)' {{port}}"
    options = BenchOptions(num_requests=10, warmup_requests=1, peers=(dead,))
    with pytest.raises(RuntimeError, match=r"peer 'dead' exited with 3: no such option"):
        run_gateway_bench(options)


def test_a_peer_that_never_answers_200_times_out_with_its_last_answer() -> None:
    # A plain proxy to a path the backend does not serve: it answers 404, never 200.
    wrong = (
        f"wrong={sys.executable} -m kvrouter.gateway.backend "
        "--forward-to {backend}/nowhere --port {port}"
    )
    options = BenchOptions(
        num_requests=10, warmup_requests=1, peers=(wrong,), peer_start_timeout_s=2.0
    )
    with pytest.raises(RuntimeError, match=r"did not answer within 2 s \(last answer 404\)"):
        run_gateway_bench(options)
