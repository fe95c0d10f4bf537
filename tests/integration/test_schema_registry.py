"""The engine with a Schema Registry (SCHEMA_REGISTRY_URL), on the real broker and the local
registry of tests/support: what it publishes is Confluent's wire format that Confluent's own
deserializer reads, requests in either framing are answered, and a registry that refuses or
goes away is said clearly and loses nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import ConsumerRecord
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from prometheus_client import CollectorRegistry

import schemas
from consumers.engine import Engine
from consumers.serve import StartupError, _start
from core.settings import Settings
from schemas import EventCodec, VoiceRequested
from tests.integration.conftest import running_engine
from tests.support.kafka_client import TopicPeer
from tests.support.schema_registry import SchemaRegistryServer, running_registry
from tests.support.settings import engine_settings

pytestmark = pytest.mark.kafka

USER_INFO = "engine:registry-secret-42"
AVRO_DIR = Path(schemas.__file__).with_name("avro")


@dataclass(frozen=True)
class Record:
    topic: str
    value: bytes
    headers: dict[str, bytes]

    @property
    def kind(self) -> str:
        return self.topic.rsplit(".", 1)[-1]


class RawPeer(TopicPeer):
    """Publishes request bytes and keeps every answer's raw bytes: what a consumer of the
    registry's wire format sees."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        super().__init__(bootstrap, *(f"{prefix}generation.{t}"
                                      for t in ("completed", "failed", "progress")))
        self.prefix = prefix
        self.records: list[Record] = []
        self._arrived = asyncio.Condition()

    async def _take(self, record: ConsumerRecord[bytes, bytes]) -> None:
        async with self._arrived:
            self.records.append(Record(record.topic, record.value or b"",
                                       dict(record.headers or ())))
            self._arrived.notify_all()

    @property
    def voice_topic(self) -> str:
        return f"{self.prefix}generation.requested.voice"

    async def publish(self, value: bytes, key: str = "conv-sr",
                      topic: str | None = None) -> None:
        await self._producer.send_and_wait(
            topic or self.voice_topic, value=value, key=key.encode(),
            headers=[("content-type", b"avro/binary")])

    async def wait_for(self, request_id: str, kinds: set[str], decode: Any,
                       timeout: float = 30.0) -> dict[str, Record]:
        """The first answer of each kind in ``kinds`` naming ``request_id``."""
        def found() -> dict[str, Record]:
            seen: dict[str, Record] = {}
            for r in self.records:
                if r.kind in kinds and r.kind not in seen \
                        and decode(r)["request_id"] == request_id:
                    seen[r.kind] = r
            return seen

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(found()) == len(kinds)),
                                   timeout)
        return found()


def voice_request(**extra: Any) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": "conv-sr",
            "text": "Hello from the registry.", **extra}


@pytest.fixture
def registry() -> Iterator[tuple[SchemaRegistryServer, str]]:
    server = SchemaRegistryServer(user_info=USER_INFO)
    with running_registry(server) as url:
        yield server, url


@pytest.fixture
def client(registry: tuple[SchemaRegistryServer, str]) -> Iterator[SchemaRegistryClient]:
    with SchemaRegistryClient({"url": registry[1], "basic.auth.user.info": USER_INFO}) as c:
        yield c


@pytest.fixture
async def settings(tmp_path: Path, broker_bootstrap: str, topic_prefix: str, make_topics: Any,
                   registry: tuple[SchemaRegistryServer, str], monkeypatch: pytest.MonkeyPatch
                   ) -> Settings:
    monkeypatch.chdir(tmp_path)
    await make_topics(partitions=1)
    return engine_settings(tmp_path, broker_bootstrap, topic_prefix,
                           schema_registry_url=registry[1],
                           schema_registry_user_info=USER_INFO, retry_max_attempts=2)


@pytest.fixture
async def peer(settings: Settings) -> AsyncIterator[RawPeer]:
    assert settings.kafka_bootstrap_servers is not None
    async with RawPeer(settings.kafka_bootstrap_servers, settings.kafka_topic_prefix) as p:
        yield p


def confluent_decoder(client: SchemaRegistryClient) -> Any:
    deserializer = AvroDeserializer(client)

    def decode(record: Record) -> dict[str, Any]:
        assert record.value[:1] == b"\x00", record.value[:8].hex()  # Confluent's framing
        result: dict[str, Any] = deserializer(
            record.value, SerializationContext(record.topic, MessageField.VALUE))
        return result
    return decode


def single_object(request: dict[str, Any]) -> bytes:
    codec = EventCodec()
    return codec.encode(codec.validate(VoiceRequested, request), "avro")


