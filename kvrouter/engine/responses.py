"""The simulated engine's Responses API (``/v1/responses``), shaped as vLLM's.

A request is run as the chat it stands for (:func:`kvrouter.protocol.response_messages`).
A stored response (``store``, true unless the client says otherwise) keeps its whole
conversation, so a follow-up naming it as ``previous_response_id`` is prompted with
that conversation and its own input; as on vLLM, only the server that stored a
response knows it. The store keeps the latest ``capacity`` responses.

Streamed, the answer is the API's typed events (``event: response.created`` ...
``response.output_text.delta`` ... ``response.completed``), with no ``[DONE]``.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from kvrouter.protocol import Usage, encode

__all__ = ["ResponseBuilder", "ResponseStore", "StoredResponse"]


@dataclass(slots=True)
class StoredResponse:
    """A response and the conversation it ended (its output included)."""

    body: dict[str, Any]
    conversation: list[dict[str, Any]]


class ResponseStore:
    """The latest ``capacity`` stored responses, by id.

    >>> store = ResponseStore(capacity=1)
    >>> store.put("a", StoredResponse({}, [])); store.put("b", StoredResponse({}, []))
    >>> store.get("a") is None, store.get("b") is not None
    (True, True)
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def put(self, response_id: str, item: StoredResponse) -> None:
        self._items[response_id] = item
        if len(self._items) > self._capacity:
            self._items.popitem(last=False)


@dataclass(slots=True)
class ResponseBuilder:
    """The JSON of one response, and the events of its stream."""

    response_id: str
    model: str
    created_at: int
    request: dict[str, Any]
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    _sequence: int = 0

    def body(self, text: str | None, status: str, usage: Usage | None) -> dict[str, Any]:
        """The response object; ``text`` ``None``: no output yet (in progress)."""
        output = [] if text is None else [self._message(text, "completed")]
        body: dict[str, Any] = {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "instructions": self.request.get("instructions"),
            "previous_response_id": self.request.get("previous_response_id"),
            "max_output_tokens": self.request.get("max_output_tokens"),
            "store": self.request.get("store", True) is not False,
            "usage": None if usage is None else _usage(usage),
        }
        if status == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body

    def _message(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content if status == "completed" else [],
        }

    def event(self, kind: str, **fields: Any) -> bytes:
        """One SSE event of the stream, numbered in order."""
        data = encode({"type": kind, "sequence_number": self._sequence, **fields})
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def opening(self) -> bytes:
        """The events before the first token: created, in progress, the message opened."""
        started = self.body(None, "in_progress", None)
        part = {"type": "output_text", "text": "", "annotations": []}
        return b"".join(
            (
                self.event("response.created", response=started),
                self.event("response.in_progress", response=started),
                self.event(
                    "response.output_item.added",
                    output_index=0,
                    item=self._message("", "in_progress"),
                ),
                self.event(
                    "response.content_part.added",
                    item_id=self.message_id,
                    output_index=0,
                    content_index=0,
                    part=part,
                ),
            )
        )

    def delta(self, text: str) -> bytes:
        return self.event(
            "response.output_text.delta",
            item_id=self.message_id,
            output_index=0,
            content_index=0,
            delta=text,
        )

    def closing(self, body: dict[str, Any], text: str) -> bytes:
        """The events after the last token, ending with the finished response."""
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": text, "annotations": []}
        return b"".join(
            (
                self.event("response.output_text.done", text=text, **where),
                self.event("response.content_part.done", part=part, **where),
                self.event(
                    "response.output_item.done",
                    output_index=0,
                    item=self._message(text, "completed"),
                ),
                # vLLM ends even a cut-short answer with response.completed; its
                # status says "incomplete".
                self.event("response.completed", response=body),
            )
        )


def _usage(usage: Usage) -> dict[str, Any]:
    details = usage.prompt_tokens_details
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": details.cached_tokens if details else 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }
