"""Fuzzing the voice input topic: 2,000 hostile records from a fixed seed (random bytes,
truncated Avro, tombstones, JSON nested 100,000 deep, lying or unknown content-type
headers, requests of the wrong schema or with bad fields (lone surrogates in their ids,
100 KB ids), 1 MiB keys, keys that are not UTF-8).

Every record must be answered by a ``generation.failed`` event (UNDECODABLE or
INVALID_REQUEST as its defect says) naming its source offset; afterwards the group has
committed everything (lag 0) and a valid request is still answered completed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord

from consumers.engine import Engine
from core.settings import Settings
from schemas.codec import EventCodec
from schemas.events import ImageRequested, VoiceRequested
from tests.chaos._checks import assert_all_committed, assert_nothing_lost, voice_requests
from tests.chaos.conftest import PARTITIONS
from tests.support.kafka_client import PersonaPeer, TopicReader
from tests.support.kafka_security import client_options

pytestmark = pytest.mark.kafka

SEED = 20251129
RECORDS = 2000
UNDECODABLE, INVALID = "UNDECODABLE", "INVALID_REQUEST"
AVRO, JSON = b"avro/binary", b"application/json"

_CODEC = EventCodec()


@dataclass(frozen=True)
class Fuzz:
    """One hostile record and the error code it must be answered with."""

    what: str
    value: bytes | None
    code: str = UNDECODABLE
    key: bytes | None = None
    content_type: bytes | None = None
    partition: int | None = None  # the large ones are spread by hand (the mock keeps ~5 MiB)


def _voice(rng: random.Random) -> dict[str, Any]:
    return {"request_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "conversation_id": f"fuzz-{rng.randrange(50)}",
            "text": "Hi" + "".join(rng.choice("abc xyz.!?") for _ in range(rng.randint(0, 80)))}


def _avro(rng: random.Random) -> bytes:
    return _CODEC.encode(VoiceRequested.model_validate(_voice(rng)), "avro")


def _random_bytes(rng: random.Random) -> Fuzz:
    return Fuzz("random bytes", rng.randbytes(rng.randint(0, 300)),
                content_type=rng.choice([None, AVRO, JSON]))


def _truncated_avro(rng: random.Random) -> Fuzz:
    whole = _avro(rng)
    return Fuzz("truncated avro", whole[: rng.randrange(len(whole))],
                content_type=rng.choice([None, AVRO]))


def _tombstone(rng: random.Random) -> Fuzz:
    # aiokafka refuses a record with neither key nor value
    return Fuzz("tombstone", None, key=rng.choice([b"", b"fuzz-tomb"]))


def _avro_labelled_json(rng: random.Random) -> Fuzz:
    return Fuzz("avro labelled json", _avro(rng), content_type=JSON)


def _json_labelled_avro(rng: random.Random) -> Fuzz:
    return Fuzz("json labelled avro", json.dumps(_voice(rng)).encode(), content_type=AVRO)


def _unknown_content_type(rng: random.Random) -> Fuzz:
    label = rng.choice([b"text/plain", b"application/x-protobuf", b"avro/json",
                        b"application/xml", b"\xff\xfe\x00 not a type", b"json"])
    return Fuzz("unknown content type", json.dumps(_voice(rng)).encode(), content_type=label)


def _bad_field(rng: random.Random) -> Fuzz:
    request = _voice(rng)
    defect = rng.choice(["no text", "blank text", "numeric id", "stability 5", "nested text",
                         "no conversation", "lone surrogate id", "lone surrogate conversation",
                         "100 KB id"])
    if defect == "no text":
        del request["text"]
    elif defect == "blank text":
        request["text"] = "   "
    elif defect == "numeric id":
        request["request_id"] = rng.randrange(10**9)
    elif defect == "stability 5":
        request["stability"] = 5.0
    elif defect == "nested text":
        request["text"] = {"text": request["text"]}
    elif defect == "lone surrogate id":  # JSON escapes carry them; UTF-8 cannot
        request["request_id"] = "\ud800" + request["request_id"]
    elif defect == "lone surrogate conversation":
        request["conversation_id"] = request["conversation_id"] + "\udfff"
    elif defect == "100 KB id":  # echoed back, it would be an answer too large for a broker
        request["request_id"] = "r" * 100_000
    else:
        del request["conversation_id"]
    return Fuzz(f"invalid field: {defect}", json.dumps(request).encode(), INVALID,
                content_type=rng.choice([None, JSON]))


def _wrong_schema(rng: random.Random) -> Fuzz:
    image = ImageRequested(request_id=str(uuid.UUID(int=rng.getrandbits(128))),
                           conversation_id="fuzz-image", prompt="a cat")
    return Fuzz("image request on the voice topic", _CODEC.encode(image, "avro"), INVALID,
                content_type=AVRO)


def _binary_key(rng: random.Random) -> Fuzz:
    inner = rng.choice(_SMALL)(rng)
    return Fuzz(f"binary key, {inner.what}", inner.value, inner.code,
                key=b"\xff\xfe\xc3" + rng.randbytes(rng.randint(0, 30)),
                content_type=inner.content_type)


_SMALL: list[Callable[[random.Random], Fuzz]] = [
    _random_bytes, _truncated_avro, _tombstone, _avro_labelled_json, _json_labelled_avro,
    _unknown_content_type, _bad_field, _wrong_schema,
]


def fuzz_records(seed: int, count: int) -> list[Fuzz]:
    """``count`` records, the same for the same seed: a few large ones (JSON nested
    100,000 deep, 1 MiB keys), the rest drawn from the small kinds."""
    rng = random.Random(seed)
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    large = [Fuzz("json nested 100000 deep", deep, content_type=JSON, partition=p)
             for p in range(PARTITIONS)]
    large += [Fuzz("1 MiB key", b"{not json", key=b"k" * 2**20, partition=p)
              for p in range(PARTITIONS)]
    small = [rng.choice([*_SMALL, _binary_key])(rng) for _ in range(count - len(large))]
    records = large + small
    rng.shuffle(records)
    return records


class FailedReader(TopicReader):
    """Collects the ``generation.failed`` events of one input topic by source offset."""

    def __init__(self, bootstrap: str, failed_topic: str, source_topic: str) -> None:
        super().__init__(bootstrap, failed_topic)
        self.by_source: dict[tuple[int, int], dict[str, Any]] = {}
        self._source_topic = source_topic
        self._wanted: set[tuple[int, int]] = set()
        self._complete = asyncio.Event()

    async def _take(self, record: ConsumerRecord[bytes, bytes]) -> None:
        headers = dict(record.headers or ())
        _, event = _CODEC.decode_raw(record.value, headers.get("content-type"))
        if event.get("source_topic") == self._source_topic:
            self.by_source.setdefault((event["source_partition"], event["source_offset"]), event)
            self._check()

    def _check(self) -> None:
        if self._wanted and self._wanted <= self.by_source.keys():
            self._complete.set()

    async def wait_for(self, wanted: set[tuple[int, int]], timeout: float) -> None:
        """Waits until an event answers each of the ``wanted`` (partition, offset)s."""
        self._wanted = wanted
        self._check()
        try:
            await asyncio.wait_for(self._complete.wait(), timeout)
        except TimeoutError:
            missing = sorted(wanted - self.by_source.keys())
            raise AssertionError(f"{len(missing)} of {len(wanted)} records never answered, "
                                 f"e.g. {missing[:10]}") from None


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    instance = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                acks="all", enable_idempotence=True,
                                max_request_size=8 * 2**20,
                                **client_options(settings.kafka_bootstrap_servers or ""))
    await instance.start()
    try:
        yield instance
    finally:
        await instance.stop()


async def test_fuzzed_input_is_answered_failed_and_committed(
    settings: Settings, engine: Engine, peer: PersonaPeer, producer: AIOKafkaProducer
) -> None:
    assert settings.kafka_bootstrap_servers is not None
    topic = settings.topic("generation.requested.voice")
    records = fuzz_records(SEED, RECORDS)
    started = time.monotonic()
    async with FailedReader(settings.kafka_bootstrap_servers,
                            settings.topic("generation.failed"), topic) as failed:
        sent = [await producer.send(
            topic, value=r.value, key=r.key, partition=r.partition,
            headers=[("content-type", r.content_type)] if r.content_type else [])
            for r in records]
        placed = {(m.partition, m.offset): r
                  for m, r in zip(await asyncio.gather(*sent), records, strict=True)}
        published = time.monotonic()
        await failed.wait_for(set(placed), timeout=120)
        answered = time.monotonic()

    too_large = [(where, r.what) for where, r in placed.items()
                 if len(json.dumps(failed.by_source[where])) > 8192]
    assert not too_large, f"{len(too_large)} answers echo oversized fields: {too_large[:5]}"
    wrong = [(where, r.what, r.code, failed.by_source[where]["error_code"])
             for where, r in placed.items() if failed.by_source[where]["error_code"] != r.code]
    assert not wrong, f"{len(wrong)} answered with another code, e.g. {wrong[:5]}"
    await assert_all_committed(settings.kafka_bootstrap_servers, settings.kafka_group_id,
                               topic, PARTITIONS)
    valid = voice_requests(1, tag="after the fuzz")
    await peer.publish("voice", valid[0])
    await assert_nothing_lost(peer, valid)
    print(f"{RECORDS} fuzzed records published in {published - started:.1f} s, all answered "
          f"failed {answered - published:.1f} s later, committed; a valid one completed")
