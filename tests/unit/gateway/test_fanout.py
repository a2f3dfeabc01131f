"""Batch completions: splitting a batch and merging its answers (pure parts)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvrouter.errors import InvalidRequest, UpstreamError
from kvrouter.gateway.fanout import (
    SseRewriter,
    UsageSum,
    first_event_id,
    merge_completions,
    split_batch,
    usage_chunk,
)
from kvrouter.gateway.prompts import batch_prompts, choices_per_prompt, parse_body


@pytest.mark.parametrize(
    "prompt",
    ["one prompt", [1, 2, 3], ["only one"], [[1, 2, 3]]],
)
def test_single_prompts_are_not_batches(prompt: Any) -> None:
    assert batch_prompts({"prompt": prompt}) is None


def test_batches_of_strings_and_of_token_lists() -> None:
    assert batch_prompts({"prompt": ["a", "b"]}) == ["a", "b"]
    assert batch_prompts({"prompt": [[1, 2], [3]]}) == [[1, 2], [3]]


@pytest.mark.parametrize(
    ("prompt", "bad"),
    [(["a", 5], 1), (["a", []], 1), ([[1, -2], "b"], 0), ([[1], [2**32]], 1), (["a", None], 1)],
)
def test_a_bad_element_of_a_batch_is_named(prompt: list[Any], bad: int) -> None:
    with pytest.raises(InvalidRequest, match=rf"prompt\[{bad}\] must be"):
        batch_prompts({"prompt": prompt})


def test_split_batch_keeps_every_other_field() -> None:
    body = {"model": "m", "prompt": ["a", [7, 8]], "max_tokens": 3, "stream": True, "n": 2}
    parsed = parse_body(json.dumps(body).encode(), "completion")
    subs = split_batch(parsed, ["a", [7, 8]])
    assert [json.loads(s.forward_body) for s in subs] == [
        {**body, "prompt": "a"},
        {**body, "prompt": [7, 8]},
    ]
    assert all(s.stream and s.payload == json.loads(s.forward_body) for s in subs)
    assert choices_per_prompt(body) == 2
    assert choices_per_prompt({"n": "2"}) == choices_per_prompt({}) == 1


def _answer(rid: str, texts: list[str], prompt: int, completion: int, cached: int | None) -> bytes:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    choices = [{"index": i, "text": t, "finish_reason": "length"} for i, t in enumerate(texts)]
    body = {"id": rid, "object": "text_completion", "model": "m", "choices": choices}
    return json.dumps({**body, "usage": usage}).encode()


def test_merged_answer_numbers_choices_as_vllm_does_and_sums_usage() -> None:
    bodies = [
        _answer("cmpl-a", ["a0", "a1"], 10, 2, 8),
        _answer("cmpl-b", ["b0", "b1"], 20, 4, None),
        _answer("cmpl-c", ["c0", "c1"], 30, 6, 16),
    ]
    merged = json.loads(merge_completions(bodies, n=2))
    assert [(c["index"], c["text"]) for c in merged["choices"]] == [
        (0, "a0"), (1, "a1"), (2, "b0"), (3, "b1"), (4, "c0"), (5, "c1")
    ]  # fmt: skip
    assert merged["usage"] == {
        "prompt_tokens": 60,
        "completion_tokens": 12,
        "total_tokens": 72,
        "prompt_tokens_details": {"cached_tokens": 24},
    }
    assert (merged["id"], merged["model"], merged["object"]) == ("cmpl-a", "m", "text_completion")


def test_merged_answer_without_usage_has_none_and_bad_json_is_an_upstream_error() -> None:
    merged = json.loads(merge_completions([b'{"choices":[{"text":"x"}]}'] * 2, n=1))
    assert merged == {"choices": [{"text": "x", "index": 0}, {"text": "x", "index": 1}]}
    with pytest.raises(UpstreamError, match="prompt 1"):
        merge_completions([b'{"choices":[]}', b"not json"], n=1)


def _chunk(rid: str, index: int, text: str) -> bytes:
    obj = {"id": rid, "choices": [{"index": index, "text": text, "finish_reason": None}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _events(data: bytes) -> list[Any]:
    out = []
    for event in data.split(b"\n\n"):
        if event:
            payload = event.removeprefix(b"data: ")
            out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


def test_rewriter_shifts_indexes_sets_the_id_and_reframes_split_events() -> None:
    usage = UsageSum()
    rewriter = SseRewriter(offset=3, batch_id="cmpl-batch", usage=usage)
    stream = _chunk("cmpl-x", 0, "he") + _chunk("cmpl-x", 1, "llo") + b": keep-alive\n\n"
    out = b""
    for i in range(0, len(stream), 7):  # arbitrary cuts, mid-event and mid-JSON
        out += rewriter.feed(stream[i : i + 7])
    out += rewriter.flush()
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b": keep-alive"
    assert [(e["id"], e["choices"][0]["index"]) for e in _events(b"\n\n".join(events[:2]))] == [
        ("cmpl-batch", 3),
        ("cmpl-batch", 4),
    ]
    assert not usage.seen and not rewriter.done


def test_rewriter_keeps_usage_and_done_for_the_merged_end() -> None:
    usage = UsageSum()
    rewriters = [SseRewriter(i, "b", usage) for i in range(2)]
    for i, rewriter in enumerate(rewriters):
        end = {"id": "x", "object": "text_completion", "choices": [], "usage": {
            "prompt_tokens": 5 + i, "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 4}}}  # fmt: skip
        tail = b"data: " + json.dumps(end).encode() + b"\n\ndata: [DONE]\n\n"
        assert _events(rewriter.feed(_chunk("x", 0, "t") + tail)) == _events(_chunk("b", i, "t"))
        assert rewriter.done
    assert usage.to_dict() == {
        "prompt_tokens": 11,
        "completion_tokens": 4,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    (merged_end,) = _events(usage_chunk(rewriters[1].last_usage_chunk, usage, "b"))
    assert merged_end["id"] == "b" and merged_end["choices"] == []
    assert merged_end["object"] == "text_completion" and merged_end["usage"]["total_tokens"] == 15


def test_rewriter_passes_what_is_not_json_through() -> None:
    rewriter = SseRewriter(1, None, UsageSum())
    assert rewriter.feed(b"data: {broken\n\nevent: x\n\n") == b"data: {broken\n\nevent: x\n\n"
    assert rewriter.feed(b'data: {"id": "keep"}') == b""
    assert rewriter.flush() == b'data: {"id":"keep"}\n\n'  # no batch id: the id stays


def test_first_event_id() -> None:
    assert first_event_id(b": ping\n\n" + _chunk("cmpl-7", 0, "x")) == "cmpl-7"
    assert first_event_id(b"data: nope\n\n") is None
    assert first_event_id(b"") is None
