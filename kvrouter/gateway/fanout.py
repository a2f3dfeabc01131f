"""Batch completions: one request per prompt, routed each on its own, answered as one.

A ``/v1/completions`` body whose ``prompt`` is a list of several prompts (strings or
token-id lists; :func:`~kvrouter.gateway.prompts.batch_prompts`) is split into one body
per prompt. Each is routed by its own prefix, so a batch of prompts with different
prefixes lands on the workers that cache them instead of all on the worker of the first.
The answers are merged the way vLLM answers a batch:

- choice ``index`` = prompt index * ``n`` + the worker's own index;
- ``usage`` summed over the prompts (``prompt_tokens_details.cached_tokens`` too);
- one ``id``, ``created`` and ``model`` (the first prompt's);
- a stream interleaves the prompts' events as they come, sends one usage chunk (when
  the workers sent any) and one ``data: [DONE]`` at the end.

This module is pure (bytes in, bytes out); :mod:`kvrouter.gateway.forward` (the
requests) and :mod:`kvrouter.gateway.batch` (the merged stream) do the I/O.

>>> import json
>>> bodies = [b'{"id":"a","choices":[{"index":0,"text":"x"}],"usage":{"prompt_tokens":3,'
...           b'"completion_tokens":1,"total_tokens":4}}',
...           b'{"id":"b","choices":[{"index":0,"text":"y"}],"usage":{"prompt_tokens":5,'
...           b'"completion_tokens":1,"total_tokens":6}}']
>>> merged = json.loads(merge_completions(bodies, n=1))
>>> [(c["index"], c["text"]) for c in merged["choices"]], merged["usage"]["total_tokens"]
([(0, 'x'), (1, 'y')], 10)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from kvrouter.errors import UpstreamError
from kvrouter.gateway.prompts import ParsedBody

__all__ = [
    "SseRewriter",
    "UsageSum",
    "first_event_id",
    "merge_completions",
    "split_batch",
    "usage_chunk",
]

_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()
_DONE = b"[DONE]"


def split_batch(parsed: ParsedBody, prompts: Sequence[str | list[int]]) -> list[ParsedBody]:
    """One body per prompt: the batch's other fields, its ``prompt`` replaced."""
    out = []
    for prompt in prompts:
        payload = {**parsed.payload, "prompt": prompt}
        out.append(ParsedBody(payload, _encoder.encode(payload), None, parsed.stream))
    return out


class UsageSum:
    """Token counts summed over the prompts of a batch."""

    __slots__ = ("cached", "completion", "has_cached", "prompt", "seen")

    def __init__(self) -> None:
        self.prompt = self.completion = self.cached = 0
        self.has_cached = self.seen = False

    def add(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self.seen = True
        self.prompt += _count(usage.get("prompt_tokens"))
        self.completion += _count(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and "cached_tokens" in details:
            self.has_cached = True
            self.cached += _count(details.get("cached_tokens"))

    def to_dict(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }
        if self.has_cached:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached}
        return usage


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _shift_choices(obj: dict[str, Any], offset: int) -> None:
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                choice["index"] = _count(choice.get("index", 0)) + offset


def merge_completions(bodies: Sequence[bytes], n: int) -> bytes:
    """The JSON answers of a batch's prompts (in prompt order) as one answer."""
    merged: dict[str, Any] | None = None
    choices: list[Any] = []
    usage = UsageSum()
    for i, body in enumerate(bodies):
        try:
            obj = _decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise UpstreamError(f"a worker's answer to prompt {i} is not a JSON object") from exc
        _shift_choices(obj, i * n)
        got = obj.get("choices")
        if isinstance(got, list):
            choices.extend(got)
        usage.add(obj.get("usage"))
        if merged is None:
            merged = obj
    assert merged is not None, "a batch has at least two prompts"
    merged["choices"] = choices
    if usage.seen:
        merged["usage"] = usage.to_dict()
    return _encoder.encode(merged)


class SseRewriter:
    """Re-frames one prompt's event stream for the merged stream.

    :meth:`feed` takes bytes as they arrive and returns the complete events among them,
    rewritten: choice indexes shifted by ``offset``, ``id`` set to the batch's. Usage-only
    chunks are summed into ``usage`` and dropped, as is the worker's ``data: [DONE]``
    (the merged stream sends one of each at its end). An event that is not JSON passes
    through as it came.
    """

    __slots__ = ("_buffer", "_id", "_offset", "done", "last_usage_chunk", "usage")

    def __init__(self, offset: int, batch_id: str | None, usage: UsageSum) -> None:
        self._offset = offset
        self._id = batch_id
        self._buffer = b""
        self.usage = usage
        self.done = False
        self.last_usage_chunk: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        data = self._buffer + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buffer = data
            return b""
        self._buffer = data[end + 2 :]
        out = []
        for event in data[: end + 2].split(b"\n\n"):
            if event.strip():
                rewritten = self._event(event)
                if rewritten:
                    out.append(rewritten + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left when the stream ends (an event without its blank line)."""
        rest, self._buffer = self._buffer, b""
        rewritten = self._event(rest) if rest.strip() else b""
        return rewritten + b"\n\n" if rewritten else b""

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data:"):
            return event  # a comment or another SSE field: as it came
        data = event[5:].strip()
        if data == _DONE:
            self.done = True
            return b""
        try:
            obj = _decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return event
        if self._id is not None and "id" in obj:
            obj["id"] = self._id
        choices = obj.get("choices")
        if obj.get("usage") and isinstance(choices, list) and not choices:
            self.usage.add(obj["usage"])
            self.last_usage_chunk = obj
            return b""
        _shift_choices(obj, self._offset)
        return b"data: " + _encoder.encode(obj)


def first_event_id(chunk: bytes) -> str | None:
    """The ``id`` of the first JSON event in ``chunk``, if it has one."""
    for event in chunk.split(b"\n\n"):
        if event.startswith(b"data:"):
            try:
                obj = _decoder.decode(event[5:].strip())
            except (msgspec.DecodeError, msgspec.ValidationError):
                return None
            value = obj.get("id")
            return value if isinstance(value, str) else None
    return None


def usage_chunk(template: dict[str, Any] | None, usage: UsageSum, batch_id: str | None) -> bytes:
    """The merged stream's one usage event."""
    obj: dict[str, Any] = {"object": "text_completion"} if template is None else dict(template)
    if batch_id is not None:
        obj["id"] = batch_id
    obj["choices"] = []
    obj["usage"] = usage.to_dict()
    return b"data: " + _encoder.encode(obj) + b"\n\n"
