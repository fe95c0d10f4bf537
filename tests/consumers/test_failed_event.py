"""The failed event of a rejected record: who it answers, from what could be decoded, and
never a value that could not be published (not UTF-8, or huge)."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import ConsumerRecord

from consumers.failures import failed_event
from schemas import EventCodec
from schemas.errors import InternalError, InvalidRequestError
from schemas.events import EventKind


def record(key: bytes | None, topic: str = "generation.requested.voice"
           ) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=topic, partition=2, offset=7, timestamp=0, timestamp_type=0,
                          key=key, value=b"{}", checksum=None, serialized_key_size=0,
                          serialized_value_size=2, headers=[])


def failed(kind: EventKind, key: bytes | None, raw: dict[str, Any]) -> dict[str, Any]:
    event = failed_event(record(key), kind, InvalidRequestError("bad"), 1, raw)
    codec = EventCodec()
    for encoding in ("json", "avro"):  # it must publish, in either encoding
        codec.encode(event, encoding)
    return event.model_dump()


def test_the_key_stands_for_a_missing_conversation_but_not_on_the_lora_topic() -> None:
    assert failed("voice", b"c-1", {"request_id": "r"})["conversation_id"] == "c-1"
    # the LoRA topic is keyed by character_id (CONTRACT): no conversation is named
    assert failed("lora", b"sarah", {"request_id": "r"})["conversation_id"] is None
    assert failed("lora", b"sarah", {"conversation_id": "c-2"})["conversation_id"] == "c-2"


@pytest.mark.parametrize("bad", ["\ud800", "r\udfffx", "r" * 1025, "", 42, None])
def test_identities_that_cannot_be_echoed_are_left_out(bad: object) -> None:
    event = failed("voice", b"k" * 2000, {"request_id": bad, "conversation_id": bad})
    assert event["request_id"] is None
    assert event["conversation_id"] is None  # the 2,000-byte key is no stand-in either


def test_an_internal_error_tells_the_caller_only_that_it_failed() -> None:
    error = InternalError("image generation failed: TypeError: /srv/engine/core/x.py broke")
    event = failed_event(record(b"c"), "image", error, 1, {"request_id": "r"})
    assert event.error_code == "INTERNAL"
    assert "TypeError" not in event.message and "/srv" not in event.message
    assert error.message.startswith("image generation failed")  # kept for the log