async def health(engine: Engine) -> dict[str, Any]:
    assert engine.addresses is not None
    async with aiohttp.ClientSession() as session, \
            session.get(engine.addresses.http_url + "/health") as response:
        body: dict[str, Any] = await response.json()
        return body


async def test_every_event_reads_with_confluents_deserializer(
        engine: Engine, peer: RawPeer, client: SchemaRegistryClient,
        caplog: pytest.LogCaptureFixture) -> None:
    decode = confluent_decoder(client)
    good = voice_request()
    await peer.publish(single_object(good))
    answers = await peer.wait_for(good["request_id"], {"progress", "completed"}, decode)
    assert decode(answers["progress"])["stream_url"]
    completed = decode(answers["completed"])
    assert completed["kind"] == "voice" and completed["text"] == good["text"]
    assert answers["completed"].headers["content-type"] == b"avro/binary"

    bad = voice_request(text="")  # decodes, but is not a valid request
    serializer = AvroSerializer(client, (AVRO_DIR / "VoiceRequested.avsc").read_text("utf-8"))
    await peer.publish(serializer(bad, SerializationContext(peer.voice_topic,
                                                            MessageField.VALUE)))
    failed = decode((await peer.wait_for(bad["request_id"], {"failed"}, decode))["failed"])
    assert failed["error_code"] == "INVALID_REQUEST"

    subjects = set(client.get_subjects())
    for name in ("completed", "failed", "progress", "control"):
        assert f"{peer.prefix}generation.{name}-value" in subjects
    progress = client.get_latest_version(f"{peer.prefix}generation.progress-value")
    assert json.loads(progress.schema.schema_str)["name"] == "GenerationProgress"

    body = await health(engine)
    assert body["schema_registry"] == {"url": engine._settings.schema_registry_url,
                                       "reachable": True}
    assert USER_INFO not in json.dumps(body) and USER_INFO not in caplog.text


async def test_both_framings_on_one_topic_are_answered(
        engine: Engine, peer: RawPeer, client: SchemaRegistryClient) -> None:
    decode = confluent_decoder(client)
    schema = Schema((AVRO_DIR / "VoiceRequested.avsc").read_text("utf-8"), "AVRO")
    serializer = AvroSerializer(client, schema.schema_str)
    confluent = voice_request()
    value = serializer(confluent, SerializationContext(peer.voice_topic, MessageField.VALUE))
    assert value is not None and value[:1] == b"\x00"
    await peer.publish(value)
    classic = voice_request()
    await peer.publish(single_object(classic))

    for request in (confluent, classic):
        answer = await peer.wait_for(request["request_id"], {"completed"}, decode)
        assert decode(answer["completed"])["text"] == request["text"]


async def test_an_id_the_registry_does_not_have_fails_and_the_partition_moves_on(
        engine: Engine, peer: RawPeer, client: SchemaRegistryClient) -> None:
    decode = confluent_decoder(client)
    await peer.publish(b"\x00\x00\x00\x27\x0f" + b"\x02")  # schema id 9999
    after = voice_request()
    await peer.publish(single_object(after))
    await peer.wait_for(after["request_id"], {"completed"}, decode)
    failed = [decode(r) for r in peer.records if r.kind == "failed"]
    assert len(failed) == 1 and failed[0]["error_code"] == "UNDECODABLE"
    assert "no Avro schema with id 9999" in failed[0]["message"]
    assert failed[0]["retryable"] is False


async def test_a_registry_outage_delays_records_and_loses_none(
        engine: Engine, peer: RawPeer, client: SchemaRegistryClient,
        registry: tuple[SchemaRegistryServer, str], caplog: pytest.LogCaptureFixture) -> None:
    server, url = registry
    decode = confluent_decoder(client)
    schema = (AVRO_DIR / "VoiceRequested.avsc").read_text("utf-8")
    serializer = AvroSerializer(client, schema)
    request = voice_request()
    value = serializer(request, SerializationContext(peer.voice_topic, MessageField.VALUE))
    assert value is not None
    for name in ("completed", "progress"):  # the test's deserializer learns its ids now
        client.get_schema(client.get_latest_version(
            f"{peer.prefix}generation.{name}-value").schema_id)

    server.unavailable = True
    with caplog.at_level(logging.WARNING):
        await peer.publish(value)  # its id is one the engine has never seen
        await engine.health.wait_until(lambda h: h.schema_registry_reachable is False, 15)
        body = await health(engine)
        assert body["schema_registry"] == {"url": url, "reachable": False}
        assert body["status"] == "degraded"  # events wait for the registry meanwhile
        assert not [r for r in peer.records if r.kind in ("completed", "failed")]
        assert "waiting for the Schema Registry" in caplog.text
        assert "Schema Registry at" in caplog.text and USER_INFO not in caplog.text

        server.unavailable = False
        answer = await peer.wait_for(request["request_id"], {"completed"}, decode)
    assert decode(answer["completed"])["text"] == request["text"]
    assert not [r for r in peer.records if r.kind == "failed"]
    after = await health(engine)
    assert after["schema_registry"]["reachable"] is True and after["status"] == "ok"


