"""Workloads: token synthesis, trace loading, generators, arrivals, the reuse limit."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from kvrouter.bench.workloads import (
    Arrivals,
    Request,
    Segment,
    apply_arrivals,
    builtin_workload,
    load_mooncake_trace,
    multi_turn_requests,
    no_reuse_requests,
    prefix_reuse_limit,
    prompt_text,
    shared_prefix_requests,
    synthesize_tokens,
)
from kvrouter.errors import ConfigError


def _write_trace(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_equal_ids_give_equal_tokens_and_different_ids_differ() -> None:
    a = synthesize_tokens([Segment(7, 512), Segment(9, 512)])
    b = synthesize_tokens([Segment(7, 512), Segment(3, 512)])
    assert a.dtype == np.uint32
    assert np.array_equal(a[:512], b[:512])
    assert not np.array_equal(a[512:], b[512:])
    # A block's tokens do not depend on where in the prompt it sits.
    c = synthesize_tokens([Segment(9, 512)])
    assert np.array_equal(a[512:], c)


def test_partial_segment_is_a_prefix_of_the_full_one() -> None:
    full = synthesize_tokens([Segment(42, 512)])
    part = synthesize_tokens([Segment(42, 100)])
    assert len(part) == 100
    assert np.array_equal(full[:100], part)


def test_tokens_stay_inside_the_vocabulary() -> None:
    tokens = synthesize_tokens([Segment(i, 512) for i in range(20)], vocab_size=1000)
    assert int(tokens.min()) >= 100
    assert int(tokens.max()) < 1000


def test_empty_prompt_and_bad_vocab() -> None:
    assert len(synthesize_tokens([])) == 0
    with pytest.raises(ValueError, match="vocab_size"):
        synthesize_tokens([Segment(1, 4)], vocab_size=50)


def test_mooncake_trace_last_block_is_partial(tmp_path: Path) -> None:
    path = _write_trace(
        tmp_path / "t.jsonl",
        [
            {"timestamp": 1500, "input_length": 1100, "output_length": 7, "hash_ids": [4, 5, 6]},
            {"timestamp": 2500, "input_length": 512, "output_length": 0, "hash_ids": [4]},
        ],
    )
    first, second = load_mooncake_trace(path)
    assert first.segments == (Segment(4, 512), Segment(5, 512), Segment(6, 76))
    assert first.input_length == 1100
    assert len(first.token_ids()) == 1100
    assert first.arrival_s == 1.5
    assert first.output_length == 7
    assert second.output_length == 1  # at least one token is always generated
    assert np.array_equal(first.token_ids()[:512], second.token_ids())


def test_mooncake_trace_rejects_lengths_that_do_not_fit(tmp_path: Path) -> None:
    path = _write_trace(
        tmp_path / "bad.jsonl",
        [{"timestamp": 0, "input_length": 1100, "output_length": 1, "hash_ids": [1, 2]}],
    )
    with pytest.raises(ValueError, match="line 1"):
        load_mooncake_trace(path)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("# a title", "not JSON (Expecting value at column 1)"),
        ('{"timestamp": 0', "not JSON (Expecting ',' delimiter at column 16)"),
        (
            '{"timestamp": 0, "hash_ids": [1]}',
            "not a Mooncake record (an object with timestamp, input_length, output_length, "
            "hash_ids)",
        ),
        ("[1, 2]", "not a Mooncake record"),
        (
            '{"timestamp": 0, "input_length": "ten", "output_length": 1, "hash_ids": [1]}',
            "a field is not a number or a list of numbers",
        ),
        (
            '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": 7}',
            "a field is not a number or a list of numbers",
        ),
    ],
)
def test_mooncake_trace_errors_name_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    good = {"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + line + "\n")
    with pytest.raises(ConfigError) as caught:
        load_mooncake_trace(path)
    assert str(caught.value).startswith(f"trace {path} line 3: {why}")
    assert isinstance(caught.value, ValueError)


def test_mooncake_trace_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\x80\n")
    with pytest.raises(ConfigError, match=r"line 1: not UTF-8 text"):
        load_mooncake_trace(path)


def test_shared_trace_head(trace_path: Path) -> None:
    requests = load_mooncake_trace(trace_path, limit=200)
    assert len(requests) == 200
    assert requests[0].request_id == "trace-0"
    assert requests[0].input_length == 6758
    assert len(requests[0].segments) == 14
    # Every trace request starts with hash id 0: the same first 512 tokens.
    assert np.array_equal(requests[0].token_ids()[:512], requests[1].token_ids()[:512])


def test_generators_are_seeded() -> None:
    a = shared_prefix_requests(
        num_groups=3, prompts_per_group=4, system_prompt_len=64, question_len=8, output_len=2
    )
    b = shared_prefix_requests(
        num_groups=3, prompts_per_group=4, system_prompt_len=64, question_len=8, output_len=2
    )
    c = shared_prefix_requests(
        num_groups=3,
        prompts_per_group=4,
        system_prompt_len=64,
        question_len=8,
        output_len=2,
        seed=1,
    )
    assert a == b
    assert [r.request_id for r in a] != [r.request_id for r in c]
    assert len({r.segments[0] for r in a}) == 3
    assert len({r.segments[1] for r in a}) == 12


def test_multi_turn_prompts_extend_the_conversation() -> None:
    requests = multi_turn_requests(
        num_sessions=2, turns=3, system_prompt_len=100, user_len=10, output_len=5
    )
    assert requests == sorted(requests, key=lambda r: r.arrival_s)
    turns = sorted((r for r in requests if r.session_id == 0), key=lambda r: r.turn)
    assert [r.input_length for r in turns] == [110, 125, 140]
    for earlier, later in itertools.pairwise(turns):
        assert later.segments[: len(earlier.segments)] == earlier.segments
        assert later.arrival_s > earlier.arrival_s
    assert (
        multi_turn_requests(
            num_sessions=2, turns=3, system_prompt_len=100, user_len=10, output_len=5
        )
        == requests
    )


def test_no_reuse_and_builtin_workloads() -> None:
    unique = no_reuse_requests(num_requests=5, input_len=128, output_len=4)
    assert prefix_reuse_limit(unique, 64) == 0.0
    assert len(builtin_workload("shared-prefix", scale=0.1)) == 32 * 2
    with pytest.raises(ValueError, match="unknown workload"):
        builtin_workload("nope")


def test_prompt_text_shares_prefixes() -> None:
    a = Request("a", 0.0, (Segment(1, 16), Segment(2, 16)), 1)
    b = Request("b", 0.0, (Segment(1, 16), Segment(3, 16)), 1)
    words_a, words_b = prompt_text(a).split(), prompt_text(b).split()
    assert len(words_a) == 32
    assert words_a[:16] == words_b[:16]
    assert words_a[16:] != words_b[16:]


def _at(requests: list[Request]) -> list[float]:
    return [r.arrival_s for r in requests]


def test_trace_arrivals_divide_by_speedup() -> None:
    requests = [
        Request("b", 12.0, (Segment(1, 4),), 1),
        Request("a", 10.0, (Segment(2, 4),), 1),
    ]
    out = apply_arrivals(requests, Arrivals("trace", speedup=4.0))
    assert [r.request_id for r in out] == ["a", "b"]
    assert _at(out) == [0.0, 0.5]


def test_poisson_arrivals_are_seeded_and_at_the_rate() -> None:
    requests = no_reuse_requests(num_requests=2000, input_len=4, output_len=1)
    a = apply_arrivals(requests, Arrivals("poisson", rate=50.0, seed=3))
    b = apply_arrivals(requests, Arrivals("poisson", rate=50.0, seed=3))
    c = apply_arrivals(requests, Arrivals("poisson", rate=50.0, seed=4))
    assert _at(a) == _at(b)
    assert _at(a) != _at(c)
    assert _at(a)[0] == 0.0
    assert _at(a) == sorted(_at(a))
    assert 2000 / _at(a)[-1] == pytest.approx(50.0, rel=0.1)


def test_concurrency_arrivals_keep_order() -> None:
    requests = [Request(str(i), float(10 - i), (Segment(i, 4),), 1) for i in range(3)]
    out = apply_arrivals(requests, Arrivals("concurrency", concurrency=2))
    assert [r.request_id for r in out] == ["0", "1", "2"]
    assert _at(out) == [0.0, 0.0, 0.0]
    assert Arrivals("concurrency", concurrency=2).closed_loop


def test_arrivals_validate() -> None:
    with pytest.raises(ConfigError, match=r"^speedup must be positive, got 0$"):
        Arrivals("trace", speedup=0)
    with pytest.raises(ConfigError, match=r"^rate must be positive, got -1\.0$"):
        Arrivals("poisson", rate=-1.0)
    with pytest.raises(ConfigError, match=r"^concurrency must be positive, got 0$"):
        Arrivals("concurrency", concurrency=0)
    with pytest.raises(ValueError, match="unknown"):
        Arrivals("burst")  # type: ignore[arg-type]


def test_reuse_limit_on_a_hand_made_trace(tmp_path: Path) -> None:
    path = _write_trace(
        tmp_path / "t.jsonl",
        [
            {"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]},
            # shares block 1 (512 tokens) of 1000
            {"timestamp": 1, "input_length": 1000, "output_length": 1, "hash_ids": [1, 3]},
            # shares all 1024 tokens; its partial third block is new
            {"timestamp": 2, "input_length": 1100, "output_length": 1, "hash_ids": [1, 2, 4]},
            # its first block is only a partial block 1 seen before: 300 tokens
            {"timestamp": 3, "input_length": 300, "output_length": 1, "hash_ids": [1]},
            # a different first block: nothing
            {"timestamp": 4, "input_length": 512, "output_length": 1, "hash_ids": [9]},
        ],
    )
    requests = load_mooncake_trace(path)
    total = 1024 + 1000 + 1100 + 300 + 512
    assert prefix_reuse_limit(requests, 512) == (512 + 1024) / total
    # At 64-token blocks the partial overlaps count in whole blocks: 300 -> 256.
    assert prefix_reuse_limit(requests, 64) == (512 + 1024 + 256) / total
    with pytest.raises(ValueError, match="block_size"):
        prefix_reuse_limit(requests, 0)


def test_reuse_limit_matches_a_block_by_block_count() -> None:
    requests = multi_turn_requests(
        num_sessions=3, turns=4, system_prompt_len=70, user_len=33, output_len=9
    )
    seen: set[bytes] = set()
    hits = 0
    for r in requests:
        tokens = r.token_ids()
        missed = False
        for end in range(16, len(tokens) + 1, 16):
            key = tokens[:end].tobytes()
            if key in seen and not missed:
                hits += 16
            else:
                missed = True
            seen.add(key)
    total = sum(r.input_length for r in requests)
    assert prefix_reuse_limit(requests, 16) == hits / total
