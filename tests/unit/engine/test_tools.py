"""Tool calls the simulated engine writes for a forced tool_choice."""

from __future__ import annotations

import json

from kvrouter.engine.tools import ToolCallStream, example_arguments, plan_tool_call

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "ratio": {"type": "number"},
        "exact": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "note": {"type": ["null", "string"]}},
        },
        "mode": {"anyOf": [{"const": "fast"}, {"type": "string"}]},
        "level": {"type": "integer", "default": 3},
        "optional": {"type": "string"},
    },
    "required": ["city", "unit", "days", "ratio", "exact", "tags", "where", "mode", "level"],
}


def test_arguments_fit_the_schema() -> None:
    args = json.loads(example_arguments(WEATHER, "req-1"))
    assert set(args) == set(WEATHER["required"])  # type: ignore[arg-type]
    assert isinstance(args["city"], str) and args["city"]
    assert args["unit"] == "celsius" and args["mode"] == "fast" and args["level"] == 3
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 7
    assert isinstance(args["ratio"], float) and isinstance(args["exact"], bool)
    assert len(args["tags"]) == 2 and all(isinstance(t, str) for t in args["tags"])
    # No required list: every property; a nullable type takes its other type.
    assert set(args["where"]) == {"lat", "note"} and isinstance(args["where"]["note"], str)
    assert example_arguments(WEATHER, "req-1") == example_arguments(WEATHER, "req-1")


def test_odd_schemas_still_give_an_object() -> None:
    assert example_arguments(None, "x") == "{}"
    assert example_arguments({"type": "string"}, "x") == "{}"  # not an object schema
    looped: dict[str, object] = {"type": "object", "properties": {}}
    looped["properties"] = {"next": looped}
    assert json.loads(example_arguments(looped, "x"))  # a recursive schema ends


def test_a_streamed_call_names_itself_first_and_adds_up_to_the_whole() -> None:
    call = plan_tool_call([{"name": "get_weather", "parameters": WEATHER}], "req-2")
    assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
    stream = ToolCallStream(call, total_tokens=4)
    deltas = [stream.delta(n, final=False) for n in (1, 2, 3)]
    deltas.append(stream.delta(4, final=True))
    assert deltas[0] is not None and deltas[0][0].id == call.id
    assert deltas[0][0].function.name == "get_weather"
    assert all(d is None or d[0].id is None for d in deltas[1:])  # named once
    pieces = [d[0].function.arguments or "" for d in deltas if d is not None]
    assert "".join(pieces) == call.function.arguments


def test_local_references_are_followed() -> None:
    schema = {
        "$defs": {
            "Loc": {
                "type": "object",
                "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                "required": ["lat", "lon"],
            },
            "Unit": {"enum": ["c", "f"], "type": "string"},
            "Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}},
        },
        "type": "object",
        "properties": {
            "loc": {"$ref": "#/$defs/Loc"},
            "unit": {"$ref": "#/$defs/Unit"},
            "chain": {"$ref": "#/$defs/Node"},  # recursive: cut off at a depth
            "lost": {"$ref": "#/$defs/Missing"},
        },
    }
    args = json.loads(example_arguments(schema, "r"))
    assert set(args["loc"]) == {"lat", "lon"} and args["unit"] == "c"
    assert args["lost"] is None
    depth, node = 0, args["chain"]
    while isinstance(node, dict) and "next" in node:
        depth, node = depth + 1, node["next"]
    assert depth < 10


def test_malformed_schemas_do_not_raise() -> None:
    odd: list[dict[str, object]] = [
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": [["a"], 3]},
        {"type": "object", "properties": {"a": {"type": "array", "minItems": "x", "items": {}}}},
        {"type": "object", "properties": {"a": {"type": 7}, "b": "not a schema"}},
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 2.5}}},
    ]
    for schema in odd:
        assert isinstance(json.loads(example_arguments(schema, "r")), dict)
    assert json.loads(example_arguments(odd[3], "r"))["a"] >= 3