async def test_an_incompatible_subject_stops_start_up_in_one_line(
        settings: Settings, client: SchemaRegistryClient) -> None:
    subject = f"{settings.kafka_topic_prefix}generation.completed-value"
    client.set_compatibility(subject, "BACKWARD")
    conflicting = {"type": "record", "name": "GenerationCompleted",
                   "namespace": "com.multimodal.engine", "fields": [
                       {"name": "only_field", "type": "string"}]}
    client.register_schema(subject, Schema(json.dumps(conflicting), "AVRO"))
    assert settings.kafka_bootstrap_servers is not None
    engine = Engine(settings, settings.kafka_bootstrap_servers, http_host="127.0.0.1",
                    registry=CollectorRegistry())
    with pytest.raises(StartupError) as caught:
        await _start(engine, settings.kafka_bootstrap_servers)
    message = str(caught.value)
    assert "\n" not in message and subject in message and "incompatible" in message
    assert USER_INFO not in message


async def test_an_unreachable_registry_at_start_up_is_retried_then_said(
        tmp_path: Path, broker_bootstrap: str, topic_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = SchemaRegistryServer(unavailable=True)
    with running_registry(server) as url:
        settings = engine_settings(tmp_path, broker_bootstrap, topic_prefix,
                                   schema_registry_url=url, retry_max_attempts=3)
        engine = Engine(settings, broker_bootstrap, http_host="127.0.0.1",
                        registry=CollectorRegistry())
        with pytest.raises(StartupError) as caught:
            await _start(engine, broker_bootstrap)
    message = str(caught.value)
    assert "\n" not in message and url in message and "after 3 attempt(s)" in message
    path = f"/subjects/{topic_prefix}generation.completed-value/versions"
    assert server.requests.count(("POST", path)) == 3


async def test_without_a_registry_a_confluent_record_fails_naming_the_setting(
        tmp_path: Path, broker_bootstrap: str, topic_prefix: str, make_topics: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    await make_topics(partitions=1)
    settings = engine_settings(tmp_path, broker_bootstrap, topic_prefix)
    codec = EventCodec()
    async with running_engine(settings) as engine:
        async with RawPeer(broker_bootstrap, topic_prefix) as peer:
            await peer.publish(b"\x00\x00\x00\x00\x01\x02")
            after = voice_request()
            await peer.publish(single_object(after))

            def decode(r: Record) -> dict[str, Any]:
                assert r.value[:2] == b"\xc3\x01"  # today's framing, unchanged
                return codec.decode_raw(r.value, "avro/binary")[1]
            await peer.wait_for(after["request_id"], {"completed"}, decode)
            failed = [decode(r) for r in peer.records if r.kind == "failed"]
        assert (await health(engine))["schema_registry"] is None
    assert len(failed) == 1 and failed[0]["error_code"] == "UNDECODABLE"
    assert "SCHEMA_REGISTRY_URL is not set" in failed[0]["message"]


async def test_a_cancel_in_a_schema_version_the_engine_never_saw_still_applies(
        engine: Engine, peer: RawPeer, client: SchemaRegistryClient) -> None:
    """The Persona side's control schema has a field more (a compatible evolution): its
    registry id is new to the engine, whose control reader fetches it before applying."""
    decode = confluent_decoder(client)
    schema = json.loads((AVRO_DIR / "GenerationControl.avsc").read_text("utf-8"))
    schema["fields"].append({"name": "reason", "type": ["null", "string"], "default": None})
    control_topic = f"{peer.prefix}generation.control"
    serializer = AvroSerializer(client, json.dumps(schema))
    request = voice_request(conversation_id="conv-cancel")
    cancel = serializer({"action": "cancel", "request_id": request["request_id"],
                         "conversation_id": "conv-cancel", "created_at": None,
                         "reason": "the user left"},
                        SerializationContext(control_topic, MessageField.VALUE))
    assert cancel is not None and cancel[:1] == b"\x00"
    await peer.publish(cancel, key="conv-cancel", topic=control_topic)
    await peer.publish(single_object(request), key="conv-cancel")
    answer = await peer.wait_for(request["request_id"], {"failed"}, decode)
    assert decode(answer["failed"])["error_code"] == "CANCELLED"
