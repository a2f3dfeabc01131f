"""OpenAI protocol types: decoding, validation, response shapes, error bodies."""

from __future__ import annotations

import json

import msgspec
import pytest

from kvrouter.errors import InvalidRequest
from kvrouter.protocol import (
    DEFAULT_MAX_TOKENS,
    MAX_N,
    ChatFormat,
    CompletionFormat,
    RenderedRequest,
    Usage,
    decode_chat_request,
    decode_completion_request,
    decode_detokenize_request,
    decode_tokenize_request,
    error_body,
)


def completion(**fields: object) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **fields}).encode()


def chat(**fields: object) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("text", ["text"]),
        ([1, 2, 3], [[1, 2, 3]]),
        (["a", "b"], ["a", "b"]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompt_forms(prompt: object, expected: list[object]) -> None:
    assert decode_completion_request(completion(prompt=prompt)).prompts() == expected


def test_defaults_and_unknown_fields_are_accepted() -> None:
    req = decode_completion_request(completion(some_router_field={"x": 1}, top_k=5))
    assert req.output_tokens() == DEFAULT_MAX_TOKENS
    assert req.stream is False
    assert req.include_usage() is False
    assert req.min_tokens == 0
    assert req.ignore_eos is False


def test_output_tokens_precedence() -> None:
    assert decode_completion_request(completion(max_tokens=7)).output_tokens() == 7
    req = decode_completion_request(completion(max_tokens=7, kvrouter_output_tokens=3))
    assert req.output_tokens() == 3
    req_chat = decode_chat_request(chat(max_tokens=7, max_completion_tokens=9))
    assert req_chat.output_tokens() == 9
    assert decode_chat_request(chat(max_tokens=7)).output_tokens() == 7


def test_n_echo_and_logprobs_fields() -> None:
    assert decode_completion_request(completion(n=3, echo=True)).num_choices() == 3
    assert decode_completion_request(completion(n=None)).num_choices() == 1
    assert decode_chat_request(chat(n=2)).num_choices() == 2
    # Asking for no log probabilities is not asking for them.
    assert decode_chat_request(chat(logprobs=False, top_logprobs=0)).num_choices() == 1
    assert decode_completion_request(completion(logprobs=None)).logprobs is None


def test_temperature_above_two_is_accepted_as_vllm_does() -> None:
    assert decode_completion_request(completion(temperature=3.5)).temperature == 3.5


def test_continuous_usage_needs_include_usage() -> None:
    both = {"include_usage": True, "continuous_usage_stats": True}
    assert decode_chat_request(chat(stream=True, stream_options=both)).include_continuous_usage()
    alone = {"continuous_usage_stats": True}
    req = decode_chat_request(chat(stream=True, stream_options=alone))
    assert not req.include_continuous_usage()


def test_stream_options() -> None:
    req = decode_chat_request(chat(stream=True, stream_options={"include_usage": True}))
    assert req.include_usage() is True
    with pytest.raises(InvalidRequest, match="only allowed when stream is true"):
        decode_chat_request(chat(stream_options={"include_usage": True}))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "body is empty"),
        (b"{not json", "not valid JSON"),
        (b'{"prompt": "\xff"}', "not valid UTF-8"),
        (b'{"prompt": "x", "y": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (b"[1, 2]", "Expected `object`"),
        (completion(max_tokens=0), "max_tokens"),
        (completion(max_tokens="ten"), "max_tokens"),
        (completion(n=0), r"\$\.n"),
        (completion(n=MAX_N + 1), r"\$\.n"),
        (completion(temperature=-1), "temperature"),
        (completion(min_tokens=5, max_tokens=2), "min_tokens"),
        (completion(prompt=[]), "must not be empty"),
        (completion(prompt=[1, "a"]), "mixes"),
        (completion(prompt=[-1]), "prompt"),
        (completion(prompt=[""]), r"prompt\[0\] is empty"),
        (completion(logprobs=21), "greater than max allowed: 20"),
        (completion(logprobs=-1), "`logprobs` must be a positive value"),
        (completion(prompt_logprobs=1), "prompt_logprobs is not supported"),
        (json.dumps({"max_tokens": 3}).encode(), "prompt"),
    ],
)
def test_bad_completion_requests(body: bytes, needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle):
        decode_completion_request(body)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (chat(messages=[]), "messages"),
        (chat(messages=[{"content": "x"}]), "role"),
        (chat(max_completion_tokens=0), "max_completion_tokens"),
        (chat(n=0), r"\$\.n"),
        (chat(logprobs=True, top_logprobs=21), "greater than max allowed: 20"),
        (chat(logprobs=True, top_logprobs=-2), "`top_logprobs` must be a positive value"),
        (chat(top_logprobs=3), "`logprobs` must be set to true"),
    ],
)
def test_bad_chat_requests(body: bytes, needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle):
        decode_chat_request(body)


