"""Tokenizers for the gateway and the simulated engine.

Two implementations of one small :class:`Tokenizer` protocol:

* :class:`ByteTokenizer` -- built in, deterministic, downloads nothing: a token is a
  UTF-8 byte plus a fixed offset for three special tokens, so ``encode`` is exact and
  ``decode(encode(s)) == s`` for every string.
* :class:`HfTokenizer` -- a Hugging Face ``tokenizer.json`` loaded with the
  ``tokenizers`` package, with its chat template taken from the adjacent
  ``tokenizer_config.json`` (or from a template file).

Chat messages are never concatenated as raw text: they are rendered through a Jinja
chat template in a sandboxed environment (templates come from model repositories and
must not reach Python internals). Loading is a one-time cost; ``encode`` and
``apply_chat_template`` are synchronous and may take milliseconds on long prompts, so
async callers run them off the event loop.

>>> tok = load_tokenizer(None)
>>> tok.encode("hi")
[107, 108]
>>> tok.decode([107, 108])
'hi'
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import xxhash
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvrouter.errors import ConfigError, InvalidRequest

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ByteTokenizer",
    "ChatTemplate",
    "HfTokenizer",
    "IncrementalDecoder",
    "Tokenizer",
    "load_tokenizer",
    "media_marker",
    "normalize_messages",
]

# ChatML, the format most open chat models use; applied when a tokenizer has none.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the gateway and the engine need from a tokenizer."""

    @property
    def name(self) -> str:
        """A short description, e.g. ``"byte"`` or the tokenizer file's path."""
        ...

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence token, when the tokenizer has one."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are skipped."""
        ...

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template_vars: Mapping[str, Any] | None = None,
    ) -> str:
        """Render chat ``messages`` to the prompt text the model sees; ``template_vars``
        are the request's other template variables (``tools``, ``enable_thinking``...)."""
        ...


def _raise_template_exception(message: str) -> None:
    # Templates call raise_exception() to reject conversations they cannot render.
    raise TemplateError(message)


