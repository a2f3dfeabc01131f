"""Body parsing, the "kvrouter" field, tokenizing and hashing of the routed prompt."""

from __future__ import annotations

import json

import pytest

from kvrouter.errors import InvalidRequest, RequestTooLarge
from kvrouter.gateway.prompts import (
    INLINE_MAX_BODY_BYTES,
    byte_token_ids,
    can_prepare_inline,
    parse_body,
    prepare_prompt,
)
from kvrouter.hashing import hash_request, make_salt
from kvrouter.tokenizer import ByteTokenizer


def test_body_without_kvrouter_field_is_forwarded_byte_for_byte() -> None:
    body = b'{"model": "m",   "prompt": "hello", "stream": true}'
    parsed = parse_body(body, "completion")
    assert parsed.forward_body is body
    assert parsed.kvrouter_field is None
    assert parsed.stream is True


def test_kvrouter_field_is_stripped_before_forwarding() -> None:
    body = json.dumps({"prompt": "hi", "kvrouter": {"overlap_weight": 2}}).encode()
    parsed = parse_body(body, "completion")
    assert parsed.kvrouter_field == {"overlap_weight": 2}
    assert json.loads(parsed.forward_body) == {"prompt": "hi"}


def test_the_word_kvrouter_inside_a_prompt_is_not_a_field() -> None:
    body = json.dumps({"prompt": 'say "kvrouter"'}).encode()
    parsed = parse_body(body, "completion")
    assert parsed.forward_body is body
    assert parsed.kvrouter_field is None


