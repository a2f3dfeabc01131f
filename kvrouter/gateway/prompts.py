"""From an OpenAI request body to the token ids the router hashes.

The body is decoded once into plain builtins (msgspec, fast) and only the fields the
router needs are checked here; everything else is the worker's business and passes
through untouched. Tokenizing is synchronous and may take milliseconds, so
:func:`prepare_prompt` is meant to run off the event loop (it also hashes, so the hot
path on the loop only matches and scores).

Chat requests always go through the chat template, never raw message text. A batch
prompt (a list of several prompts) is routed by its first prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from kvrouter.errors import InvalidRequest, RequestTooLarge
from kvrouter.hashing import hash_request, make_salt
from kvrouter.tokenizer import Tokenizer, normalize_messages

__all__ = [
    "Kind",
    "ParsedBody",
    "PreparedPrompt",
    "first_prompt",
    "parse_body",
    "prepare_prompt",
    "request_salt",
    "tokenize_locally",
]

Kind = Literal["completion", "chat"]
_BODY_FIELD_MARKER = b'"kvrouter"'
_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class ParsedBody:
    """A request body: the decoded JSON, the bytes to forward, and routing extras."""

    payload: dict[str, Any]
    forward_body: bytes
    kvrouter_field: Any
    stream: bool


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """Token ids of the routed prompt and their block hashes, computed once."""

    token_ids: list[int]
    local_hashes: list[int]
    sequence_hashes: list[int]
    salt: bytes | None


def parse_body(body: bytes, kind: Kind) -> ParsedBody:
    """Decode and check ``body``; strip the ``"kvrouter"`` field when present.

    The forwarded bytes are the original ones unless the field had to be removed
    (re-encoding a large prompt for nothing would cost more than the routing).
    """
    if not body:
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        payload = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest("the request body must be a JSON object") from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    field = None
    forward = body
    if _BODY_FIELD_MARKER in body and "kvrouter" in payload:
        field = payload.pop("kvrouter")
        forward = _encoder.encode(payload)
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object")
    _check_prompt_field(payload, kind)
    return ParsedBody(payload, forward, field, stream)


def _check_prompt_field(payload: Mapping[str, Any], kind: Kind) -> None:
    if kind == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'")
        return
    prompt = payload.get("prompt")
    if prompt is None:
        raise InvalidRequest("'prompt' is required")
    if not isinstance(prompt, str | list):
        raise InvalidRequest("'prompt' must be a string, a list of token ids or a list of prompts")
    if isinstance(prompt, list) and not prompt:
        raise InvalidRequest("'prompt' must not be empty")


def first_prompt(payload: Mapping[str, Any]) -> str | list[int]:
    """The completion prompt the request is routed by (the first of a batch)."""
    prompt = payload["prompt"]
    if isinstance(prompt, str):
        return prompt
    if all(_is_token_id(t) for t in prompt):
        return list(prompt)
    head = prompt[0]
    if isinstance(head, str):
        return head
    if isinstance(head, list) and head and all(_is_token_id(t) for t in head):
        return list(head)
    raise InvalidRequest("'prompt' must be a string, a list of token ids or a list of prompts")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32


def request_salt(payload: Mapping[str, Any]) -> bytes | None:
    """The hash salt of a request: LoRA adapter (the model name is not one) and cache salt."""
    cache_salt = payload.get("cache_salt")
    lora = payload.get("lora_name")
    return make_salt(
        lora_name=lora if isinstance(lora, str) else None,
        cache_salt=cache_salt if isinstance(cache_salt, str) else None,
    )


def prepare_prompt(
    tokenizer: Tokenizer | None,
    payload: Mapping[str, Any],
    kind: Kind,
    *,
    block_size: int,
    max_prompt_tokens: int,
    token_ids: list[int] | None = None,
) -> PreparedPrompt:
    """Tokenize (unless ``token_ids`` are given) and hash the routed prompt.

    Synchronous and CPU-bound: call it through ``loop.run_in_executor``.
    """
    if token_ids is None:
        token_ids = tokenize_locally(tokenizer, payload, kind, max_prompt_tokens)
    if len(token_ids) > max_prompt_tokens:
        raise RequestTooLarge(
            f"the prompt has {len(token_ids)} tokens, over the limit of {max_prompt_tokens}"
        )
    salt = request_salt(payload)
    local, seq = hash_request(token_ids, block_size, salt=salt)
    return PreparedPrompt(token_ids, local, seq, salt)


def tokenize_locally(
    tokenizer: Tokenizer | None,
    payload: Mapping[str, Any],
    kind: Kind,
    max_prompt_tokens: int,
) -> list[int]:
    """Token ids of the routed prompt with the gateway's own tokenizer."""
    if kind == "chat":
        if tokenizer is None:
            raise InvalidRequest("this gateway has no local tokenizer for chat requests")
        messages = normalize_messages(payload["messages"])
        add_gen = payload.get("add_generation_prompt", True) is not False
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_gen)
        # The template already wrote every special token the model expects.
        return tokenizer.encode(text, add_special_tokens=False)
    prompt = first_prompt(payload)
    if isinstance(prompt, list):
        return prompt  # token ids given by the client
    if tokenizer is None:
        raise InvalidRequest("this gateway has no local tokenizer; send token ids")
    # A cheap bound before the real work: no tokenizer makes more than ~4 tokens a byte,
    # and a prompt far over the limit should not cost a full tokenization to refuse.
    if len(prompt) > max_prompt_tokens * 16:
        raise RequestTooLarge(f"the prompt is far over the limit of {max_prompt_tokens} tokens")
    return tokenizer.encode(prompt)
