"""OpenAI-compatible request and response types (DESIGN 3.4), shared by the gateway and
the simulated engine.

Requests are decoded with one reused typed decoder per kind; unknown JSON fields are
accepted (routers and benchmarks add their own, e.g. vLLM's ``ignore_eos``), while
known fields are type-checked and range-checked. Every failure becomes
:class:`~kvrouter.errors.InvalidRequest` whose message names the field.

>>> req = decode_completion_request(b'{"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}')
>>> req.prompts(), req.output_tokens()
([[1, 2, 3]], 4)
>>> error_body("bad", "BadRequestError", 400)
b'{"error":{"message":"bad","type":"BadRequestError","param":null,"code":400}}'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec

from kvrouter.errors import InvalidRequest

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_LOGPROBS",
    "MAX_N",
    "OUTPUT_TOKENS_FIELD",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatFormat",
    "ChatLogprob",
    "ChatLogprobContent",
    "ChatLogprobs",
    "ChatMessage",
    "ChatResponseMessage",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionFormat",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "DeltaFunctionCall",
    "DeltaToolCall",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "Logprobs",
    "ModelCard",
    "ModelList",
    "PromptTokensDetails",
    "RenderedRequest",
    "RenderedSamplingParams",
    "ResponseFormat",
    "StreamOptions",
    "TokenizeRequest",
    "TokenizeResponse",
    "ToolCall",
    "ToolCallFunction",
    "Usage",
    "chat_template_vars",
    "check_response_fields",
    "decode_chat_request",
    "decode_completion_request",
    "decode_detokenize_request",
    "decode_json",
    "decode_tokenize_request",
    "encode",
    "error_body",
    "input_messages",
    "require_messages",
    "response_messages",
]

DEFAULT_MAX_TOKENS = 16
# Extension field: the exact number of tokens to generate (a benchmark's output length).
OUTPUT_TOKENS_FIELD = "kvrouter_output_tokens"
_NO_PROMPT_LOGPROBS = (
    "prompt_logprobs is not supported by the simulated engine; a completion with echo and "
    "logprobs scores its prompt"
)
# vLLM's default --max-logprobs: the most alternatives per token a request may ask for.
MAX_LOGPROBS = 20


def _check_num_logprobs(value: int | None, field: str) -> None:
    if value is None:
        return
    if value < 0:
        raise InvalidRequest(f"`{field}` must be a positive value.")
    if value > MAX_LOGPROBS:
        raise InvalidRequest(
            f"Requested sample logprobs of {value}, which is greater than max allowed: "
            f"{MAX_LOGPROBS}"
        )


# Most choices one request may ask for (vLLM's default VLLM_MAX_N_SEQUENCES).
MAX_N = 16384

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
NumChoices = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]
# vLLM takes any temperature >= 0 (OpenAI's own API stops at 2).
Temperature = Annotated[float, msgspec.Meta(ge=0.0)]
# vLLM's ranges (sampling_params.py): accepted and checked, though they change no text here.
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, msgspec.Meta(gt=0.0)]
TopK = Annotated[int, msgspec.Meta(ge=-1)]
PromptItem = str | NonNegInt | list[NonNegInt]


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    """Fields completions and chat share.

    The simulated model has no token distribution, so log probabilities are refused
    rather than silently left out.
    """

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PosInt | None = None
    min_tokens: NonNegInt = 0
    ignore_eos: bool = False
    temperature: Temperature | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: TopK | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegInt] | None = None
    include_stop_str_in_output: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings (``stop`` as a string or a list)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def has_stops(self) -> bool:
        return bool(self.stop_strings() or self.stop_token_ids)

    n: NumChoices | None = 1
    prompt_logprobs: int | None = None
    user: str | None = None
    cache_salt: str | None = None
    kvrouter_output_tokens: PosInt | None = None

    def output_tokens(self) -> int:
        """How many tokens to generate: the extension field, else the max tokens."""
        return self.given_output_tokens() or DEFAULT_MAX_TOKENS

    def given_output_tokens(self) -> int | None:
        """The request's own output limit (``None``: it set none; the default applies)."""
        if self.kvrouter_output_tokens is not None:
            return self.kvrouter_output_tokens
        return self._max_tokens()

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def num_choices(self) -> int:
        """Choices per prompt (``n``; null means 1)."""
        return self.n or 1

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def include_continuous_usage(self) -> bool:
        """Usage on every chunk too (vLLM: only together with ``include_usage``)."""
        options = self.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats

    def _check_sampling(self) -> None:
        if any(not s for s in self.stop_strings()):
            raise InvalidRequest("stop cannot contain an empty string")
        if self.prompt_logprobs is not None:
            raise InvalidRequest(_NO_PROMPT_LOGPROBS)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true")
        max_tokens = self._max_tokens()
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidRequest(
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({max_tokens})"
            )


class CompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/completions``: ``prompt`` is text, token ids, or a list of either."""

    prompt: str | list[PromptItem]
    echo: bool = False
    logprobs: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids (a list of strings is a batch)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequest("prompt must not be empty")
        if all(isinstance(p, int) for p in prompt):
            return [[p for p in prompt if isinstance(p, int)]]
        if all(isinstance(p, str | list) for p in prompt):
            return [p for p in prompt if isinstance(p, str | list)]
        raise InvalidRequest("prompt mixes token ids with strings or lists")

    def num_logprobs(self) -> int | None:
        """Alternatives per token to report (``None``: no logprobs asked for)."""
        return self.logprobs

    def validate(self) -> None:
        self._check_sampling()
        _check_num_logprobs(self.logprobs, "logprobs")
        for i, p in enumerate(self.prompts()):
            if len(p) == 0:
                raise InvalidRequest(f"prompt[{i}] is empty")


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One message; what chat templates read of it besides ``content`` is kept too: an
    assistant turn's ``tool_calls`` and ``reasoning``/``reasoning_content``, a tool result's
    ``tool_call_id``. (Dropped, they would render a prompt other than vLLM's, and other
    than the one the gateway hashed.)"""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The message as the plain dict a chat template expects."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        out.setdefault("content", None)
        return out


def chat_template_vars(tools: Any, kwargs: Any) -> dict[str, Any]:
    """A chat request's own chat-template variables: its ``chat_template_kwargs`` (e.g.
    ``enable_thinking``) and its ``tools``, as vLLM passes them to the template.

    >>> chat_template_vars([{"type": "function"}], {"enable_thinking": False})
    {'enable_thinking': False, 'tools': [{'type': 'function'}]}
    """
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InvalidRequest("'chat_template_kwargs' must be an object")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list")
    out: dict[str, Any] = dict(kwargs or {})
    if tools is not None:  # an empty list too: templates test `tools is not none`
        out["tools"] = tools
    return out


