"""A test-side Kafka peer: publishes requests like the Persona Engine and collects the
engine's answers from the result topics, waiting with timeouts (never sleeping); and the
background topic reader it is built on, for tests that read records their own way."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from schemas.codec import EventCodec
from schemas.events import (
    GenerationControl,
    ImageRequested,
    LoraTrainingRequested,
    VoiceRequested,
)
from tests.support.asyncapi_check import EventChecker
from tests.support.kafka_security import client_options

__all__ = ["Answer", "PersonaPeer", "TopicPeer", "TopicReader"]

_MODELS: dict[str, Any] = {
    "image": ImageRequested, "voice": VoiceRequested, "lora": LoraTrainingRequested,
    "control": GenerationControl,
}


@dataclass(frozen=True)
class Answer:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: dict[str, bytes]
    event: dict[str, Any]
    received_at: float = field(default=0.0)

    @property
    def kind(self) -> str:
        """completed, failed, progress, or control (a cancel someone published)."""
        return self.topic.rsplit(".", 1)[-1]


class TopicReader:
    """Reads ``topics`` from their earliest offsets, in no consumer group, in a background
    task from ``async with`` to its end, handing each record to :meth:`_take`."""

    def __init__(self, bootstrap: str, *topics: str) -> None:
        self._consumer = AIOKafkaConsumer(
            *topics, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
            enable_auto_commit=False, fetch_max_wait_ms=10, **client_options(bootstrap),
        )
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._consumer.start()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._reader is not None
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._consumer.stop()

    async def _read(self) -> None:
        async for record in self._consumer:
            await self._take(record)

    async def _take(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """What becomes of each record read: the subclass says."""
        raise NotImplementedError


class TopicPeer(TopicReader):
    """A :class:`TopicReader` with a producer (``acks=all``) beside it, started before the
    reading and stopped after it."""

    def __init__(self, bootstrap: str, *topics: str) -> None:
        super().__init__(bootstrap, *topics)
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                          **client_options(bootstrap))

    async def __aenter__(self) -> Self:
        await self._producer.start()
        return await super().__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        await self._producer.stop()


class PersonaPeer(TopicPeer):
    """Publishes to ``{prefix}generation.requested.*`` and reads every answer topic."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        super().__init__(bootstrap, f"{prefix}generation.completed", f"{prefix}generation.failed",
                         f"{prefix}generation.progress", f"{prefix}generation.control")
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.codec = EventCodec()
        self.answers: list[Answer] = []
        # every record read is checked against docs/asyncapi.yaml; what does not fit is
        # listed here and fails the test when the peer closes
        self.checker = EventChecker(prefix)
        self.violations: list[str] = []
        self._arrived = asyncio.Condition()

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        if self.violations and exc[0] is None:
            raise AssertionError("records that do not fit docs/asyncapi.yaml:\n"
                                 + "\n".join(self.violations[:5]))

    async def _take(self, record: ConsumerRecord[bytes, bytes]) -> None:
        headers = {k: v for k, v in record.headers or ()}
        try:
            self.checker.check(record.topic, record.key, headers, record.value)
        except AssertionError as exc:
            self.violations.append(str(exc))
        ctype = headers.get("content-type")
        _, raw = self.codec.decode_raw(record.value, ctype.decode() if ctype else None)
        answer = Answer(record.topic, record.partition, record.offset, record.key,
                        headers, raw, time.perf_counter())
        async with self._arrived:
            self.answers.append(answer)
            self._arrived.notify_all()

    async def publish(
        self,
        kind: str,
        payload: dict[str, Any] | bytes,
        *,
        key: str | None = None,
        encoding: str = "json",
        content_type_header: bool = True,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> tuple[int, int]:
        """Publishes one request (``kind`` image, voice, lora) or a ``control`` record,
        with ``headers`` added to the usual ones (e.g. ``traceparent``); returns
        (partition, offset)."""
        topic = f"{self.prefix}generation.{'control' if kind == 'control' else 'requested.' + kind}"
        record_headers: list[tuple[str, bytes]] = []
        if isinstance(payload, bytes):
            value = payload
        else:
            if encoding == "avro":
                model = _MODELS[kind]
                value = self.codec.encode(self.codec.validate(model, payload), "avro")
            else:
                value = json.dumps(payload).encode()
            if content_type_header:
                record_headers.append(
                    ("content-type", self.codec.content_type(encoding).encode()))
            record_headers.append(("request_id", str(payload.get("request_id", "")).encode()))
        record_headers += headers or []
        if key is None and isinstance(payload, dict):
            key = str(payload.get("conversation_id", ""))
        meta = await self._producer.send_and_wait(
            topic, value=value, key=key.encode() if key is not None else None,
            headers=record_headers,
        )
        return meta.partition, meta.offset

    async def wait_for(self, predicate: Any, count: int = 1, timeout: float = 30.0
                       ) -> list[Answer]:
        """Waits until ``count`` answers satisfy ``predicate``; returns them in arrival order."""
        async def enough() -> list[Answer]:
            async with self._arrived:
                await self._arrived.wait_for(
                    lambda: sum(1 for a in self.answers if predicate(a)) >= count
                )
                return [a for a in self.answers if predicate(a)]
        return await asyncio.wait_for(enough(), timeout)

    async def answers_for(self, request_ids: list[str], timeout: float = 30.0
                          ) -> dict[str, Answer]:
        """Waits for a completed or failed answer to each request id (the first of each)."""
        wanted = set(request_ids)

        def found() -> dict[str, Answer]:
            first: dict[str, Answer] = {}
            for a in self.answers:
                rid = a.event.get("request_id")
                if a.kind in ("completed", "failed") and rid in wanted and rid not in first:
                    first[rid] = a
            return first

        async def complete() -> dict[str, Answer]:
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(found()) == len(wanted))
                return found()

        try:
            return await asyncio.wait_for(complete(), timeout)
        except TimeoutError:
            missing = wanted - set(found())
            raise AssertionError(f"{len(missing)} of {len(wanted)} requests unanswered "
                                 f"after {timeout}s") from None
