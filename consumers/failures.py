"""The ``generation.failed`` event for a record: its error, attempts and source."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiokafka import ConsumerRecord

from consumers.records import text_or_none
from schemas.errors import EngineError
from schemas.events import EventKind, GenerationFailed

__all__ = ["failed_event"]


def failed_event(record: ConsumerRecord[bytes, bytes], kind: EventKind, error: EngineError,
                 attempts: int, raw: Mapping[str, Any]) -> GenerationFailed:
    """The failed event answering ``record``. Identity comes from what could be decoded
    (``raw``); without a conversation id, the record's key stands for it, except on the
    LoRA topic, whose key is the character (CONTRACT), not a conversation."""
    conversation = text_or_none(raw.get("conversation_id"))
    if conversation is None and record.key is not None and kind != "lora":
        conversation = text_or_none(record.key.decode("utf-8", "replace"))
    return GenerationFailed(
        request_id=text_or_none(raw.get("request_id")),
        conversation_id=conversation,
        kind=kind,
        error_code=str(error.code),
        message=error.public_message,
        retryable=error.retryable,
        attempts=attempts,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
    )