@pytest.mark.parametrize(
    ("body", "kind", "message"),
    [
        (b"", "completion", "empty"),
        (b"{nope", "completion", "not valid JSON"),
        (b'{"prompt": "\xff"}', "completion", "not valid UTF-8"),
        (b'{"prompt": "x", "y": ' + b"[" * 5000 + b"]" * 5000 + b"}", "chat", "nested too deeply"),
        (b"[1, 2]", "completion", "must be a JSON object"),
        (b'{"prompt": "x", "temperature": 1e999}', "completion", "Number out of range"),
        (b'{"model": "m"}', "completion", "'prompt' is required"),
        (b'{"prompt": 5}', "completion", "'prompt' must be"),
        (b'{"prompt": []}', "completion", "must not be empty"),
        (b'{"prompt": "x", "stream": "yes"}', "completion", "'stream' must be a boolean"),
        (b'{"prompt": "x", "stream_options": 1}', "completion", "stream_options"),
        (b'{"messages": []}', "chat", "non-empty list"),
        (b'{"messages": [{"content": "x"}]}', "chat", "string 'role'"),
    ],
)
def test_bad_bodies_are_invalid_requests(body: bytes, kind: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_body(body, kind)  # type: ignore[arg-type]


def test_a_model_that_is_an_adapter_salts_the_hashes() -> None:
    tok = ByteTokenizer()
    adapters = frozenset({"sql-lora"})
    args = {"block_size": 4, "max_prompt_tokens": 100, "lora_models": adapters}
    lora = prepare_prompt(tok, {"model": "sql-lora", "prompt": "abcdefgh"}, "completion", **args)
    base = prepare_prompt(tok, {"model": "base", "prompt": "abcdefgh"}, "completion", **args)
    named = prepare_prompt(
        tok, {"model": "base", "lora_name": "sql-lora", "prompt": "abcdefgh"}, "completion", **args
    )
    assert lora.salt == named.salt == make_salt(lora_name="sql-lora")
    assert base.salt is None
    assert lora.sequence_hashes == named.sequence_hashes != base.sequence_hashes


def test_chat_tools_and_template_kwargs_are_rendered_before_hashing() -> None:
    template = (
        "{% if tools %}{{ tools | length }} tools;{% endif %}"
        "{% if enable_thinking is false %}nothink;{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    tok = ByteTokenizer(template)
    base = {"messages": [{"role": "user", "content": "hello"}]}
    extra = {"tools": [{"type": "function"}], "chat_template_kwargs": {"enable_thinking": False}}
    plain = prepare_prompt(tok, base, "chat", block_size=4, max_prompt_tokens=100)
    with_tools = prepare_prompt(tok, {**base, **extra}, "chat", block_size=4, max_prompt_tokens=100)
    assert list(with_tools.token_ids) == tok.encode("1 tools;nothink;hello")
    assert list(plain.token_ids) == tok.encode("hello")
    # A template variable cannot stand in for the messages.
    sneaky = {**base, "chat_template_kwargs": {"messages": [{"content": "other"}]}}
    assert list(
        prepare_prompt(tok, sneaky, "chat", block_size=4, max_prompt_tokens=100).token_ids
    ) == (tok.encode("hello"))
    with pytest.raises(InvalidRequest, match="'tools' must be a list"):
        prepare_prompt(tok, {**base, "tools": {}}, "chat", block_size=4, max_prompt_tokens=100)


def test_text_prompt_is_tokenized_and_hashed_once() -> None:
    tok = ByteTokenizer()
    payload = {"prompt": "abcdefgh"}
    prepared = prepare_prompt(tok, payload, "completion", block_size=4, max_prompt_tokens=100)
    assert list(prepared.token_ids) == tok.encode("abcdefgh")
    assert prepared.num_tokens == 8
    assert (prepared.local_hashes, prepared.sequence_hashes) == hash_request(prepared.token_ids, 4)
    assert prepared.salt is None


def test_token_id_prompts_and_batches() -> None:
    tok = ByteTokenizer()
    ids = prepare_prompt(
        tok, {"prompt": [5, 6, 7]}, "completion", block_size=2, max_prompt_tokens=9
    )
    assert ids.token_ids == [5, 6, 7]
    batch = prepare_prompt(
        tok, {"prompt": [[9, 9], [1]]}, "completion", block_size=2, max_prompt_tokens=9
    )
    assert batch.token_ids == [9, 9]
    texts = prepare_prompt(
        tok, {"prompt": ["ab", "cd"]}, "completion", block_size=2, max_prompt_tokens=9
    )
    assert list(texts.token_ids) == tok.encode("ab")


def test_chat_goes_through_the_template() -> None:
    tok = ByteTokenizer()
    messages = [{"role": "user", "content": "hi"}]
    prepared = prepare_prompt(
        tok, {"messages": messages}, "chat", block_size=4, max_prompt_tokens=1000
    )
    expected = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert list(prepared.token_ids) == expected
    assert list(prepared.token_ids) != tok.encode("hi")


def _image(url: str) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url}}


def _chat_hashes(content: object) -> list[int]:
    system = {"role": "system", "content": "You look at pictures. " * 8}
    messages = [system, {"role": "user", "content": content}]
    return prepare_prompt(
        ByteTokenizer(), {"messages": messages}, "chat", block_size=16, max_prompt_tokens=10**5
    ).sequence_hashes


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_an_image_is_routed_on_the_text_before_it_and_matches_only_itself() -> None:
    question = {"type": "text", "text": "What is in this picture? Answer in one line. " * 4}
    cat = _chat_hashes([_image("https://example.com/cat.png"), question])
    cat_again = _chat_hashes([_image("https://example.com/cat.png"), question])
    dog = _chat_hashes([_image("https://example.com/dog.png"), question])
    text_only = _chat_hashes([question])
    assert cat == cat_again  # the same image: every block matches
    before = _common_prefix(cat, text_only)  # the blocks before the image
    # Two images' markers share their "<|" opening at most: a block more, sometimes.
    assert before <= _common_prefix(cat, dog) <= before + 1
    assert 0 < before < len(cat) - 8  # the system prompt matches, nothing past the image


