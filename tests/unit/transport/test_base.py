from __future__ import annotations

import pytest

from kvrouter.transport import (
    END_SEQ,
    InProcTransport,
    Malformed,
    Message,
    make_event_transport,
    parse_frames,
)
from kvrouter.transport.base import decode_seq, encode_seq
from kvrouter.transport.zmq_transport import ZmqTransport


def test_seq_is_eight_bytes_big_endian() -> None:
    assert encode_seq(1) == b"\x00\x00\x00\x00\x00\x00\x00\x01"
    assert encode_seq(END_SEQ) == b"\xff" * 8
    assert decode_seq(encode_seq(2**40 + 7)) == 2**40 + 7


def test_message_frames_round_trip() -> None:
    message = Message(b"kv", 5, b"payload")
    assert message.frames() == [b"kv", encode_seq(5), b"payload"]
    assert parse_frames(message.frames()) == message


@pytest.mark.parametrize(
    ("frames", "kind"),
    [
        ([b"kv", encode_seq(1)], "frame_count"),
        ([b"kv", encode_seq(1), b"p", b"extra"], "frame_count"),
        ([b"kv", b"\x01\x02", b"p"], "seq"),
        ([b"kv", encode_seq(END_SEQ), b""], "seq"),
    ],
)
def test_parse_frames_names_what_is_wrong(frames: list[bytes], kind: str) -> None:
    result = parse_frames(frames)
    assert isinstance(result, Malformed)
    assert result.kind == kind


def test_factory_builds_each_kind() -> None:
    assert isinstance(make_event_transport("inproc", address="w"), InProcTransport)
    transport = make_event_transport("zmq", endpoint="tcp://127.0.0.1:*")
    assert isinstance(transport, ZmqTransport)
    assert transport.kind == "zmq"


def test_factory_rejects_unknown_kind_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown event transport kind 'nats2'.*inproc, zmq"):
        make_event_transport("nats2")


def test_zmq_rejects_unknown_reply_form() -> None:
    with pytest.raises(ValueError, match="replay_reply_form 'xml'"):
        ZmqTransport(replay_reply_form="xml")
