"""Every way a value can fail to be an event ends in UndecodableError, with a clear message."""

from __future__ import annotations

import pytest

from schemas import EventCodec, ImageRequested, UndecodableError, VoiceRequested
from schemas.errors import ErrorCode

VOICE = VoiceRequested(request_id="r", conversation_id="c", text="hi")


@pytest.fixture(scope="module")
def codec() -> EventCodec:
    return EventCodec()


@pytest.fixture(scope="module")
def avro_value(codec: EventCodec) -> bytes:
    return codec.encode(VOICE, "avro")


@pytest.mark.parametrize(
    ("value", "content_type", "message"),
    [
        (None, None, "empty"),
        (b"", "application/json", "empty"),
        (b"hello", None, "neither Avro"),
        (b"   ", None, "neither Avro"),
        (b"[1, 2]", None, "neither Avro"),
        (b"{}", "text/plain", "unsupported content-type"),
        (b"{}", b"\xff\xfe", "not UTF-8"),
        (b'{"a": 1', "application/json", "invalid JSON"),
        (b'{"a": NaN}', None, "invalid JSON"),
        (b'{"a": "\xff"}', None, "not UTF-8"),
        (b"[1, 2]", "application/json", "not an object"),
        (b'"text"', "application/json", "not an object"),
        (b"{" * 100_000, None, "invalid JSON"),
        (b"\xc3\x01\x00\x00", None, "single-object"),
        (b"{}", "avro/binary", "single-object"),
        (b"\xc3\x01" + bytes(8) + b"\x02r", None, "unknown Avro writer schema fingerprint"),
    ],
)
def test_undecodable(
    codec: EventCodec, value: bytes | None, content_type: str | bytes | None, message: str
) -> None:
    with pytest.raises(UndecodableError, match=message) as info:
        codec.decode_raw(value, content_type)
    assert info.value.code is ErrorCode.UNDECODABLE and not info.value.retryable


def test_truncated_avro_body(codec: EventCodec, avro_value: bytes) -> None:
    for cut in range(11, len(avro_value)):
        with pytest.raises(UndecodableError, match="corrupt or truncated Avro body"):
            codec.decode_raw(avro_value[:cut], None)


def test_avro_header_only(codec: EventCodec, avro_value: bytes) -> None:
    with pytest.raises(UndecodableError, match="corrupt or truncated"):
        codec.decode_raw(avro_value[:10], "avro/binary")


def test_trailing_bytes_after_avro_body(codec: EventCodec, avro_value: bytes) -> None:
    with pytest.raises(UndecodableError, match="2 bytes after the Avro body"):
        codec.decode_raw(avro_value + b"\x00\x00", None)


def test_corrupt_avro_body(codec: EventCodec, avro_value: bytes) -> None:
    # A union branch index of 9 does not exist in ["null", "string"].
    header, body = avro_value[:10], bytearray(avro_value[10:])
    # request_id "r" (2 bytes), conversation_id "c" (2), character_id null (1), text "hi" (3),
    # then voice_id's branch index, zigzag-encoded: 18 is 9.
    body[8] = 18
    with pytest.raises(UndecodableError, match="corrupt or truncated"):
        codec.decode_raw(header + bytes(body), None)


def test_json_header_on_avro_bytes(codec: EventCodec, avro_value: bytes) -> None:
    with pytest.raises(UndecodableError):
        codec.decode_raw(avro_value, "application/json")


def test_decode_reports_undecodable_before_validation(codec: EventCodec) -> None:
    with pytest.raises(UndecodableError):
        codec.decode(b"\x00", None, ImageRequested)