def test_any_non_text_part_is_marked_not_refused() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    hashes = _chat_hashes([{"type": "text", "text": "listen"}, audio])
    assert hashes != _chat_hashes([{"type": "text", "text": "listen"}])


def test_cache_salt_changes_the_hashes() -> None:
    tok = ByteTokenizer()
    plain = prepare_prompt(tok, {"prompt": "abcd"}, "completion", block_size=4, max_prompt_tokens=9)
    salted = prepare_prompt(
        tok,
        {"prompt": "abcd", "cache_salt": "tenant-a"},
        "completion",
        block_size=4,
        max_prompt_tokens=9,
    )
    assert salted.salt is None and salted.cache_salt == "tenant-a"
    # The first block's hash changes, and through the chain every sequence hash.
    assert salted.local_hashes[0] != plain.local_hashes[0]
    assert all(a != b for a, b in zip(salted.sequence_hashes, plain.sequence_hashes, strict=True))
    with_lora = prepare_prompt(
        tok,
        {"prompt": "abcd", "lora_name": "sql"},
        "completion",
        block_size=4,
        max_prompt_tokens=9,
    )
    assert with_lora.salt == make_salt(lora_name="sql") and with_lora.cache_salt is None


def test_prompt_token_limit() -> None:
    tok = ByteTokenizer()
    with pytest.raises(RequestTooLarge, match="5 tokens, over the limit of 4"):
        prepare_prompt(tok, {"prompt": "abcde"}, "completion", block_size=4, max_prompt_tokens=4)
    with pytest.raises(RequestTooLarge, match="over the limit"):
        prepare_prompt(tok, {"prompt": [1] * 10}, "completion", block_size=4, max_prompt_tokens=4)


def test_short_prompt_has_no_blocks() -> None:
    prepared = prepare_prompt(
        ByteTokenizer(), {"prompt": "ab"}, "completion", block_size=4, max_prompt_tokens=9
    )
    assert prepared.local_hashes == []
    assert len(prepared.token_ids) == 2


def test_without_a_local_tokenizer_text_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="no local tokenizer"):
        prepare_prompt(None, {"prompt": "ab"}, "completion", block_size=4, max_prompt_tokens=9)


@pytest.mark.parametrize("text", ["", "abc", "héllo wörld ✓", "\x00\xff" * 40])
def test_byte_fast_path_equals_the_byte_tokenizer(text: str) -> None:
    ids = byte_token_ids(text)
    assert ids.dtype.name == "uint32"
    assert ids.tolist() == ByteTokenizer().encode(text)
    assert hash_request(ids, 4) == hash_request(ByteTokenizer().encode(text), 4)


class _OtherTokenizer(ByteTokenizer):
    """Stands for a real tokenizer: anything but the built-in byte one itself."""


def test_inline_preparation_only_for_small_cheap_prompts() -> None:
    small = parse_body(json.dumps({"prompt": "abcd"}).encode(), "completion")
    big = parse_body(json.dumps({"prompt": "a" * INLINE_MAX_BODY_BYTES}).encode(), "completion")
    ids = parse_body(json.dumps({"prompt": [1, 2, 3]}).encode(), "completion")
    chat = parse_body(json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "chat")
    byte = ByteTokenizer()
    assert can_prepare_inline(byte, small, "completion")
    assert can_prepare_inline(byte, chat, "chat")
    assert not can_prepare_inline(byte, big, "completion")
    assert can_prepare_inline(None, ids, "completion")
    assert not can_prepare_inline(None, small, "completion")
    assert not can_prepare_inline(None, chat, "chat")


def test_n_is_carried_to_the_routing_request() -> None:
    tok = ByteTokenizer()
    for payload, n in (
        ({"prompt": "hi", "n": 3}, 3),
        ({"prompt": "hi"}, 1),
        ({"prompt": "hi", "n": "3"}, 1),
    ):
        prepared = prepare_prompt(tok, payload, "completion", block_size=4, max_prompt_tokens=99)
        assert prepared.num_sequences == n
