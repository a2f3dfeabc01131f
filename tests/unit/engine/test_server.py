"""The simulated engine's HTTP server, driven through the official ``openai`` client.

Every test runs the real :class:`EngineCore` (at a high speedup ratio) and the real
:class:`KvEventPublisher` over the in-process transport.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pydantic
import pytest

from kvrouter.engine import EngineConfig, EngineCore
from kvrouter.engine.generation import Generation
from kvrouter.engine.server import EngineServer, ServerConfig
from kvrouter.events.model import Stored
from kvrouter.events.vllm import VllmEventDecoder
from kvrouter.load.prometheus import parse_engine_metrics
from kvrouter.protocol import CompletionRequest
from kvrouter.tokenizer import ByteTokenizer, Tokenizer, normalize_messages
from kvrouter.transport.base import Message, SubscriptionEndpoint, parse_frames
from kvrouter.transport.inproc import InProcBus, InProcTransport
from kvrouter.transport.publisher import KvEventPublisher

MODEL = "mock-model"
BLOCK_SIZE = 4
PROMPT = "The quick brown fox jumps over the lazy dog."  # 44 bytes: 11 full blocks


@dataclass
class Harness:
    server: EngineServer
    core: EngineCore
    client: openai.AsyncOpenAI
    http: aiohttp.ClientSession
    bus: InProcBus

    @property
    def url(self) -> str:
        return self.server.url

    async def post(self, path: str, body: object) -> tuple[int, object]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.http.post(self.url + path, data=data) as response:
            return response.status, json.loads(await response.read())

    async def aclose(self) -> None:
        await self.http.close()
        await self.client.close()
        await self.server.aclose()

    async def post_with(
        self, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, Any]:
        async with self.http.post(self.url + path, json=body, headers=headers) as response:
            return response.status, await response.json()


async def make_harness(
    speedup_ratio: float = 1000.0, max_model_len: int = 4096, tokenizer: Tokenizer | None = None
) -> Harness:
    config = EngineConfig(block_size=BLOCK_SIZE, num_gpu_blocks=1024, speedup_ratio=speedup_ratio)
    core = EngineCore(config, worker_id=7)
    bus = InProcBus()
    publisher = KvEventPublisher(InProcTransport(bus, "worker-7"), block_size=BLOCK_SIZE)
    await publisher.start()
    server = EngineServer(
        core,
        tokenizer or ByteTokenizer(),
        ServerConfig(model_name=MODEL, max_model_len=max_model_len, shutdown_timeout_s=0.2),
        kv_publisher=publisher,
    )
    await server.start()
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    return Harness(server, core, client, aiohttp.ClientSession(), bus)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = await make_harness()
    yield h
    await h.aclose()


# --- completions ---------------------------------------------------------------------


async def test_completion_text_prompt(harness: Harness) -> None:
    # A fixed id fixes the output tokens (and so the text's length: a rare special or
    # multi-byte token id would decode to fewer characters).
    result = await harness.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, extra_headers={"x-request-id": "c-1"}
    )
    assert result.object == "text_completion"
    assert result.model == MODEL
    assert len(result.choices) == 1
    assert result.choices[0].finish_reason == "length"
    assert len(result.choices[0].text) == 5
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (44, 5)
    assert result.usage.total_tokens == 49
    assert result.usage.prompt_tokens_details is not None
    assert result.usage.prompt_tokens_details.cached_tokens == 0


async def test_repeated_prompt_reports_cached_tokens(harness: Harness) -> None:
    await harness.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    again = await harness.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    # 11 full blocks, but the last prompt token is always recomputed: 10 blocks hit.
    assert again.usage.prompt_tokens_details.cached_tokens == 40


async def test_cache_salt_isolates_the_prefix_cache(harness: Harness) -> None:
    async def cached(salt: str | None) -> int:
        extra = {"cache_salt": salt} if salt is not None else None
        result = await harness.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2, extra_body=extra
        )
        assert result.usage is not None and result.usage.prompt_tokens_details is not None
        return result.usage.prompt_tokens_details.cached_tokens or 0

    assert await cached("tenant-a") == 0
    assert await cached("tenant-a") == 40  # the same tenant reuses its prefix
    assert await cached("tenant-b") == 0  # another tenant does not
    assert await cached(None) == 0  # nor does a request without a salt


async def test_token_id_prompt_and_default_max_tokens(harness: Harness) -> None:
    result = await harness.client.completions.create(model=MODEL, prompt=list(range(3, 23)))
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (20, 16)


async def test_batch_of_string_prompts(harness: Harness) -> None:
    result = await harness.client.completions.create(
        model=MODEL, prompt=["first prompt", "second"], max_tokens=3
    )
    assert [c.index for c in result.choices] == [0, 1]
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (18, 6)


async def test_extension_field_sets_output_length(harness: Harness) -> None:
    result = await harness.client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=50,
        extra_body={"kvrouter_output_tokens": 3, "min_tokens": 1, "ignore_eos": True},
    )
    assert result.usage is not None and result.usage.completion_tokens == 3


async def test_output_text_is_the_decoding_of_the_output_tokens(harness: Harness) -> None:
    headers = {"x-request-id": "fixed-id"}
    first = await harness.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, extra_headers=headers
    )
    second = await harness.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, extra_headers=headers
    )
    # vLLM's id is the client's behind its own prefix; the header echoes it as given.
    assert first.id == second.id == "cmpl-fixed-id"
    assert first.choices[0].text == second.choices[0].text
    raw = await harness.client.completions.with_raw_response.create(
        model=MODEL, prompt=PROMPT, max_tokens=1, extra_headers=headers
    )
    assert raw.headers["x-request-id"] == "fixed-id"
    chat = await harness.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_headers=headers,
    )
    assert chat.id == "chatcmpl-fixed-id"
    stream = await harness.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        stream=True,
        extra_headers=headers,
    )
    assert {chunk.id async for chunk in stream} == {"chatcmpl-fixed-id"}


async def test_streaming_completion_with_usage(harness: Harness) -> None:
    stream = await harness.client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": "s-1"},  # fixed tokens, one character each
    )
    chunks = [chunk async for chunk in stream]
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) == 4
    assert [c.choices[0].finish_reason for c in text_chunks] == [None, None, None, "length"]
    assert all(len(c.choices[0].text) == 1 for c in text_chunks)
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (44, 4)


async def test_raw_stream_ends_with_done(harness: Harness) -> None:
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 2, "stream": True}
    async with harness.http.post(harness.url + "/v1/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = await response.read()
    events = [e for e in raw.decode().split("\n\n") if e]
    assert len(events) == 3
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


async def test_n_choices_per_prompt(harness: Harness) -> None:
    result = await harness.client.completions.create(
        model=MODEL,
        prompt=["first prompt", "second"],
        max_tokens=16,
        n=2,
        extra_headers={"x-request-id": "n-1"},
    )
    # vLLM's order: choice prompt_index * n + j.
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    # (The text's length is not the token count: the byte tokenizer skips special ids.)
    assert all(c.finish_reason == "length" and c.text for c in result.choices)
    # Every choice samples its own 16 tokens: equal texts by chance are out of reach.
    assert len({c.text for c in result.choices}) == 4
    assert result.usage is not None
    # Each prompt's tokens count once, every choice's output tokens count.
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (18, 64)
    assert harness.core.stats().requests_added == 4


async def test_n_choices_stream(harness: Harness) -> None:
    stream = await harness.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    # One opening chunk per choice, then the tokens.
    assert [c.choices[0].delta.role for c in chunks[:3]] == ["assistant"] * 3
    assert [c.choices[0].index for c in chunks[:3]] == [0, 1, 2]
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 6


async def test_echo_prepends_the_prompt(harness: Harness) -> None:
    plain = await harness.client.completions.create(
        model=MODEL, prompt="abc", max_tokens=3, extra_headers={"x-request-id": "e1"}
    )
    echoed = await harness.client.completions.create(
        model=MODEL, prompt="abc", max_tokens=3, echo=True, extra_headers={"x-request-id": "e1"}
    )
    assert echoed.choices[0].text == "abc" + plain.choices[0].text
    assert echoed.usage is not None and echoed.usage.completion_tokens == 3
    # Token-id prompts are echoed as their decoding; streams echo in their first chunk.
    stream = await harness.client.completions.create(
        model=MODEL, prompt=[100, 101], max_tokens=2, echo=True, stream=True
    )
    texts = [c.choices[0].text async for c in stream]
    assert texts[0].startswith("ab") and len(texts[0]) == 3
    assert len(texts) == 2


async def test_continuous_usage_stats(harness: Harness) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    async with harness.http.post(harness.url + "/v1/chat/completions", json=body) as response:
        raw = await response.read()
    events = [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    prompt_tokens = chunks[-1]["usage"]["prompt_tokens"]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 3]
    assert all(c["usage"]["prompt_tokens"] == prompt_tokens for c in chunks)


class _SpacedTokenizer(ByteTokenizer):
    """Decodes a token sequence with spaces between tokens, as word-level tokenizers
    do: decoding token by token would lose the spaces."""

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join([ByteTokenizer.decode(self, [i]) for i in ids])


async def test_streamed_text_joins_to_the_whole_text() -> None:
    h = await make_harness(tokenizer=_SpacedTokenizer())
    try:
        headers = {"x-request-id": "same"}
        whole = await h.client.completions.create(
            model=MODEL, prompt="abc", max_tokens=6, extra_headers=headers
        )
        stream = await h.client.completions.create(
            model=MODEL, prompt="abc", max_tokens=6, stream=True, extra_headers=headers
        )
        pieces = [c.choices[0].text async for c in stream]
        assert len(pieces) == 6  # still one chunk per token
        assert "".join(pieces) == whole.choices[0].text
        assert whole.choices[0].text.count(" ") == 5
    finally:
        await h.aclose()


# --- chat ------------------------------------------------------------------------------


async def test_chat_completion(harness: Harness) -> None:
    result = await harness.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3
    )
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert len(result.choices[0].message.content or "") == 3
    assert result.usage is not None
    templated = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert result.usage.prompt_tokens == len(templated.encode())


async def test_chat_streaming(harness: Harness) -> None:
    stream = await harness.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices]
    assert len(content) == 3 and all(len(c or "") == 1 for c in content)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"prompt": "\xff"}', "not valid UTF-8"),
        (b'{"prompt": "x", "y": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (b"", "body is empty"),
        ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "n": 0}, "$.n"),
        ({"model": MODEL, "prompt": "x", "presence_penalty": 3}, "$.presence_penalty"),
        ({"model": MODEL, "prompt": "x", "repetition_penalty": 0}, "$.repetition_penalty"),
        ({"model": MODEL, "prompt": "x", "top_k": -2}, "$.top_k"),
        ({"model": MODEL, "prompt": "x", "logprobs": 21}, "max allowed: 20"),
        ({"model": MODEL, "prompt": [1, "a"]}, "mixes"),
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": "x" * 4090, "max_tokens": 10}, "maximum context length"),
    ],
)
async def test_bad_completion_requests_get_400(harness: Harness, body: object, needle: str) -> None:
    status, payload = await harness.post("/v1/completions", body)
    assert status == 400
    assert isinstance(payload, dict)
    assert needle in payload["error"]["message"]
    assert payload["error"]["code"] == 400
    assert harness.server.stats().num_active == 0


async def test_a_body_that_does_not_match_its_encoding_is_400(harness: Harness) -> None:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with harness.http.post(
        harness.url + "/v1/completions", data=b'{"prompt": "not gzip"}', headers=headers
    ) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert "could not be read" in error["message"]


async def test_unknown_model_is_404(harness: Harness) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await harness.client.completions.create(model="other", prompt="x")
    assert info.value.status_code == 404
    status, payload = await harness.post(
        "/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 404
    assert isinstance(payload, dict) and "does not exist" in payload["error"]["message"]


async def test_bad_chat_fields_via_client(harness: Harness) -> None:
    with pytest.raises(openai.BadRequestError):
        await harness.client.chat.completions.create(model=MODEL, messages=[])
    status, payload = await harness.post(
        "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}
    )
    assert status == 400
    assert isinstance(payload, dict) and "content" in payload["error"]["message"]


async def test_request_too_big_for_the_cache_is_400() -> None:
    h = await make_harness(max_model_len=10**6)
    try:
        status, payload = await h.post("/v1/completions", {"prompt": list(range(5000))})
        assert status == 400
        assert isinstance(payload, dict) and "the cache holds 4096" in payload["error"]["message"]
        assert h.core.stats().requests_added == 0
    finally:
        await h.aclose()


async def test_completion_logprobs_cover_every_output_token(harness: Harness) -> None:
    headers = {"x-request-id": "lp-1"}
    result = await harness.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=3, extra_headers=headers
    )
    choice = result.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == choice.text
    assert lp.text_offset == [0, 1, 2, 3, 4, 5]  # one character per byte token
    assert all(v is not None and v < 0 for v in lp.token_logprobs)
    assert lp.top_logprobs is not None
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top is not None and len(top) == 3
        assert top[token] == value == max(top.values())  # the sampled token is the best
    # The same id gives the same figures.
    again = await harness.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=3, extra_headers=headers
    )
    assert again.choices[0].logprobs == lp


async def test_echoed_completion_scores_its_prompt_too(harness: Harness) -> None:
    result = await harness.client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=2, logprobs=0, echo=True
    )
    choice = result.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.tokens[:2] == ["H", "i"] and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs is not None
    assert lp.top_logprobs[0] is None  # nothing comes before the first prompt token
    assert all(v is not None for v in lp.token_logprobs[1:])
    assert all(t is not None and len(t) == 1 for t in lp.top_logprobs[1:])


async def test_chat_logprobs_whole_and_streamed_agree(harness: Harness) -> None:
    headers = {"x-request-id": "lp-chat"}
    args: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "logprobs": True,
        "top_logprobs": 2,
        "extra_headers": headers,
    }
    whole = await harness.client.chat.completions.create(**args)
    content = whole.choices[0].logprobs and whole.choices[0].logprobs.content
    assert content is not None and len(content) == 5
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob > entry.top_logprobs[1].logprob
    stream = await harness.client.chat.completions.create(**args, stream=True)
    streamed = [
        entry
        async for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content
        for entry in chunk.choices[0].logprobs.content
    ]
    assert streamed == content
    # Without logprobs nothing is scored.
    plain = await harness.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert plain.choices[0].logprobs is None


async def test_streamed_completion_logprobs_and_stops(harness: Harness) -> None:
    headers = {"x-request-id": "lp-stop"}
    base: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "logprobs": 1}
    whole = await harness.client.completions.create(**base, extra_headers=headers)
    full = whole.choices[0].text
    stream = await harness.client.completions.create(**base, stream=True, extra_headers=headers)
    tokens: list[str] = []
    offsets: list[int] = []
    async for chunk in stream:
        lp = chunk.choices[0].logprobs if chunk.choices else None
        if lp is not None and lp.tokens:
            tokens += lp.tokens
            offsets += lp.text_offset or []
    assert "".join(tokens) == full and offsets == list(range(len(full)))
    # Cut at a stop string: the tokens scored are those up to it.
    stop = full[10:12]
    cut = await harness.client.completions.create(**base, stop=[stop], extra_headers=headers)
    lp = cut.choices[0].logprobs
    assert lp is not None and lp.tokens is not None
    assert "".join(lp.tokens).startswith(cut.choices[0].text)
    assert len(lp.tokens) == cut.usage.completion_tokens  # type: ignore[union-attr]


WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]


async def test_a_forced_tool_choice_is_answered_with_a_call(harness: Harness) -> None:
    headers = {"x-request-id": "tools-1"}
    args: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "weather in Oslo?"}],
        "tools": WEATHER_TOOLS,
        "max_tokens": 6,
        "extra_headers": headers,
    }
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = await harness.client.chat.completions.create(**args, tool_choice=named)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == ""  # as vLLM
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    # Streamed: named once, then arguments that add up to the same call.
    stream = await harness.client.chat.completions.create(**args, tool_choice=named, stream=True)
    pieces: list[str] = []
    names: list[str] = []
    reasons: list[str] = []
    async for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or ():
            assert delta.index == 0 and delta.function is not None
            names += [delta.function.name] if delta.function.name else []
            pieces.append(delta.function.arguments or "")
        reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert names == ["get_weather"] and reasons == ["stop"]
    assert "".join(pieces) == call.function.arguments  # type: ignore[union-attr]
    # Logprobs come with a streamed call too, one per generated token.
    scored = await harness.client.chat.completions.create(
        **args, tool_choice=named, stream=True, logprobs=True
    )
    entries = [
        entry
        async for chunk in scored
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content
        for entry in chunk.choices[0].logprobs.content
    ]
    assert len(entries) == 6
    # "required": one of the tools, ended with "tool_calls".
    required = await harness.client.chat.completions.create(**args, tool_choice="required")
    assert required.choices[0].finish_reason == "tool_calls"
    made = required.choices[0].message.tool_calls
    assert made is not None and made[0].function.name in {"get_weather", "get_time"}  # type: ignore[union-attr]
    # "auto" leaves the answer to the model, which here writes text.
    auto = await harness.client.chat.completions.create(**args, tool_choice="auto")
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].message.content


class _Unit(enum.Enum):
    C = "c"
    F = "f"


class _Place(pydantic.BaseModel):
    lat: float
    lon: float


class _GetWeather(pydantic.BaseModel):
    place: _Place
    unit: _Unit
    days: int


async def test_a_pydantic_tool_from_the_openai_client_parses(harness: Harness) -> None:
    # The client's pydantic tools put nested models and enums behind $ref.
    tool = openai.pydantic_function_tool(_GetWeather)
    result = await harness.client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "weather?"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "_GetWeather"}},
        max_tokens=4,
    )
    calls = result.choices[0].message.tool_calls
    assert calls is not None
    parsed = calls[0].function.parsed_arguments  # validated by the client against the model
    assert isinstance(parsed, _GetWeather) and parsed.unit is _Unit.C


async def test_a_tool_choice_that_cannot_be_met_is_refused(harness: Harness) -> None:
    messages = [{"role": "user", "content": "x"}]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tool_choice": "required"}, "`tools` must be set"),
        (
            {
                "tools": WEATHER_TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "no"}},
            },
            "Tool 'no' has not been passed",
        ),
        ({"tools": WEATHER_TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, r"tools\[0\]"),
    ]
    for extra, needle in cases:
        with pytest.raises(openai.BadRequestError, match=needle):
            await harness.client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=2, **extra
            )
    assert harness.core.stats().requests_added == 0


async def test_logprob_requests_out_of_range_are_refused(harness: Harness) -> None:
    with pytest.raises(openai.BadRequestError, match="max allowed: 20"):
        await harness.client.completions.create(model=MODEL, prompt="x", logprobs=21)
    with pytest.raises(openai.BadRequestError, match="`logprobs` must be set to true"):
        await harness.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs is not supported"):
        await harness.client.completions.create(
            model=MODEL, prompt="x", extra_body={"prompt_logprobs": 1}
        )
    assert harness.core.stats().requests_added == 0


async def test_unknown_route_is_json_404(harness: Harness) -> None:
    status, payload = await harness.post("/v1/nothing", {})
    assert status == 404
    assert isinstance(payload, dict) and payload["error"]["code"] == 404


# --- other endpoints -------------------------------------------------------------------


async def test_models_and_health(harness: Harness) -> None:
    models = await harness.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    async with harness.http.get(harness.url + "/health") as response:
        assert response.status == 200


async def test_ping_version_and_detokenize(harness: Harness) -> None:
    for method in ("GET", "POST"):
        async with harness.http.request(method, harness.url + "/ping") as response:
            assert response.status == 200
    async with harness.http.get(harness.url + "/version") as response:
        assert response.status == 200
        assert isinstance((await response.json())["version"], str)
    status, payload = await harness.post("/detokenize", {"model": MODEL, "tokens": [100, 101]})
    assert (status, payload) == (200, {"prompt": "ab"})
    status, payload = await harness.post("/detokenize", {"prompt": "ab"})
    assert status == 400
    status, payload = await harness.post("/detokenize", {"model": "other", "tokens": [1]})
    assert status == 404


async def test_tokenize_prompt_and_messages(harness: Harness) -> None:
    status, payload = await harness.post("/tokenize", {"model": MODEL, "prompt": "ab"})
    assert status == 200
    assert payload == {"count": 2, "max_model_len": 4096, "tokens": [100, 101], "token_strs": None}
    messages = [{"role": "user", "content": "hi"}]
    status, payload = await harness.post("/tokenize", {"messages": messages})
    assert status == 200 and isinstance(payload, dict)
    templated = ByteTokenizer().apply_chat_template(messages)
    assert payload["tokens"] == ByteTokenizer().encode(templated)
    status, payload = await harness.post("/tokenize", {"prompt": "a", "return_token_strs": True})
    assert isinstance(payload, dict) and payload["token_strs"] == ["a"]
    status, _ = await harness.post("/tokenize", {"model": MODEL})
    assert status == 400


# A template that renders tool definitions and a thinking switch, as model templates do.
TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}"
    "</tools>{% endif %}{% if enable_thinking is false %}<nothink>{% endif %}"
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
)


TOOL_TURNS_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]"
    "{% if m['reasoning_content'] %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
    "{{ m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}<call>{{ c['function']['name'] }}"
    "{% for k, v in c['function']['arguments'].items() %} {{ k }}={{ v }}{% endfor %}"
    "</call>{% endfor %}"
    "{% if m['tool_call_id'] %}<for {{ m['tool_call_id'] }}>{% endif %}{% endfor %}"
)


async def test_tool_call_turns_render_as_the_gateway_renders_them() -> None:
    # An agent's conversation: the assistant's tool call and the tool's answer must
    # reach the template, or the engine computes a prompt the router never hashed.
    tok = ByteTokenizer(TOOL_TURNS_TEMPLATE)
    h = await make_harness(tokenizer=tok)
    try:
        function = {"name": "lookup", "arguments": '{"q": "x"}'}
        call: dict[str, Any] = {"id": "call-1", "type": "function", "function": function}
        messages = [
            {"role": "user", "content": "find x"},
            {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "r"},
            {"role": "tool", "content": "found", "tool_call_id": "call-1"},
        ]
        status, payload = await h.post("/tokenize", {"messages": messages})
        assert status == 200 and isinstance(payload, dict)
        rendered = tok.apply_chat_template(normalize_messages(messages))
        # Arguments reach the template as an object, as vLLM hands them over.
        assert "<call>lookup q=x</call>" in rendered and "<for call-1>" in rendered
        assert "<think>r" in rendered
        assert payload["tokens"] == tok.encode(rendered, add_special_tokens=False)
    finally:
        await h.aclose()


async def test_tools_and_template_kwargs_reach_the_chat_template() -> None:
    tok = ByteTokenizer(TOOLS_TEMPLATE)
    h = await make_harness(tokenizer=tok)
    try:
        messages = [{"role": "user", "content": "hi"}]
        tools = [{"type": "function", "function": {"name": "lookup"}}]
        extra = {"tools": tools, "chat_template_kwargs": {"enable_thinking": False}}
        status, plain = await h.post("/tokenize", {"messages": messages})
        status2, with_tools = await h.post("/tokenize", {"messages": messages, **extra})
        assert status == status2 == 200
        assert isinstance(plain, dict) and isinstance(with_tools, dict)
        rendered = tok.apply_chat_template(
            messages, template_vars={"tools": tools, "enable_thinking": False}
        )
        assert rendered == "<tools>lookup;</tools><nothink>[user]hi"
        assert with_tools["tokens"] == tok.encode(rendered, add_special_tokens=False)
        assert plain["tokens"] == tok.encode("[user]hi", add_special_tokens=False)
        # A chat completion counts the same prompt the template rendered with them.
        chat = {"model": MODEL, "messages": messages, "max_tokens": 1, **extra}
        status, answer = await h.post("/v1/chat/completions", chat)
        assert status == 200 and isinstance(answer, dict)
        assert answer["usage"]["prompt_tokens"] == with_tools["count"]
        status, bad = await h.post("/tokenize", {"messages": messages, "tools": "x"})
        assert status == 400 and isinstance(bad, dict)
        assert "tools" in bad["error"]["message"]
    finally:
        await h.aclose()


async def test_render_endpoints(harness: Harness) -> None:
    status, payload = await harness.post(
        "/v1/completions/render", {"model": MODEL, "prompt": ["ab", "c"], "max_tokens": 3}
    )
    assert status == 200 and isinstance(payload, list)
    assert [p["token_ids"] for p in payload] == [[100, 101], [102]]
    assert payload[0]["sampling_params"]["max_tokens"] == 3
    assert payload[0]["model"] == MODEL
    messages = [{"role": "user", "content": "hi"}]
    status, rendered = await harness.post("/v1/chat/completions/render", {"messages": messages})
    assert status == 200 and isinstance(rendered, dict)
    expected = ByteTokenizer().encode(ByteTokenizer().apply_chat_template(messages))
    assert rendered["token_ids"] == expected
    # What render returns is what generation uses.
    result = await harness.client.chat.completions.create(model=MODEL, messages=messages)
    assert result.usage is not None and result.usage.prompt_tokens == len(expected)
    assert harness.core.stats().requests_added == 1


async def test_metrics_use_vllm_names(harness: Harness) -> None:
    await harness.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    await harness.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    async with harness.http.get(harness.url + "/metrics") as response:
        text = await response.text()
    snapshot = parse_engine_metrics(text)
    assert snapshot.engine == "vllm"
    assert snapshot.num_requests_running == 0
    assert snapshot.num_requests_waiting == 0
    assert snapshot.kv_total_blocks == 1024
    assert snapshot.prefix_cache_queries == 88
    assert snapshot.prefix_cache_hits == 40
    assert snapshot.num_malformed == 0
    # The latency series a vLLM dashboard plots: two requests of two tokens each.
    label = f'model_name="{MODEL}"'
    assert f"vllm:time_to_first_token_seconds_count{{{label}}} 2" in text
    assert f"vllm:e2e_request_latency_seconds_count{{{label}}} 2" in text
    assert f"vllm:inter_token_latency_seconds_count{{{label}}} 2" in text  # one gap each
    assert f'vllm:request_success_total{{{label},finished_reason="length"}} 2' in text
    assert f"vllm:prompt_tokens_total{{{label}}} {2 * len(ByteTokenizer().encode(PROMPT))}" in text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    ttft = [s for s in samples if s.startswith("vllm:time_to_first_token_seconds_bucket")]
    counts = [float(s.rsplit(" ", 1)[1]) for s in ttft]
    assert counts == sorted(counts) and counts[-1] == 2  # cumulative, +Inf last


async def test_kv_events_are_published_one_batch_per_step(harness: Harness) -> None:
    transport = InProcTransport(harness.bus)
    subscription = await transport.subscribe(SubscriptionEndpoint("worker-7"))
    await harness.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    message = parse_frames(await asyncio.wait_for(subscription.recv(), 5.0))
    assert isinstance(message, Message)
    assert message.seq == 0
    batch = VllmEventDecoder(block_size=BLOCK_SIZE).decode(message.payload)
    assert batch.errors == []
    assert len(batch.events) == 1
    stored = batch.events[0]
    assert isinstance(stored, Stored)
    assert len(stored.blocks) == 11
    assert harness.server.stats().num_kv_events == 1
    await transport.aclose()


# --- disconnects -----------------------------------------------------------------------


async def wait_until_idle(h: Harness, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while h.core.has_unfinished_requests() or h.server.stats().num_active:
        assert asyncio.get_running_loop().time() < deadline, "engine did not go idle"
        await asyncio.sleep(0.01)


async def test_stream_disconnect_aborts_the_request() -> None:
    h = await make_harness(speedup_ratio=10.0)  # ~2-5 ms per step: a long request
    try:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "stream": True}
        response = await h.http.post(h.url + "/v1/completions", json=body)
        await response.content.readline()  # the first token arrived: it is running
        assert h.core.num_running == 1
        response.close()
        await wait_until_idle(h)
        assert h.core.num_running == 0
        assert h.core.stats().requests_aborted == 1
        assert h.server.stats().num_aborted == 1
        async with h.http.get(h.url + "/metrics") as metrics:
            text = await metrics.text()
        assert (
            f'vllm:request_success_total{{model_name="{MODEL}",finished_reason="abort"}} 1' in text
        )
    finally:
        await h.aclose()


async def test_disconnect_aborts_every_choice() -> None:
    h = await make_harness(speedup_ratio=10.0)
    try:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "n": 3, "stream": True}
        response = await h.http.post(h.url + "/v1/completions", json=body)
        await response.content.readline()
        response.close()
        await wait_until_idle(h)
        assert h.core.num_running == 0
        assert h.core.stats().requests_aborted == 3
    finally:
        await h.aclose()


async def test_non_streaming_disconnect_aborts_the_request() -> None:
    h = await make_harness(speedup_ratio=10.0)
    try:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000}
        task = asyncio.create_task(h.http.post(h.url + "/v1/completions", json=body))
        while h.core.num_running == 0:
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_until_idle(h)
        assert h.core.num_running == 0
        assert h.core.stats().requests_aborted == 1
    finally:
        await h.aclose()


async def test_aclose_is_idempotent_and_aborts_open_requests() -> None:
    h = await make_harness(speedup_ratio=10.0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "stream": True}
    response = await h.http.post(h.url + "/v1/completions", json=body)
    await response.content.readline()
    await h.server.aclose()
    await h.server.aclose()
    assert h.server.stats().num_active == 0
    assert h.core.stats().requests_aborted == 1
    # The stream ended cleanly: its last chunk says "abort", then [DONE].
    events = [e for e in (await response.read()).decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "abort"
    response.close()
    await h.http.close()
    await h.client.close()


async def test_engine_failure_ends_open_requests_and_refuses_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = await make_harness()
    try:

        def broken_step() -> None:
            raise RuntimeError("core bug")

        monkeypatch.setattr(h.core, "step", broken_step)
        result = await h.client.completions.create(model=MODEL, prompt="abc", max_tokens=3)
        assert result.choices[0].finish_reason == "abort"
        assert h.server.stats().num_active == 0
        with pytest.raises(openai.InternalServerError) as info:
            await h.client.completions.create(model=MODEL, prompt="abc", max_tokens=3)
        assert info.value.status_code == 503
    finally:
        await h.aclose()


# --- responses ---------------------------------------------------------------------


async def test_responses_through_the_openai_client(harness: Harness) -> None:
    first = await harness.client.responses.create(
        model=MODEL, instructions="Be brief.", input=PROMPT, max_output_tokens=6
    )
    assert first.id.startswith("resp_")
    assert first.status == "incomplete"  # cut at the client's max_output_tokens
    assert first.output_text and first.usage is not None
    assert (first.usage.output_tokens, first.usage.input_tokens_details.cached_tokens) == (6, 0)
    # A follow-up carries the stored conversation: its prompt starts with all of the
    # first one (the same instructions, the question), so the prefix cache serves that.
    follow = await harness.client.responses.create(
        model=MODEL, instructions="Be brief.", input="And then?", previous_response_id=first.id
    )
    assert follow.usage is not None
    assert follow.usage.input_tokens > first.usage.input_tokens + 6
    full_blocks = first.usage.input_tokens // BLOCK_SIZE * BLOCK_SIZE
    assert follow.usage.input_tokens_details.cached_tokens >= full_blocks
    assert follow.status == "completed" and follow.previous_response_id == first.id
    fetched = await harness.client.responses.retrieve(follow.id)
    assert fetched.output_text == follow.output_text


async def test_responses_stream_the_api_events(harness: Harness) -> None:
    stream = await harness.client.responses.create(
        model=MODEL, input=[{"role": "user", "content": PROMPT}], stream=True
    )
    kinds = []
    deltas = []
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.completed":
            final = event.response
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(deltas) == final.output_text and deltas
    assert (await harness.client.responses.retrieve(final.id)).id == final.id
    # Cut short: vLLM still ends with response.completed, its status "incomplete".
    cut = await harness.client.responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=3, stream=True
    )
    last = [event async for event in cut][-1]
    assert last.type == "response.completed"
    assert last.response.status == "incomplete"


async def test_unknown_and_unstored_responses_are_404(harness: Harness) -> None:
    status, body = await harness.post(
        "/v1/responses", {"input": "hi", "previous_response_id": "resp_nope"}
    )
    assert status == 404
    assert "resp_nope" in body["error"]["message"]  # type: ignore[index]
    status, body = await harness.post("/v1/responses", {"input": "hi", "store": False})
    assert status == 200
    async with harness.http.get(f"{harness.url}/v1/responses/{body['id']}") as resp:  # type: ignore[index]
        assert resp.status == 404
    status, body = await harness.post("/v1/responses", {"input": [{"role": "bot"}]})
    assert status == 400
    for bad, needle in (
        ({"stream": "yes"}, "'stream' must be a boolean"),
        ({"max_output_tokens": "ten"}, "'max_output_tokens'"),
        ({"background": True}, "background responses are not supported"),
    ):
        status, body = await harness.post("/v1/responses", {"input": "hi", **bad})
        assert status == 400, bad
        assert needle in body["error"]["message"]  # type: ignore[index]


async def test_without_max_tokens_the_default_fits_the_context_left() -> None:
    h = await make_harness(max_model_len=64)
    try:
        # 60 prompt tokens leave room for 4: the default 16 is cut to that, not refused.
        status, answer = await h.post("/v1/completions", {"model": MODEL, "prompt": "x" * 60})
        assert status == 200 and isinstance(answer, dict)
        assert answer["usage"]["completion_tokens"] == 4
        assert answer["choices"][0]["finish_reason"] == "length"
        # A limit the client gives must fit, as vLLM says.
        body = {"model": MODEL, "prompt": "x" * 60, "max_tokens": 5}
        status, error = await h.post("/v1/completions", body)
        assert status == 400 and isinstance(error, dict)
        assert "maximum context length is 64" in error["error"]["message"]
        # min_tokens above the default limit is refused, as vLLM refuses it.
        status, error = await h.post(
            "/v1/completions", {"model": MODEL, "prompt": "x", "min_tokens": 20}
        )
        assert status == 400 and isinstance(error, dict)
        assert "min_tokens (20) must be at most max_tokens (16)" in error["error"]["message"]
    finally:
        await h.aclose()


async def test_two_requests_with_one_client_id_both_run(harness: Harness) -> None:
    headers = {"x-request-id": "dup"}

    async def one() -> object:
        return await harness.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, extra_headers=headers
        )

    first, second = await asyncio.gather(one(), one())  # in the engine at once
    assert first.id == second.id == "cmpl-dup"  # type: ignore[attr-defined]
    assert harness.server.stats().num_active == 0


async def test_a_reused_client_id_never_reaches_an_earlier_request(harness: Harness) -> None:
    # Races behind a hang seen under load: a request finishes or is aborted, which frees
    # its client id, and another with the same id arrives before the first one's clean-up
    # ran or its abort output came. Driven through the server's own steps, since the
    # window between them is too narrow to hit reliably over HTTP.
    server = harness.server
    req = CompletionRequest(model=MODEL, prompt=PROMPT, max_tokens=4)
    prompt = list(PROMPT.encode())

    async def outputs(gen: Generation) -> tuple[list[int], str | None]:
        tokens: list[int] = []
        while True:
            _, output = await asyncio.wait_for(gen.queue.get(), 10)
            tokens += output.new_token_ids
            if output.finished:
                return tokens, output.finish_reason

    first = server._submit("same", [prompt], req, None, [4])
    while first.sub_ids[0] in server._waiters:  # finished, its output not yet read
        await asyncio.sleep(0.001)
    second = server._submit("same", [prompt], req, None, [4])
    assert second.sub_ids != first.sub_ids  # each runs under an engine id of its own
    server._release(first)  # the first handler ends late: the second runs on
    third = server._submit("same", [prompt], req, None, [4])
    server._release(third)  # its client left: its abort output is still on its way
    fourth = server._submit("same", [prompt], req, None, [4])
    expected = await outputs(first)
    assert expected[1] == "length"
    assert await outputs(second) == expected == await outputs(fourth)  # same id, same text
    assert server.stats().num_aborted == 1 and server.stats().num_active == 0


async def test_stop_strings_and_stop_token_ids_end_a_choice(harness: Harness) -> None:
    headers = {"x-request-id": "stops-1"}  # the same id gives the same text
    base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24}
    status, whole = await harness.post_with("/v1/completions", base, headers)
    assert status == 200
    full = whole["choices"][0]["text"]
    stop = full[10:12]
    cut = full[: full.index(stop)]
    status, answer = await harness.post_with("/v1/completions", {**base, "stop": [stop]}, headers)
    choice = answer["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (cut, "stop", stop)
    assert answer["usage"]["completion_tokens"] < 24
    included = {**base, "stop": stop, "include_stop_str_in_output": True}
    status, answer = await harness.post_with("/v1/completions", included, headers)
    assert answer["choices"][0]["text"] == cut + stop
    # Streamed: the pieces join to the same text, and the last chunk says why it ended.
    streamed = {**base, "stop": [stop], "stream": True}
    async with harness.http.post(
        harness.url + "/v1/completions", json=streamed, headers=headers
    ) as response:
        lines = [
            line for line in (await response.text()).splitlines() if line.startswith("data: {")
        ]
    chunks = [json.loads(line[6:])["choices"][0] for line in lines]
    assert "".join(c["text"] for c in chunks) == cut
    assert (chunks[-1]["finish_reason"], chunks[-1]["stop_reason"]) == ("stop", stop)
    # A stop token id: the first generated token is one, so nothing is sent but the reason.
    by_id = {**base, "stop_token_ids": list(range(100_000))}
    status, answer = await harness.post_with("/v1/completions", by_id, headers)
    choice = answer["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("", "stop")
    assert isinstance(choice["stop_reason"], int)
    assert answer["usage"]["completion_tokens"] == 1
    # Chat too; and an empty stop string is refused, as vLLM refuses it.
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24}
    status, answer = await harness.post_with(
        "/v1/chat/completions", {**chat, "stop": stop}, headers
    )
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    status, _ = await harness.post("/v1/completions", {**base, "stop": [""]})
    assert status == 400
    await wait_until_idle(harness)
    assert harness.server.stats().num_active == 0
    assert harness.core.num_running == 0