def test_chat_message_dicts_keep_parts_for_the_template() -> None:
    parts = [{"type": "text", "text": "a"}]
    req = decode_chat_request(chat(messages=[{"role": "user", "content": parts, "x": 1}]))
    assert req.message_dicts() == [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
    req = decode_chat_request(chat(messages=[{"role": "assistant"}]))
    assert req.message_dicts() == [{"role": "assistant", "content": None}]


def test_detokenize_request() -> None:
    assert decode_detokenize_request(b'{"tokens": [5, 6]}').tokens == [5, 6]
    with pytest.raises(InvalidRequest, match="tokens"):
        decode_detokenize_request(b'{"model": "m"}')
    with pytest.raises(InvalidRequest, match="tokens"):
        decode_detokenize_request(b'{"tokens": [-1]}')


def test_tokenize_request_needs_exactly_one_input() -> None:
    assert decode_tokenize_request(b'{"prompt": "x"}').prompt == "x"
    req = decode_tokenize_request(b'{"messages": [{"role": "user", "content": "x"}]}')
    assert req.messages is not None and req.messages[0].role == "user"
    with pytest.raises(InvalidRequest, match="exactly one"):
        decode_tokenize_request(b'{"model": "m"}')
    with pytest.raises(InvalidRequest, match="exactly one"):
        decode_tokenize_request(b'{"prompt": "x", "messages": []}')


def test_error_body_shape() -> None:
    body = json.loads(error_body("no such model", "NotFoundError", 404, param="model"))
    assert body == {
        "error": {
            "message": "no such model",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


def test_usage_reports_cached_tokens() -> None:
    usage = msgspec.to_builtins(Usage.of(10, 4, 8))
    assert usage == {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 8},
    }


def test_completion_format() -> None:
    fmt = CompletionFormat("m")
    assert fmt.first_chunk("id", 5, 0) is None
    chunk = json.loads(fmt.chunk("id", 5, 1, "ab", "length"))
    assert chunk == {
        "id": "id",
        "created": 5,
        "model": "m",
        "object": "text_completion",
        "choices": [
            {
                "index": 1,
                "text": "ab",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": None,
    }
    response = json.loads(
        fmt.response(
            "id", 5, ["x", "y"], ["length", "stop"], Usage.of(1, 2, 0), stop_reasons=[None, "\n"]
        )
    )
    assert [c["text"] for c in response["choices"]] == ["x", "y"]
    assert [c["finish_reason"] for c in response["choices"]] == ["length", "stop"]
    assert [c["stop_reason"] for c in response["choices"]] == [None, "\n"]
    assert response["usage"]["total_tokens"] == 3
    with_usage = json.loads(fmt.chunk("id", 5, 0, "a", None, usage=Usage.of(1, 2, 0)))
    assert with_usage["usage"]["total_tokens"] == 3
    usage_chunk = json.loads(fmt.usage_chunk("id", 5, Usage.of(1, 2, 1)))
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}


def test_chat_format() -> None:
    fmt = ChatFormat("m")
    first = json.loads(fmt.first_chunk("id", 5, 0) or b"")
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = json.loads(fmt.chunk("id", 5, 0, "", "stop"))
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "stop"
    response = json.loads(fmt.response("id", 5, ["hey"], ["length"], Usage.of(3, 1, 0)))
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"] == {"role": "assistant", "content": "hey"}
    with pytest.raises(ValueError, match="unknown finish reason"):
        fmt.chunk("id", 5, 0, "", "exploded")


def test_rendered_request_has_vllm_generate_request_shape() -> None:
    req = decode_completion_request(completion(max_tokens=4, min_tokens=2, ignore_eos=True))
    rendered = msgspec.to_builtins(RenderedRequest.of("r1", [5, 6], req, "m"))
    assert rendered == {
        "request_id": "r1",
        "token_ids": [5, 6],
        "sampling_params": {
            "max_tokens": 4,
            "min_tokens": 2,
            "ignore_eos": True,
            "temperature": 1.0,
        },
        "model": "m",
        "stream": False,
        "stream_options": None,
        "cache_salt": None,
        "features": None,
        "priority": 0,
    }