def _function_of(tool: Any, index: int) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(
            f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ...}}}}"
        )
    return function


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: PosInt | None = None
    add_generation_prompt: bool = True
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def template_vars(self) -> dict[str, Any]:
        return chat_template_vars(self.tools, self.chat_template_kwargs)

    def forced_tools(self) -> list[dict[str, Any]] | None:
        """The functions one of which the answer must call: the named one, or every
        tool with ``"required"``; ``None`` when the answer may be text."""
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return None
        functions = [_function_of(tool, i) for i, tool in enumerate(self.tools or ())]
        if not functions:
            raise InvalidRequest("When using `tool_choice`, `tools` must be set.")
        if choice == "required":
            return functions
        if isinstance(choice, str):
            raise InvalidRequest(
                f"tool_choice must be 'none', 'auto', 'required' or a named function, "
                f"not {choice!r}"
            )
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest(
                'a named tool_choice is {"type": "function", "function": {"name": ...}}'
            )
        named = [f for f in functions if f.get("name") == name]
        if not named:
            raise InvalidRequest(f"Tool '{name}' has not been passed in `tools`.")
        return named

    def _max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens for chat in favour of max_completion_tokens.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.messages]

    def num_logprobs(self) -> int | None:
        """Alternatives per token to report (``None``: no logprobs asked for)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def validate(self) -> None:
        self._check_sampling()
        _check_num_logprobs(self.top_logprobs, "top_logprobs")
        if self.top_logprobs and not self.logprobs:  # 0 asks for nothing: let it pass
            raise InvalidRequest("when using `top_logprobs`, `logprobs` must be set to true.")
        self.forced_tools()  # a tool_choice that cannot be met is refused up front


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's ``POST /detokenize``."""

    tokens: list[NonNegInt]
    model: str | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's ``POST /tokenize``: either ``prompt`` or ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def template_vars(self) -> dict[str, Any]:
        return chat_template_vars(self.tools, self.chat_template_kwargs)

    def validate(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("give exactly one of 'prompt' and 'messages'")


# --- the Responses API (requests) -------------------------------------------------

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text")


def check_response_fields(payload: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidRequest` unless ``input`` and the optional fields are usable."""
    value = payload.get("input")
    if not isinstance(value, str | list) or not value:
        raise InvalidRequest("'input' is required: a string or a non-empty list of input items")
    for name in ("instructions", "previous_response_id"):
        field = payload.get(name)
        if field is not None and not isinstance(field, str):
            raise InvalidRequest(f"'{name}' must be a string")
    for name in ("stream", "store", "background"):
        field = payload.get(name)
        if field is not None and not isinstance(field, bool):
            raise InvalidRequest(f"'{name}' must be a boolean")
    limit = payload.get("max_output_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InvalidRequest(f"'max_output_tokens' must be a positive integer, got {limit!r}")


def response_messages(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chat messages a Responses request stands for (``instructions`` as the
    system message, then its input items; see :mod:`kvrouter.gateway.responses`).

    >>> response_messages({"instructions": "Be brief.", "input": "Hi"})
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    """
    instructions = payload.get("instructions")
    head = (
        [{"role": "system", "content": instructions}]
        if isinstance(instructions, str) and instructions
        else []
    )
    return require_messages(head + input_messages(payload.get("input")))


def input_messages(value: Any) -> list[dict[str, Any]]:
    """The chat messages of a Responses request's ``input`` alone (text, or items)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value or ()):
        if not isinstance(item, dict):
            raise InvalidRequest(f"input[{i}] must be an object")
        message = _item_message(item, i)
        if message is not None:
            messages.append(message)
    return messages


def require_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages``, unless there are none to run (only reasoning items, say)."""
    if not messages:
        raise InvalidRequest("'input' holds no message, function call or function output")
    return messages


def _item_message(item: Mapping[str, Any], i: int) -> dict[str, Any] | None:
    kind = item.get("type", "message")
    if kind == "message":
        role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise InvalidRequest(
                f"input[{i}].role must be one of user, assistant, system, developer"
            )
        return {"role": role, "content": _content(item.get("content"), i)}
    if kind == "function_call":
        call = f"{item.get('name', '')}({item.get('arguments', '')})"
        return {"role": "assistant", "content": call}
    if kind == "function_call_output":
        output = item.get("output", "")
        return {"role": "tool", "content": output if isinstance(output, str) else str(output)}
    return None


def _content(content: Any, i: int) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"input[{i}].content must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            raise InvalidRequest(f"input[{i}].content holds a part that is not an object")
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "input_image":
            url = part.get("image_url") or part.get("file_id") or ""
            parts.append({"type": "image_url", "image_url": {"url": str(url)}})
    return parts


# --- responses --------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        """Usage with ``prompt_tokens_details.cached_tokens`` filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    """A completion choice's ``logprobs`` (the legacy OpenAI shape vLLM keeps)."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class ChatLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobContent(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatLogprob] = msgspec.field(default_factory=list)


class ChatLogprobs(msgspec.Struct, kw_only=True):
    """A chat choice's ``logprobs``: one entry per output token."""

    content: list[ChatLogprobContent] | None = None


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


# One SSE event of a streamed completion: OpenAI gives it the response's exact shape.
CompletionChunk = CompletionResponse


class ToolCallFunction(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    function: ToolCallFunction
    type: str = "function"


class DeltaFunctionCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A piece of a streamed tool call: the first names it, the rest add arguments."""

    index: int
    function: DeltaFunctionCall
    id: str | None = None
    type: str | None = None


class ChatResponseMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    object: str = "chat.completion"


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    created: int
    max_model_len: int | None = None
    owned_by: str = "kvrouter"
    root: str | None = None
    object: str = "model"


class ModelList(msgspec.Struct, kw_only=True):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(msgspec.Struct, kw_only=True):
    """vLLM's ``/tokenize`` answer."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    """vLLM's ``/detokenize`` answer."""

    prompt: str


class RenderedSamplingParams(msgspec.Struct, kw_only=True):
    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    temperature: float = 1.0


class RenderedRequest(msgspec.Struct, kw_only=True):
    """What the ``/render`` endpoints answer: vLLM's ``GenerateRequest`` shape, i.e.
    the token ids and sampling parameters the engine would run."""

    request_id: str
    token_ids: list[int]
    sampling_params: RenderedSamplingParams
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = None
    features: None = None
    priority: int = 0

    @classmethod
    def of(
        cls,
        request_id: str,
        token_ids: list[int],
        req: CompletionRequest | ChatCompletionRequest,
        model: str,
    ) -> RenderedRequest:
        """The rendering of ``req`` whose prompt became ``token_ids``."""
        params = RenderedSamplingParams(
            max_tokens=req.output_tokens(),
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            temperature=1.0 if req.temperature is None else req.temperature,
        )
        return cls(
            request_id=request_id,
            token_ids=token_ids,
            sampling_params=params,
            model=model,
            stream=req.stream,
            stream_options=req.stream_options,
            cache_salt=req.cache_salt,
        )


# --- codecs -----------------------------------------------------------------------

_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_tokenize_decoder = msgspec.json.Decoder(TokenizeRequest)
_detokenize_decoder = msgspec.json.Decoder(DetokenizeRequest)
_encoder = msgspec.json.Encoder()


def decode_json(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    """``decoder.decode(body)``; bytes that are not UTF-8 and nesting too deep for the
    parser are :class:`InvalidRequest` too (msgspec's own errors pass through)."""
    try:
        return decoder.decode(body)
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid UTF-8 ({exc.reason})") from exc
    except RecursionError as exc:
        raise InvalidRequest("the request body's JSON is nested too deeply") from exc


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    if not body:
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        return decode_json(decoder, body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc


def decode_completion_request(body: bytes) -> CompletionRequest:
    """Decode and validate a completions request body."""
    request: CompletionRequest = _decode(_completion_decoder, body)
    request.validate()
    return request


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    """Decode and validate a chat completions request body."""
    request: ChatCompletionRequest = _decode(_chat_decoder, body)
    request.validate()
    return request


def decode_tokenize_request(body: bytes) -> TokenizeRequest:
    """Decode and validate a ``/tokenize`` request body."""
    request: TokenizeRequest = _decode(_tokenize_decoder, body)
    request.validate()
    return request


def decode_detokenize_request(body: bytes) -> DetokenizeRequest:
    """Decode a ``/detokenize`` request body."""
    request: DetokenizeRequest = _decode(_detokenize_decoder, body)
    return request


def encode(value: Any) -> bytes:
    """JSON bytes of a response struct (or of plain builtins)."""
    return _encoder.encode(value)


class _ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: int | str | None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


def error_body(message: str, type: str, code: int | str | None, param: str | None = None) -> bytes:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return _encoder.encode(_ErrorBody(_ErrorDetail(message, type, param, code)))


# --- response formats -------------------------------------------------------------


class CompletionFormat:
    """Builds ``/v1/completions`` responses and stream chunks as JSON bytes.

    >>> CompletionFormat("m").chunk("cmpl-1", 0, 0, "hi", None)
    b'{"id":"cmpl-1","created":0,"model":"m","choices":[{"index":0,"text":"hi","logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null,"object":"text_completion"}'
    """

    id_prefix = "cmpl"
    __slots__ = ("model",)

    def __init__(self, model: str) -> None:
        self.model = model

    def first_chunk(
        self, request_id: str, created: int, index: int, *, usage: Usage | None = None
    ) -> bytes | None:
        """Completions streams have no opening chunk."""
        return None

    def chunk(
        self,
        request_id: str,
        created: int,
        index: int,
        text: str,
        finish_reason: str | None,
        *,
        usage: Usage | None = None,
        stop_reason: str | int | None = None,
        logprobs: Logprobs | None = None,
        tool_calls: list[DeltaToolCall] | None = None,
    ) -> bytes:
        _no_tool_calls(tool_calls)
        choice = CompletionChoice(
            index=index,
            text=text,
            logprobs=_completion_logprobs(logprobs),
            finish_reason=_reason(finish_reason),
            stop_reason=stop_reason,
        )
        return self._chunk(request_id, created, [choice], usage)

    def usage_chunk(self, request_id: str, created: int, usage: Usage) -> bytes:
        return self._chunk(request_id, created, [], usage)

    def _chunk(
        self,
        request_id: str,
        created: int,
        choices: list[CompletionChoice],
        usage: Usage | None,
    ) -> bytes:
        return encode(
            CompletionChunk(
                id=request_id, created=created, model=self.model, choices=choices, usage=usage
            )
        )

    def response(
        self,
        request_id: str,
        created: int,
        texts: list[str],
        finish_reasons: list[str | None],
        usage: Usage,
        *,
        stop_reasons: Sequence[str | int | None] | None = None,
        logprobs: Sequence[Logprobs | None] | None = None,
        tool_calls: Sequence[ToolCall | None] | None = None,
    ) -> bytes:
        _no_tool_calls(tool_calls)
        stops = stop_reasons or [None] * len(texts)
        scores = logprobs or [None] * len(texts)
        choices = [
            CompletionChoice(
                index=i,
                text=text,
                logprobs=_completion_logprobs(lp),
                finish_reason=_reason(reason),
                stop_reason=stop,
            )
            for i, (text, reason, stop, lp) in enumerate(
                zip(texts, finish_reasons, stops, scores, strict=True)
            )
        ]
        return encode(
            CompletionResponse(
                id=request_id, created=created, model=self.model, choices=choices, usage=usage
            )
        )


class ChatFormat:
    """Builds ``/v1/chat/completions`` responses and stream chunks as JSON bytes.

    A stream opens with a chunk whose delta carries only the assistant role.
    """

    id_prefix = "chatcmpl"
    __slots__ = ("model",)

    def __init__(self, model: str) -> None:
        self.model = model

    def first_chunk(
        self, request_id: str, created: int, index: int, *, usage: Usage | None = None
    ) -> bytes | None:
        choice = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
        return self._chunk(request_id, created, [choice], usage)

    def chunk(
        self,
        request_id: str,
        created: int,
        index: int,
        text: str,
        finish_reason: str | None,
        *,
        usage: Usage | None = None,
        stop_reason: str | int | None = None,
        logprobs: Logprobs | None = None,
        tool_calls: list[DeltaToolCall] | None = None,
    ) -> bytes:
        delta = ChatDelta(content=text or None, tool_calls=tool_calls)
        choice = ChatChunkChoice(
            index=index,
            delta=delta,
            logprobs=_chat_logprobs(logprobs),
            finish_reason=_reason(finish_reason),
            stop_reason=stop_reason,
        )
        return self._chunk(request_id, created, [choice], usage)

    def usage_chunk(self, request_id: str, created: int, usage: Usage) -> bytes:
        return self._chunk(request_id, created, [], usage)

    def _chunk(
        self,
        request_id: str,
        created: int,
        choices: list[ChatChunkChoice],
        usage: Usage | None = None,
    ) -> bytes:
        return encode(
            ChatCompletionChunk(
                id=request_id, created=created, model=self.model, choices=choices, usage=usage
            )
        )

    def response(
        self,
        request_id: str,
        created: int,
        texts: list[str],
        finish_reasons: list[str | None],
        usage: Usage,
        *,
        stop_reasons: Sequence[str | int | None] | None = None,
        logprobs: Sequence[Logprobs | None] | None = None,
        tool_calls: Sequence[ToolCall | None] | None = None,
    ) -> bytes:
        """``tool_calls``: one call per choice, which then has no text (as vLLM answers a
        forced tool choice)."""
        stops = stop_reasons or [None] * len(texts)
        scores = logprobs or [None] * len(texts)
        calls: Sequence[ToolCall | None] = tool_calls or [None] * len(texts)
        choices = [
            ChatChoice(
                index=i,
                message=_chat_message(text, calls[i]),
                logprobs=_chat_logprobs(lp),
                finish_reason=_reason(reason),
                stop_reason=stop,
            )
            for i, (text, reason, stop, lp) in enumerate(
                zip(texts, finish_reasons, stops, scores, strict=True)
            )
        ]
        return encode(
            ChatCompletionResponse(
                id=request_id, created=created, model=self.model, choices=choices, usage=usage
            )
        )


ResponseFormat = CompletionFormat | ChatFormat


def _chat_message(text: str, call: ToolCall | None) -> ChatResponseMessage:
    if call is None:
        return ChatResponseMessage(role="assistant", content=text)
    return ChatResponseMessage(role="assistant", content="", tool_calls=[call])


# A choice's logprobs in either API's shape; each format takes its own.
Logprobs = CompletionLogprobs | ChatLogprobs


def _no_tool_calls(calls: Sequence[object] | None) -> None:
    if calls is not None and any(calls):
        raise TypeError("a completion has no tool calls")


def _completion_logprobs(value: Logprobs | None) -> CompletionLogprobs | None:
    if value is not None and not isinstance(value, CompletionLogprobs):
        raise TypeError("a completion takes CompletionLogprobs")
    return value


def _chat_logprobs(value: Logprobs | None) -> ChatLogprobs | None:
    if value is not None and not isinstance(value, ChatLogprobs):
        raise TypeError("a chat completion takes ChatLogprobs")
    return value


_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    "tool_calls": "tool_calls",
}


def _reason(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    try:
        return _FINISH_REASONS[reason]
    except KeyError:
        raise ValueError(f"unknown finish reason {reason!r}") from None
