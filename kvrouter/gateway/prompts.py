"""From an OpenAI request body to the token ids the router hashes.

The body is decoded once into plain builtins (msgspec, fast) and only the fields the
router needs are checked here; everything else is the worker's business and passes
through untouched. Tokenizing is synchronous and may take milliseconds, so
:func:`prepare_prompt` runs off the event loop (it also hashes, so the hot path on the
loop only matches and scores) -- except where a thread hop would cost more than the
work: :func:`can_prepare_inline` says when (the built-in byte-level tokenizer, or token
ids given by the client, on bodies up to :data:`INLINE_MAX_BODY_BYTES`).

Chat requests always go through the chat template, never raw message text. A batch
prompt (a list of several prompts, :func:`batch_prompts`) is split by the forwarder into
one request per prompt, each routed by its own prefix.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np

from kvrouter.errors import InvalidRequest, RequestTooLarge
from kvrouter.hashing import Tokens, hash_request, make_salt
from kvrouter.protocol import (
    chat_template_vars,
    check_response_fields,
    decode_json,
    response_messages,
)
from kvrouter.tokenizer import ByteTokenizer, Tokenizer, normalize_messages

__all__ = [
    "INLINE_MAX_BODY_BYTES",
    "Kind",
    "ParsedBody",
    "PreparedPrompt",
    "batch_prompts",
    "byte_token_ids",
    "can_prepare_inline",
    "choices_per_prompt",
    "first_prompt",
    "parse_body",
    "prepare_prompt",
    "request_cache_salt",
    "request_salt",
    "tokenize_locally",
]

Kind = Literal["completion", "chat", "embedding", "response"]
_BODY_FIELD_MARKER = b'"kvrouter"'
_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()

# Bodies up to this size are tokenized and hashed on the event loop when that is cheap
# (byte-level tokenizer or client token ids): 64 KiB is at most ~4k blocks of 16 tokens,
# about 1 ms of hashing, less than the GIL hand-offs a worker thread would cost under
# load. Larger bodies, and every Hugging Face tokenizer (whose Rust encoder releases the
# GIL), go to a worker thread so one huge prompt cannot stall every other request.
INLINE_MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ParsedBody:
    """A request body: the decoded JSON, the bytes to forward, and routing extras."""

    payload: dict[str, Any]
    forward_body: bytes
    kvrouter_field: Any
    stream: bool


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """Token ids of the routed prompt and their block hashes, computed once.

    ``token_ids`` is a list, or a numpy ``uint32`` array on the byte-level fast path.
    """

    token_ids: Tokens
    local_hashes: list[int]
    sequence_hashes: list[int]
    salt: bytes | None
    cache_salt: str | None = None
    num_sequences: int = 1  # the request's ``n``: sequences the engine runs for it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def choices_per_prompt(payload: Mapping[str, Any]) -> int:
    """``n``: how many choices each prompt gets (1 unless the client set it)."""
    n = payload.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def parse_body(body: bytes, kind: Kind) -> ParsedBody:
    """Decode and check ``body``; strip the ``"kvrouter"`` field when present.

    The forwarded bytes are the original ones unless the field had to be removed
    (re-encoding a large prompt for nothing would cost more than the routing).
    """
    if not body:
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        payload = decode_json(_decoder, body)
    except msgspec.ValidationError as exc:
        if str(exc).startswith("Expected `object`"):
            raise InvalidRequest("the request body must be a JSON object") from exc
        raise InvalidRequest(f"the request body is not valid: {exc}") from exc  # e.g. 1e999
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
    if kind == "embedding":
        # Routed by its (first) input, as a completion prompt; forwarded as it came.
        first = _first_of(
            payload["input"],
            "'input' must be a string, a list of token ids, or a list of either (a batch)",
        )
        routed = {**payload, "prompt": first}
        return ParsedBody(routed, forward, field, stream=False)
    if kind == "response":
        # Routed as the chat conversation it stands for; forwarded as it came.
        routed = {**payload, "messages": response_messages(payload)}
        return ParsedBody(routed, forward, field, stream)
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
    if kind == "response":
        check_response_fields(payload)
        return
    if kind == "embedding":
        value = payload.get("input")
        if not isinstance(value, str | list) or not value:
            raise InvalidRequest(
                "'input' is required: a string, a list of token ids, or a list of either"
            )
        return
    prompt = payload.get("prompt")
    if prompt is None:
        raise InvalidRequest("'prompt' is required")
    if not isinstance(prompt, str | list):
        raise InvalidRequest("'prompt' must be a string, a list of token ids or a list of prompts")
    if isinstance(prompt, list) and not prompt:
        raise InvalidRequest("'prompt' must not be empty")


def first_prompt(payload: Mapping[str, Any]) -> str | list[int]:
    """The completion prompt a request is routed by (of a batch, the first: what
    ``/explain`` and a worker-side tokenizer see; the forwarder splits batches)."""
    return _first_of(
        payload["prompt"], "'prompt' must be a string, a list of token ids or a list of prompts"
    )


def _first_of(value: Any, message: str) -> str | list[int]:
    """A prompt or embedding input, or of a batch of them the first; ``message`` when
    ``value`` (a non-empty string or list) is neither."""
    if isinstance(value, str):
        return value
    if all(_is_token_id(t) for t in value):
        return list(value)
    head = value[0]
    if isinstance(head, str):
        return head
    if isinstance(head, list) and head and all(_is_token_id(t) for t in head):
        return list(head)
    raise InvalidRequest(message)


def batch_prompts(payload: Mapping[str, Any]) -> list[str | list[int]] | None:
    """The prompts of a batch completion, or ``None`` for a single prompt.

    A string, a list of token ids and a list of one prompt are single prompts. Raises
    :class:`~kvrouter.errors.InvalidRequest` naming the first bad element of a batch.
    """
    prompt = payload.get("prompt")
    if not isinstance(prompt, list) or len(prompt) < 2:
        return None
    if all(_is_token_id(t) for t in prompt):
        return None
    prompts: list[str | list[int]] = []
    for i, item in enumerate(prompt):
        is_ids = isinstance(item, list) and item and all(_is_token_id(t) for t in item)
        if isinstance(item, str) or is_ids:
            prompts.append(item)
        else:
            raise InvalidRequest(f"prompt[{i}] must be a string or a non-empty list of token ids")
    return prompts


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32


def request_salt(
    payload: Mapping[str, Any], lora_models: Collection[str] = frozenset()
) -> bytes | None:
    """The hash salt of every block of a request: its LoRA adapter, named by
    ``lora_name`` or, as vLLM selects one, by a ``model`` that is one of the adapters the
    workers serve (``lora_models``)."""
    lora = payload.get("lora_name")
    if not isinstance(lora, str):
        model = payload.get("model")
        lora = model if isinstance(model, str) and model in lora_models else None
    return make_salt(lora_name=lora)


def request_cache_salt(payload: Mapping[str, Any]) -> str | None:
    """The request's ``cache_salt`` (vLLM's per-tenant cache isolation), if any."""
    cache_salt = payload.get("cache_salt")
    return cache_salt if isinstance(cache_salt, str) and cache_salt else None


def can_prepare_inline(tokenizer: Tokenizer | None, parsed: ParsedBody, kind: Kind) -> bool:
    """Whether :func:`prepare_prompt` is cheap enough for the event loop itself.

    Small bodies only, and only when no real tokenizer runs: the built-in byte-level
    one (a numpy cast) or token ids the client sent.
    """
    if len(parsed.forward_body) > INLINE_MAX_BODY_BYTES:
        return False
    if isinstance(tokenizer, ByteTokenizer):
        return True
    return kind == "completion" and not isinstance(parsed.payload.get("prompt"), str)


def byte_token_ids(text: str) -> np.ndarray[Any, np.dtype[np.uint32]]:
    """``ByteTokenizer().encode(text)`` as a ``uint32`` array, without a Python loop."""
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)
    ids += ByteTokenizer.NUM_SPECIAL
    return ids


def prepare_prompt(
    tokenizer: Tokenizer | None,
    payload: Mapping[str, Any],
    kind: Kind,
    *,
    block_size: int,
    max_prompt_tokens: int,
    token_ids: list[int] | None = None,
    lora_models: Collection[str] = frozenset(),
) -> PreparedPrompt:
    """Tokenize (unless ``token_ids`` are given) and hash the routed prompt
    (``lora_models``: the model names that are LoRA adapters, see :func:`request_salt`).

    Synchronous and CPU-bound: call it through ``loop.run_in_executor`` unless
    :func:`can_prepare_inline` says it is cheap.
    """
    if token_ids is None:
        tokens: Tokens
    if token_ids is None:
        tokens = tokenize_locally(tokenizer, payload, kind, max_prompt_tokens)
    else:
        tokens = token_ids
    if len(tokens) > max_prompt_tokens:
        raise RequestTooLarge(
            f"the prompt has {len(tokens)} tokens, over the limit of {max_prompt_tokens}"
        )
    salt = request_salt(payload, lora_models)
    cache_salt = request_cache_salt(payload)
    local, seq = hash_request(tokens, block_size, salt=salt, cache_salt=cache_salt)
    return PreparedPrompt(tokens, local, seq, salt, cache_salt, choices_per_prompt(payload))


def tokenize_locally(
    tokenizer: Tokenizer | None,
    payload: Mapping[str, Any],
    kind: Kind,
    max_prompt_tokens: int,
) -> Tokens:
    """Token ids of the routed prompt with the gateway's own tokenizer."""
    if kind == "chat":
        if tokenizer is None:
            raise InvalidRequest("this gateway has no local tokenizer for chat requests")
        messages = normalize_messages(payload["messages"], media="mark")
        add_gen = payload.get("add_generation_prompt", True) is not False
        template_vars = chat_template_vars(
            payload.get("tools"), payload.get("chat_template_kwargs")
        )
        text = tokenizer.apply_chat_template(messages, add_gen, template_vars)
        if isinstance(tokenizer, ByteTokenizer):
            return byte_token_ids(text)
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
    if isinstance(tokenizer, ByteTokenizer):
        return byte_token_ids(prompt)
    return tokenizer.encode(prompt)
