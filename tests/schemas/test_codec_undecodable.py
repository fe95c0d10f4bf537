"""Every way a value can fail to be an event ends in UndecodableError, with a clear message."""

from __future__ import annotations

import random

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
        with pytest.raises(UndecodableError, match="^truncated Avro body for "
                           "ai.companion.multimodal.VoiceRequested: the bytes end inside"):
            codec.decode_raw(avro_value[:cut], None)


def test_avro_header_only(codec: EventCodec, avro_value: bytes) -> None:
    with pytest.raises(UndecodableError, match="^truncated Avro body"):
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
    with pytest.raises(UndecodableError, match="^corrupt Avro body for "
                       "ai.companion.multimodal.VoiceRequested: the bytes are not a record"):
        codec.decode_raw(header + bytes(body), None)


def test_json_header_on_avro_bytes(codec: EventCodec, avro_value: bytes) -> None:
    with pytest.raises(UndecodableError):
        codec.decode_raw(avro_value, "application/json")


def test_decode_reports_undecodable_before_validation(codec: EventCodec) -> None:
    with pytest.raises(UndecodableError):
        codec.decode(b"\x00", None, ImageRequested)


# What a caller is told names the problem in its terms: no Python class, no parser's words.
_INTERNAL_WORDS = ("Error", "Exception", "codec can't", "index out of range", "recursion",
                   "NoneType", "list", "dict", "Expected", "sys.")


def _public(codec: EventCodec, value: bytes, content_type: str | None) -> UndecodableError:
    with pytest.raises(UndecodableError) as info:
        codec.decode_raw(value, content_type)
    message = info.value.public_message
    assert not [word for word in _INTERNAL_WORDS if word in message], message
    return info.value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b'{"a": 1', "invalid JSON at line 1, column 8: expecting ',' delimiter"),
        (b'{\n  "a": }', "invalid JSON at line 2, column 8: expecting value"),
        (b'{"a": NaN}', "invalid JSON: NaN is not a JSON value"),
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
         "invalid JSON: objects and arrays nested too deep"),
        (b'{"a": ' + b"9" * 5000 + b"}", "invalid JSON: a number has too many digits"),
        (b'{"text": "\xff\xfe"}', "JSON value is not UTF-8: invalid byte 0xff at byte 10"),
        (b"[1, 2]", "JSON value is an array, not an object"),
        (b"null", "JSON value is null, not an object"),
        (b"true", "JSON value is a boolean, not an object"),
        (b"1.5", "JSON value is a number, not an object"),
        (b'"text"', "JSON value is a string, not an object"),
    ],
)
def test_json_errors_say_what_is_wrong_in_json_terms(
    codec: EventCodec, value: bytes, message: str
) -> None:
    assert _public(codec, value, "application/json").public_message == message


def test_avro_errors_keep_the_decoders_words_for_the_log_only(
    codec: EventCodec, avro_value: bytes
) -> None:
    error = _public(codec, avro_value[:14], "avro/binary")
    assert error.public_message == ("truncated Avro body for "
                                    "ai.companion.multimodal.VoiceRequested: the bytes end "
                                    "inside the record")
    assert "EOFError" in str(error) and error.public_message in str(error)


def test_mutated_avro_bodies_are_told_in_the_callers_terms(
    codec: EventCodec, avro_value: bytes
) -> None:
    # fastavro fails mutated bytes with many exceptions (UnicodeDecodeError, IndexError,
    # ValueError, EOFError, ...); the caller hears one of a few sentences, whichever it was.
    rnd = random.Random(1)
    told: set[str] = set()
    for _ in range(2000):
        value = bytearray(avro_value)
        for _ in range(rnd.randint(1, 4)):
            value[rnd.randrange(10, len(value))] = rnd.randrange(256)
        try:
            codec.decode_raw(bytes(value), "avro/binary")
        except UndecodableError as exc:
            told.add(exc.public_message.split(":")[0])
            assert not [w for w in _INTERNAL_WORDS if w in exc.public_message], exc.message
    name = "ai.companion.multimodal.VoiceRequested"
    trailing = {m for m in told if m.endswith(f"bytes after the Avro body of {name}")}
    assert told - trailing <= {f"corrupt Avro body for {name}",
                               f"truncated Avro body for {name}"}, told
    assert f"corrupt Avro body for {name}" in told
