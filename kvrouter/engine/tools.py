"""Tool calls for a forced ``tool_choice`` (a named function, or ``"required"``).

vLLM meets a forced choice with structured output: the model writes arguments that
match the function's JSON schema. The simulated engine writes them from the schema
itself: the first ``enum``/``const``/``default`` value where there is one, otherwise a
value of the declared type derived from the request's id, so the same id gives the same
call. Objects get their required properties (all of them when none are marked).

Pure: no asyncio, no clock.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from xxhash import xxh3_64_intdigest

from kvrouter.protocol import DeltaFunctionCall, DeltaToolCall, ToolCall, ToolCallFunction

__all__ = ["ToolCallStream", "example_arguments", "plan_tool_call"]

_MAX_DEPTH = 6  # nesting past which a value is left empty (recursive schemas)
_WORDS = ("alpha", "bravo", "delta", "echo", "kilo", "lima", "oscar", "sierra", "tango")


def plan_tool_call(functions: Sequence[Mapping[str, Any]], seed: str) -> ToolCall:
    """One call of one of ``functions`` (chosen by ``seed`` when there are several),
    with arguments that fit its ``parameters`` schema; its id is vLLM's form."""
    h = xxh3_64_intdigest(seed.encode())
    function = functions[h % len(functions)]
    arguments = example_arguments(function.get("parameters"), seed)
    return ToolCall(
        id=f"chatcmpl-tool-{uuid.uuid4().hex}",
        function=ToolCallFunction(name=str(function["name"]), arguments=arguments),
    )


def example_arguments(schema: Any, seed: str) -> str:
    """JSON arguments that fit ``schema`` (an object schema; ``None``: no parameters).
    Local references (``#/$defs/...``, ``#/definitions/...``) are followed, as the
    ``openai`` client's pydantic tools write nested models and enums.

    >>> example_arguments({"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
    ...     "days": {"type": "integer"}}, "required": ["unit"]}, "r1")
    '{"unit": "c"}'
    >>> example_arguments(None, "r1")
    '{}'
    """
    if not isinstance(schema, Mapping):
        return "{}"
    value = _Writer(schema).value(schema, seed, 0)
    return json.dumps(value if isinstance(value, dict) else {}, ensure_ascii=False)


class _Writer:
    """Values for the parts of one root schema."""

    __slots__ = ("root",)

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def value(self, schema: Mapping[str, Any], seed: str, depth: int) -> Any:
        if depth >= _MAX_DEPTH:
            return None
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(ref)
            return None if target is None else self.value(target, seed, depth + 1)
        for key in ("const", "default"):
            if key in schema:
                return schema[key]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        for key in ("anyOf", "oneOf", "allOf"):
            options = schema.get(key)
            if isinstance(options, list) and options and isinstance(options[0], Mapping):
                return self.value(options[0], seed, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if not isinstance(kind, str):
            kind = "object" if "properties" in schema else "string"
        h = xxh3_64_intdigest(f"{seed}/{depth}".encode())
        if kind == "object":
            return self._object(schema, seed, depth)
        if kind == "array":
            items = schema.get("items")
            if not isinstance(items, Mapping):
                return []
            low = schema.get("minItems")
            count = min(low, 4) if isinstance(low, int) and low > 1 else 1
            return [self.value(items, f"{seed}[{i}]", depth + 1) for i in range(count)]
        if kind == "integer":
            return _bounded(schema, h % 100)
        if kind == "number":
            return float(_bounded(schema, h % 1000)) / 10
        if kind == "boolean":
            return bool(h & 1)
        if kind == "null":
            return None
        return f"{_WORDS[h % len(_WORDS)]}-{h % 1000}"

    def _object(self, schema: Mapping[str, Any], seed: str, depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        if not isinstance(properties, Mapping):
            return {}
        required = schema.get("required")
        names = list(properties)
        if isinstance(required, list):
            names = [n for n in required if isinstance(n, str) and n in properties]
        out: dict[str, Any] = {}
        for name in names:
            sub = properties[name]
            out[name] = (
                self.value(sub, f"{seed}.{name}", depth + 1) if isinstance(sub, Mapping) else None
            )
        return out

    def _resolve(self, ref: str) -> Mapping[str, Any] | None:
        """The part of the root schema a local ``ref`` names (``None``: no such part)."""
        if not ref.startswith("#"):
            return None
        node: Any = self.root
        for part in ref[1:].split("/"):
            if not part:
                continue
            key = part.replace("~1", "/").replace("~0", "~")
            node = node.get(key) if isinstance(node, Mapping) else None
        return node if isinstance(node, Mapping) else None


def _bounded(schema: Mapping[str, Any], value: int) -> int:
    low = schema.get("minimum")
    high = schema.get("maximum")
    if isinstance(low, int | float) and value < low:
        value = math.ceil(low)
    if isinstance(high, int | float) and value > high:
        value = math.floor(high)
    return value


class ToolCallStream:
    """A choice's tool call sent as stream deltas: the first names the call, the rest
    carry its arguments, spread over the tokens as they come (``total`` expected)."""

    __slots__ = ("_call", "_sent", "_started", "_total")

    def __init__(self, call: ToolCall, total_tokens: int) -> None:
        self._call = call
        self._total = max(total_tokens, 1)
        self._sent = 0
        self._started = False

    def delta(self, num_tokens: int, final: bool) -> list[DeltaToolCall] | None:
        """The delta after ``num_tokens`` of the choice's tokens (``final``: the rest)."""
        arguments = self._call.function.arguments
        end = len(arguments) if final else len(arguments) * min(num_tokens, self._total)
        end = end if final else end // self._total
        piece, self._sent = arguments[self._sent : end], max(self._sent, end)
        if not self._started:
            self._started = True
            function = DeltaFunctionCall(name=self._call.function.name, arguments=piece)
            return [DeltaToolCall(index=0, id=self._call.id, type="function", function=function)]
        if not piece:
            return None
        return [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=piece))]
