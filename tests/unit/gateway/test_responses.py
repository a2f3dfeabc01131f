from __future__ import annotations

import pytest

from kvrouter.errors import InvalidRequest
from kvrouter.gateway.prompts import parse_body, prepare_prompt
from kvrouter.gateway.responses import ResponseHomes, response_messages
from kvrouter.tokenizer import ByteTokenizer


def test_input_items_become_the_chat_they_stand_for() -> None:
    payload = {
        "instructions": "Be brief.",
        "input": [
            {"role": "developer", "content": "Answer in French."},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Look:"},
                {"type": "input_image", "image_url": "https://example.com/cat.png"},
            ]},
            {"type": "reasoning", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Il fait beau."}]},
        ],
    }  # fmt: skip
    assert response_messages(payload) == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in French."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ],
        },
        {"role": "assistant", "content": "weather({})"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "text", "text": "Il fait beau."}]},
    ]


def test_a_responses_request_is_routed_by_the_same_tokens_as_its_chat() -> None:
    tokenizer = ByteTokenizer()
    response = parse_body(b'{"instructions": "Be brief.", "input": "Hi there"}', "response")
    chat = parse_body(
        b'{"messages": [{"role": "system", "content": "Be brief."},'
        b' {"role": "user", "content": "Hi there"}]}',
        "chat",
    )
    assert response.forward_body == b'{"instructions": "Be brief.", "input": "Hi there"}'
    prepared = [
        prepare_prompt(tokenizer, p.payload, "chat", block_size=4, max_prompt_tokens=10**6)
        for p in (response, chat)
    ]
    assert prepared[0].sequence_hashes == prepared[1].sequence_hashes
    assert len(prepared[0].sequence_hashes) > 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"input": 3}', "'input' is required"),
        (b'{"input": "x", "previous_response_id": 7}', "'previous_response_id' must be"),
        (b'{"input": [{"role": "user", "content": 5}]}', "content must be a string or a list"),
        (b'{"input": [{"role": "user", "content": ["x"]}]}', "a part that is not an object"),
        (b'{"input": "x", "store": "no"}', "'store' must be a boolean"),
        (b'{"input": "x", "max_output_tokens": 0}', "'max_output_tokens' must be a positive"),
    ],
)
def test_bad_input_is_refused_with_a_message(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_body(body, "response")


def test_homes_keep_the_latest_responses_and_refresh_those_in_use() -> None:
    homes = ResponseHomes(capacity=2)
    homes.note("a", 0)
    homes.note("b", 1)
    assert homes.home("a") == 0  # in use: now the latest
    homes.note("c", 2)
    assert (homes.home("a"), homes.home("b"), homes.home("c")) == (0, None, 2)
    assert len(homes) == 2
    assert not homes.note_body(b"not json", 3)
    assert not homes.note_body(b'{"object": "response"}', 3)
    with pytest.raises(ValueError, match="capacity"):
        ResponseHomes(capacity=0)


def test_the_sniffer_finds_an_id_split_over_chunks_and_gives_up_after_the_limit() -> None:
    homes = ResponseHomes()
    sniffer = homes.sniffer(worker_id=4)
    event = b'event: response.created\ndata: {"response": {"id": "resp_42", "x": {"id": "no"}}}'
    for i in range(0, len(event), 5):
        sniffer.feed(event[i : i + 5])
    assert sniffer.done
    assert homes.home("resp_42") == 4
    assert homes.home("no") is None
    idle = homes.sniffer(worker_id=5)
    for _ in range(20):
        idle.feed(b"x" * 4096)
    assert idle.done  # 64 KiB without an id: it stops looking
    idle.feed(b'"id": "late"')
    assert homes.home("late") is None
