"""``multimodal-engine send``: publish one request and wait for its answer.

The reply topics are read from their current end *before* the request is published, so
the answer cannot slip past; the request's ``request_id`` picks it out. Answers in the
Schema Registry's wire format are read with the codec's registry (its writer schemas
fetched by id), as the engine reads them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumers.kafka import stop_within
from consumers.security import PLAINTEXT, KafkaSecurity
from schemas.codec import EventCodec
from schemas.errors import EngineError
from schemas.events import Event
from schemas.registry import SchemaRegistryError, SchemaRegistryUnavailable

__all__ = ["Reply", "send_and_wait"]

_STOP_SECONDS = 5.0


@dataclass(frozen=True)
class Reply:
    topic: str
    event: dict[str, object]
    completed: bool


async def send_and_wait(
    bootstrap_servers: str,
    request_topic: str,
    event: Event,
    key: str,
    *,
    completed_topic: str,
    failed_topic: str,
    encoding: Literal["avro", "json"] = "json",
    timeout: float = 60.0,
    codec: EventCodec | None = None,
    security: KafkaSecurity = PLAINTEXT,
) -> Reply | None:
    """Publishes ``event`` and returns its completed/failed reply, or None on timeout.

    ``codec`` reads the replies: with a registry (``EventCodec(framing=...)``) it reads the
    Schema Registry's wire format too. Raises
    :class:`~schemas.registry.SchemaRegistryUnavailable` when that registry stays out of
    reach until ``timeout``: the replies cannot be read meanwhile, and aiokafka's
    :class:`~aiokafka.errors.KafkaError` when the broker cannot be reached at the start or
    the request cannot be published. A broker gone while the answer is awaited is a
    timeout (it may come back)."""
    codec = codec or EventCodec()
    request_id: str = getattr(event, "request_id")  # noqa: B009  (every request has one)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
        fetch_max_wait_ms=10, **security.options(),
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all",
                                **security.options())
    try:
        await consumer.start()
        await producer.start()
        await consumer.topics()
        partitions = [
            TopicPartition(topic, p)
            for topic in (completed_topic, failed_topic)
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)  # pin the end now, before publishing
        await producer.send_and_wait(
            request_topic,
            value=codec.encode(event, encoding),
            key=key.encode(),
            headers=[
                ("content-type", codec.content_type(encoding).encode()),
                ("request_id", request_id.encode()),
            ],
        )
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            batches = await consumer.getmany(timeout_ms=int(min(remaining, 0.5) * 1000))
            for tp, records in batches.items():
                for record in records:
                    headers = dict(record.headers or ())
                    content_type = headers.get("content-type")
                    try:
                        await _writer_schema(codec, record.value, deadline)
                        _, raw = codec.decode_raw(
                            record.value, content_type.decode() if content_type else None
                        )
                    except SchemaRegistryUnavailable:
                        raise  # waited out until the deadline: said by the caller
                    except (EngineError, SchemaRegistryError):
                        continue  # not a record this command can read: not the answer
                    if raw.get("request_id") == request_id:
                        return Reply(tp.topic, raw, completed=tp.topic == completed_topic)
        return None
    finally:
        # bounded: with the broker gone they may not stop cleanly, and the command has its
        # answer (or its timeout) already
        await stop_within(producer, _STOP_SECONDS)
        await stop_within(consumer, _STOP_SECONDS)


async def _writer_schema(codec: EventCodec, value: bytes | None, deadline: float) -> None:
    """Fetches a Confluent-framed ``value``'s writer schema, waiting out a registry outage
    (capped backoff) until ``deadline``; raises what ``resolve_writer`` raises then."""
    async def pause(tries: int, exc: Exception) -> None:
        wait = min(0.1 * 2 ** min(tries, 5), 2.0)
        if time.monotonic() + wait >= deadline:
            raise exc
        await asyncio.sleep(wait)

    await codec.resolve_writer_waiting(value, pause)