class ChatTemplate:
    """A compiled chat template, rendered in an immutable Jinja sandbox.

    >>> ChatTemplate().render([{"role": "user", "content": "hi"}])
    '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    __slots__ = ("_special", "_template", "source")

    def __init__(
        self, source: str = DEFAULT_CHAT_TEMPLATE, special_tokens: Mapping[str, str] | None = None
    ) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_exception
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"chat template does not compile: {exc}") from exc
        self._special = dict(special_tokens or {})
        self.source = source

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template_vars: Mapping[str, Any] | None = None,
    ) -> str:
        """Render ``messages``; a template error becomes :class:`InvalidRequest`.

        ``template_vars`` (a request's ``tools`` and ``chat_template_kwargs``) cannot
        replace the messages, the generation prompt switch or the special tokens.
        """
        try:
            context = {
                **(template_vars or {}),
                "messages": normalize_messages(messages),
                "add_generation_prompt": add_generation_prompt,
                **self._special,
            }
            return self._template.render(context)
        except TemplateError as exc:
            raise InvalidRequest(f"chat template failed on these messages: {exc}") from exc


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], *, media: Literal["reject", "mark"] = "reject"
) -> list[dict[str, Any]]:
    """Plain dicts whose ``content`` is a string, as templates expect.

    OpenAI content-part lists (``[{"type": "text", "text": ...}, ...]``) are joined with
    newlines, as vLLM joins them;
    ``None`` content (an assistant turn with tool calls only) becomes ``""``. A part
    that is not text (an image, audio, a video, a file) is refused with ``media``
    ``"reject"``, and replaced by its :func:`media_marker` with ``"mark"``.
    """
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if "role" not in message:
            raise InvalidRequest(f"messages[{i}] has no 'role'")
        item = dict(message)
        item["content"] = _content_text(message.get("content"), i, media)
        if item["role"] == "assistant":
            _assistant_fields(item)
        out.append(item)
    return out


def _assistant_fields(item: dict[str, Any]) -> None:
    """An assistant turn as vLLM hands it to the template: tool call arguments as
    objects (templates iterate them), no empty ``tool_calls``, and its reasoning under
    both names vLLM uses."""
    calls = item.get("tool_calls")
    if isinstance(calls, list):
        if not calls:
            del item["tool_calls"]
        else:
            item["tool_calls"] = [_call_with_object_arguments(c) for c in calls]
    reasoning = item.get("reasoning", item.get("reasoning_content"))
    if reasoning is not None:
        item["reasoning"] = item["reasoning_content"] = reasoning


def _call_with_object_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return call
    arguments = function.get("arguments")
    if not arguments:
        arguments = {}
    elif not isinstance(arguments, dict | list):
        try:
            arguments = json.loads(arguments)
        except (TypeError, ValueError):
            return call  # not JSON: left as sent (vLLM would refuse the request)
    return {**call, "function": {**function, "arguments": arguments}}


def media_marker(part: Mapping[str, Any]) -> str:
    """The text that stands for a non-text content part in a routed prompt.

    The router cannot know how an engine expands an image into tokens, nor the content
    hash it salts those blocks with, so it cannot match past one. The marker makes the
    prompt's blocks match up to the part (the text before it tokenizes as the engine's
    does) and, past it, only prompts with the same part: it names a hash of the part.

    >>> media_marker({"type": "image_url", "image_url": {"url": "https://x/cat.png"}})
    '<|dc56d8e9a1eae0d278d101a993e34b11:image_url|>'
    """
    data = json.dumps(part, sort_keys=True, separators=(",", ":"), default=str)
    kind = str(part.get("type") or "part")[:32]
    # The digest comes first: prompts with different parts part ways at once.
    return f"<|{xxhash.xxh3_128_hexdigest(data.encode())}:{kind}|>"


def _content_text(content: Any, index: int, media: Literal["reject", "mark"]) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text") or ""))
            elif isinstance(part, str):
                parts.append(part)
            elif media == "mark" and isinstance(part, Mapping):
                parts.append(media_marker(part))
            else:
                kind = part.get("type") if isinstance(part, Mapping) else None
                raise InvalidRequest(
                    f"messages[{index}].content has a non-text part ({kind!r}); "
                    "this model takes text only"
                )
        return "\n".join(parts)  # as vLLM joins a message's text parts
    raise InvalidRequest(f"messages[{index}].content must be a string or a list of parts")


class ByteTokenizer:
    """A deterministic byte-level tokenizer: token = UTF-8 byte + 3.

    Ids 0, 1, 2 are ``<pad>``, ``<s>`` and ``</s>`` (the end-of-sequence token); no
    special token is added by ``encode``. ``decode`` skips special tokens and maps
    ids past the vocabulary back into printable ASCII, so any id sequence (such as
    the simulated engine's synthetic output) decodes to readable text.
    """

    NUM_SPECIAL = 3
    VOCAB_SIZE = 256 + NUM_SPECIAL
    PAD, BOS, EOS = 0, 1, 2

    __slots__ = ("_chat_template",)

    def __init__(self, chat_template: str | None = None) -> None:
        special = {"bos_token": "<s>", "eos_token": "</s>"}
        self._chat_template = ChatTemplate(chat_template or DEFAULT_CHAT_TEMPLATE, special)

    @property
    def name(self) -> str:
        return "byte"

    @property
    def eos_token_id(self) -> int | None:
        return self.EOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # bytes.translate would be faster still, but ids exceed one byte.
        offset = self.NUM_SPECIAL
        return [b + offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(self._byte_of(i) for i in ids if i >= self.NUM_SPECIAL).decode(
            "utf-8", errors="replace"
        )

    def _byte_of(self, token_id: int) -> int:
        if token_id < self.VOCAB_SIZE:
            return token_id - self.NUM_SPECIAL
        # Out of vocabulary: a printable ASCII character from ' ' to '~'.
        return 32 + token_id % 95

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template_vars: Mapping[str, Any] | None = None,
    ) -> str:
        return self._chat_template.render(messages, add_generation_prompt, template_vars)


class HfTokenizer:
    """A Hugging Face ``tokenizer.json``, with the model's chat template.

    The chat template is, in order: ``chat_template`` (a file path or the template
    text itself), ``chat_template`` in ``tokenizer_config.json`` next to the tokenizer
    file, a ``chat_template.jinja`` file next to it, or :data:`DEFAULT_CHAT_TEMPLATE`.
    """

    __slots__ = ("_chat_template", "_eos_token_id", "_path", "_tok")

    def __init__(self, path: str | Path, chat_template: str | None = None) -> None:
        from tokenizers import Tokenizer as _HfTok

        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        try:
            self._tok = _HfTok.from_file(str(file))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise ConfigError(f"cannot load tokenizer {file}: {exc}") from exc
        self._path = file
        config = _read_tokenizer_config(file.parent)
        special = {key: _token_text(config.get(key)) or "" for key in ("bos_token", "eos_token")}
        eos = special["eos_token"]
        self._eos_token_id: int | None = self._tok.token_to_id(eos) if eos else None
        source = _find_chat_template(file.parent, config, chat_template)
        self._chat_template = ChatTemplate(source, special)

    @property
    def name(self) -> str:
        return str(self._path)

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._tok.decode(list(ids), skip_special_tokens=True)
        return text

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template_vars: Mapping[str, Any] | None = None,
    ) -> str:
        return self._chat_template.render(messages, add_generation_prompt, template_vars)


class IncrementalDecoder:
    """The text of a growing token sequence, in the pieces a stream sends.

    Decoding each new token on its own loses what depends on its neighbours: the
    leading space of a SentencePiece word, a character whose UTF-8 bytes are split over
    several tokens, the spaces a word-level decoder puts between tokens. This decodes a
    window that starts one step back and hands out only what the new tokens added; a
    piece ending in an incomplete character is held back until a later token (or the
    end) completes it. Joined, the pieces are the decoding of the whole sequence (for
    decoders whose text only grows at the end, which is all the usual ones).

    >>> decoder = IncrementalDecoder(ByteTokenizer())
    >>> [decoder.feed(ids) for ids in ([0xC3 + 3], [0xA9 + 3, 33 + 3])]
    ['', 'é!']
    """

    __slots__ = ("_by_bytes", "_ids", "_prefix_offset", "_read_offset", "_tokenizer")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # Byte tokens decode the same with or without neighbours: no window is needed,
        # only the held-back tokens of an incomplete character (one decode per step).
        self._by_bytes = type(tokenizer) is ByteTokenizer  # a subclass may decode otherwise
        self._ids: list[int] = []
        self._prefix_offset = 0  # the window starts here: context for the new tokens
        self._read_offset = 0  # tokens before this are handed out as text

    def feed(self, new_ids: Sequence[int], final: bool = False) -> str:
        """The text ``new_ids`` add; with ``final``, also whatever was held back."""
        ids = self._ids
        ids.extend(new_ids)
        decode = self._tokenizer.decode
        if self._by_bytes:
            text = decode(ids)
            if not final and text.endswith("\ufffd"):
                return ""
            ids.clear()
            return text
        before = decode(ids[self._prefix_offset : self._read_offset])
        after = decode(ids[self._prefix_offset :])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return after[len(before) :]


def _read_tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return config if isinstance(config, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _find_chat_template(directory: Path, config: Mapping[str, Any], given: str | None) -> str:
    if given is not None:
        candidate = Path(given)
        if "{" not in given and candidate.is_file():
            return candidate.read_text(encoding="utf-8")
        if "{" not in given:
            raise ConfigError(f"chat template file {given} does not exist")
        return given
    template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates: the one called "default", else the first.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        return template
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return DEFAULT_CHAT_TEMPLATE


def load_tokenizer(spec: str | Path | None, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer named by ``spec``: ``None`` or ``"byte"`` for the built-in one,
    else a path to a ``tokenizer.json`` (or to a directory holding one).

    ``chat_template`` is a template file's path or the template text. Unknown specs
    raise :class:`~kvrouter.errors.ConfigError`.
    """
    if spec is None or str(spec) == "byte":
        return ByteTokenizer(_template_text(chat_template))
    path = Path(spec)
    if not path.exists():
        raise ConfigError(
            f"tokenizer {str(spec)!r} does not exist; give 'byte' or the path of a "
            "tokenizer.json (or of a folder holding one)"
        )
    return HfTokenizer(path, chat_template)


def _template_text(chat_template: str | None) -> str | None:
    if chat_template is None or "{" in chat_template:
        return chat_template
    path = Path(chat_template)
    if not path.is_file():
        raise ConfigError(f"chat template file {chat_template} does not exist")
    return path.read_text(encoding="utf-8")
