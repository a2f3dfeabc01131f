"""OpenAI's Responses API (``/v1/responses``, served by vLLM): the routed prompt of a
request, and which worker holds each stored response.

A Responses request is routed as the chat conversation it stands for::

    instructions            -> {"role": "system", ...}
    "input": "text"         -> {"role": "user", "content": "text"}
    {"role", "content"}     -> that message (input_text / output_text parts as text,
                               input_image as an image part)
    function_call           -> an assistant message naming the call
    function_call_output    -> {"role": "tool", ...}
    reasoning, others       -> left out (they do not change the prompt's prefix much)

A worker keeps the responses it stored (vLLM's ``store``) in its own memory, so a
follow-up naming ``previous_response_id``, and ``GET /v1/responses/{id}``, must reach
the worker that answered. :class:`ResponseHomes` remembers that worker for the most
recent ``capacity`` responses; it learns the id from the answer's JSON, or, streamed,
from the ``response.created`` event at the start of the stream.

>>> response_messages({"instructions": "Be brief.", "input": "Hi"})
[{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
"""

from __future__ import annotations

import re
from collections import OrderedDict

import msgspec

from kvrouter.protocol import response_messages

__all__ = ["ResponseHomes", "ResponseIdSniffer", "response_messages"]

# The first "id" of a stream is the response's own: vLLM and OpenAI open every stream
# with response.created, whose "response" object starts with it.
_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')
_SNIFF_LIMIT = 64 * 1024


class _Identified(msgspec.Struct):
    """The one field of an answer the gateway reads; the rest is skipped unbuilt."""

    id: str | None = None


_decoder = msgspec.json.Decoder(_Identified)


class ResponseHomes:
    """Response id -> the worker that stored it, for the latest ``capacity`` responses.

    >>> homes = ResponseHomes(capacity=2)
    >>> homes.note_body(b'{"id": "resp_1", "object": "response"}', worker_id=3)
    True
    >>> homes.home("resp_1"), homes.home("resp_2")
    (3, None)
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._homes: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._homes)

    def home(self, response_id: str) -> int | None:
        """The worker that answered ``response_id`` (``None``: not known here)."""
        worker_id = self._homes.get(response_id)
        if worker_id is not None:
            self._homes.move_to_end(response_id)  # a conversation in use stays
        return worker_id

    def note(self, response_id: str, worker_id: int) -> None:
        homes = self._homes
        homes[response_id] = worker_id
        homes.move_to_end(response_id)
        if len(homes) > self.capacity:
            homes.popitem(last=False)

    def note_body(self, body: bytes, worker_id: int) -> bool:
        """Learn the id of an unstreamed answer; ``False`` if it names none."""
        try:
            response_id = _decoder.decode(body).id
        except msgspec.DecodeError:  # not JSON, not an object, or an id that is no string
            return False
        if not response_id:
            return False
        self.note(response_id, worker_id)
        return True

    def sniffer(self, worker_id: int) -> ResponseIdSniffer:
        """A reader of a streamed answer's first chunks that learns its id."""
        return ResponseIdSniffer(self, worker_id)


class ResponseIdSniffer:
    """Looks for the response id in the first chunks of a stream (up to 64 KiB)."""

    __slots__ = ("_homes", "_seen", "_worker_id", "done")

    def __init__(self, homes: ResponseHomes, worker_id: int) -> None:
        self._homes = homes
        self._worker_id = worker_id
        self._seen = b""
        self.done = False

    def feed(self, chunk: bytes) -> None:
        """Read one more chunk; ``done`` once the id is found or the limit is passed."""
        if self.done:
            return
        seen = self._seen + chunk if self._seen else chunk
        match = _ID.search(seen)
        if match is not None:
            self._homes.note(match.group(1).decode("utf-8", "replace"), self._worker_id)
            self.done = True
        elif len(seen) > _SNIFF_LIMIT:
            self.done = True
        else:
            self._seen = seen
