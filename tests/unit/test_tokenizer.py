"""Tokenizers: the built-in byte tokenizer, tokenizer.json files, sandboxed chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HfRawTokenizer
from tokenizers import decoders, models, pre_tokenizers

from kvrouter.errors import ConfigError, InvalidRequest
from kvrouter.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    ByteTokenizer,
    ChatTemplate,
    HfTokenizer,
    IncrementalDecoder,
    Tokenizer,
    load_tokenizer,
    media_marker,
    normalize_messages,
)

VOCAB = {
    "[UNK]": 0,
    "<s>": 1,
    "</s>": 2,
    "hello": 3,
    "world": 4,
    "user": 5,
    "assistant": 6,
    ":": 7,
}
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def write_tokenizer(directory: Path, config: dict[str, object] | None = None) -> Path:
    """A word-level tokenizer.json (and optionally tokenizer_config.json) in ``directory``."""
    raw = HfRawTokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(["<s>", "</s>"])
    path = directory / "tokenizer.json"
    raw.save(str(path))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return path


# --- byte tokenizer -----------------------------------------------------------------


def test_byte_tokenizer_ids_are_utf8_bytes_plus_three() -> None:
    tok = ByteTokenizer()
    assert tok.encode("Ab") == [65 + 3, 98 + 3]
    assert tok.encode("é") == [0xC3 + 3, 0xA9 + 3]
    assert tok.encode("") == []
    assert tok.name == "byte"
    assert tok.eos_token_id == 2


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_byte_tokenizer_round_trips_any_text(text: str) -> None:
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_byte_decode_skips_special_tokens_and_maps_large_ids_to_ascii() -> None:
    tok = ByteTokenizer()
    assert tok.decode([1, 104 + 3, 2, 105 + 3, 0]) == "hi"
    # 259 is past the vocabulary: 32 + 259 % 95 = 101 -> "e".
    assert tok.decode([259, 259 + 95]) == "ee"
    assert all(32 <= ord(c) <= 126 for c in tok.decode(range(259, 600)))


def test_byte_tokenizer_satisfies_protocol() -> None:
    assert isinstance(ByteTokenizer(), Tokenizer)


# --- chat templates ------------------------------------------------------------------


def test_default_template_is_chatml() -> None:
    text = ByteTokenizer().apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_without_generation_prompt() -> None:
    text = ChatTemplate().render([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


def test_content_parts_are_joined_and_none_is_empty() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ]
    assert normalize_messages(messages) == [
        {"role": "user", "content": "a\nb"},  # one newline between parts, as vLLM joins them
        {"role": "assistant", "content": ""},
    ]


def test_non_text_parts_become_markers_when_asked() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    other = {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}}
    content = [{"type": "text", "text": "see "}, image, {"type": "text", "text": " here"}]
    [marked] = normalize_messages([{"role": "user", "content": content}], media="mark")
    assert marked["content"] == "see \n" + media_marker(image) + "\n here"
    assert media_marker(image).endswith(":image_url|>")
    assert media_marker(image) != media_marker(other)
    with pytest.raises(InvalidRequest, match="non-text part"):
        normalize_messages([{"role": "user", "content": content}])  # refused by default


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"content": "x"}], "no 'role'"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "non-text part"),
        ([{"role": "user", "content": 5}], "string or a list"),
    ],
)
def test_bad_messages_are_invalid_requests(messages: list[dict[str, object]], needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle):
        ChatTemplate().render(messages)


def test_sandbox_blocks_python_internals() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequest, match="chat template failed"):
        template.render([{"role": "user", "content": "x"}])


def test_sandbox_is_immutable() -> None:
    template = ChatTemplate("{{ messages.append(1) }}")
    with pytest.raises(InvalidRequest, match="chat template failed"):
        template.render([{"role": "user", "content": "x"}])


def test_raise_exception_in_template_is_an_invalid_request() -> None:
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        template.render([{"role": "user", "content": "x"}])


def test_template_that_does_not_compile_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for %}")


# --- tokenizer.json ------------------------------------------------------------------


def test_hf_tokenizer_encodes_decodes_and_reads_config(tmp_path: Path) -> None:
    path = write_tokenizer(
        tmp_path, {"eos_token": {"content": "</s>"}, "bos_token": "<s>", "chat_template": TEMPLATE}
    )
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HfTokenizer)
    assert tok.name == str(path)
    assert tok.eos_token_id == 2
    assert tok.encode("hello world nope") == [3, 4, 0]
    assert tok.decode([1, 3, 4, 2]) == "hello world"
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text == "<s>user : hello assistant :"
    assert tok.encode(text, add_special_tokens=False) == [1, 5, 7, 3, 6, 7]


def test_hf_tokenizer_from_directory_without_config_uses_default_template(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_id is None
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == (
        ChatTemplate(DEFAULT_CHAT_TEMPLATE).render([{"role": "user", "content": "x"}])
    )


def test_named_templates_pick_default(tmp_path: Path) -> None:
    config = {
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT"},
        ]
    }
    tok = load_tokenizer(write_tokenizer(tmp_path, config))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "DEFAULT"


def test_chat_template_file_overrides_config(tmp_path: Path) -> None:
    path = write_tokenizer(tmp_path, {"chat_template": "FROM CONFIG"})
    template_file = tmp_path / "custom.jinja"
    template_file.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tok = load_tokenizer(path, chat_template=str(template_file))
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "[q]"
    byte_tok = load_tokenizer("byte", chat_template=str(template_file))
    assert byte_tok.apply_chat_template([{"role": "user", "content": "q"}]) == "[q]"


def test_load_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        load_tokenizer(tmp_path / "missing.json")
    assert str(missing.value) == (
        f"tokenizer '{tmp_path / 'missing.json'}' does not exist; give 'byte' or the path "
        "of a tokenizer.json (or of a folder holding one)"
    )
    bad = tmp_path / "tokenizer.json"
    bad.write_text("not json")
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        load_tokenizer(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(None, chat_template=str(tmp_path / "nope.jinja"))


# --- incremental decoding --------------------------------------------------------------


def feed_one_by_one(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tok)
    return [decoder.feed([i]) for i in ids] + [decoder.feed([], final=True)]


def test_incremental_decoding_keeps_what_single_tokens_lose(tmp_path: Path) -> None:
    # SentencePiece style: a word's leading space, and byte tokens for "é".
    vocab = {"[UNK]": 0, "\u2581the": 1, "\u2581cat": 2, "s": 3, "<0xC3>": 4, "<0xA9>": 5}
    raw = HfRawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HfTokenizer(tmp_path)
    ids = [1, 2, 3, 4, 5, 1]
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)
    pieces = feed_one_by_one(tok, ids)
    assert pieces == ["the", " cat", "s", "", "\u00e9", " the", ""]
    assert "".join(pieces) == tok.decode(ids) == "the cats\u00e9 the"


@settings(max_examples=60, deadline=None)
@given(
    # Text that UTF-8 can carry: no lone surrogates (a JSON body cannot hold one either).
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"), max_size=20),
    st.integers(min_value=1, max_value=4),
)
def test_incremental_byte_decoding_joins_to_the_whole_text(text: str, step: int) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.feed(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(decoder.feed([], final=True))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_incremental_decoding_hands_out_an_unfinished_character_at_the_end() -> None:
    assert feed_one_by_one(ByteTokenizer(), [0xC3 + 3]) == ["", "\ufffd"]


def test_assistant_turns_reach_templates_as_vllm_hands_them_over() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning": "why"},
        {"role": "assistant", "content": "plain", "tool_calls": []},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "g"}}]},
        {"role": "assistant", "tool_calls": [{"function": {"name": "h", "arguments": "{oops"}}]},
    ]
    out = normalize_messages(messages)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert out[0]["reasoning"] == out[0]["reasoning_content"] == "why"
    assert "tool_calls" not in out[1]  # an empty list keeps the plain assistant path
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {}
    assert out[3]["tool_calls"][0]["function"]["arguments"] == "{oops"  # left as sent
    assert call["function"]["arguments"] == '{"a": 1}'  # the request is not changed
