"""Publishing result events: encoded, with headers, acknowledged before returning.

A result must reach the broker before its input offset may be committed, so publishing
retries transport errors with capped backoff until acknowledged (or cancelled by shutdown,
in which case the input stays uncommitted and is redelivered).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Literal

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from core.telemetry.trace import TraceContext
from schemas.codec import EventCodec
from schemas.events import Event

__all__ = ["EventPublisher"]

logger = logging.getLogger(__name__)


class EventPublisher:
    """Encodes events with the configured encoding and sends them with acks=all."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        codec: EventCodec,
        encoding: Literal["avro", "json"],
        *,
        max_backoff: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._producer = producer
        self._codec = codec
        self._encoding = encoding
        self._content_type = codec.content_type(encoding).encode()
        self._max_backoff = max_backoff
        self._sleep = sleep

    async def publish(
        self, topic: str, event: Event, key: bytes | None, request_id: str | None, *,
        trace: TraceContext | None = None,
    ) -> None:
        """Sends ``event`` to ``topic`` and returns once the broker acknowledged it; with
        ``trace``, the record carries its ``traceparent`` (and ``tracestate``) headers.

        Transient broker errors are retried until acknowledged (or cancelled); a
        permanent one (``retriable`` false: too large, not authorized, unknown topic) is
        raised at once."""
        value = self._codec.encode(event, self._encoding, topic)
        headers = [
            ("content-type", self._content_type),
            ("request_id", (request_id or "").encode()),
        ]
        if trace is not None:
            headers.extend((name, text.encode("ascii")) for name, text in trace.headers())
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._producer.send_and_wait(topic, value=value, key=key, headers=headers)
                return
            except KafkaError as exc:
                if not (exc.retriable or isinstance(exc, KafkaTimeoutError)):
                    raise  # too large, not authorized, no such topic: retrying cannot help
                wait = random.uniform(0, min(self._max_backoff, 0.1 * 2**attempt))
                logger.warning(
                    "publish to %s failed (attempt %d, %s: %s); retrying in %.2fs",
                    topic, attempt, type(exc).__name__, exc, wait,
                )
                await self._sleep(wait)
