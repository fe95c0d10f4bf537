"""The local Schema Registry (``tests/support/schema_registry.py``) answers Confluent's own
client as Confluent's registry does: registration and ids, lookups, compatibility by level,
config, basic auth, and the Confluent wire format of ``AvroSerializer``/``AvroDeserializer``
with the engine's schemas."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

import schemas
from schemas import EventCodec
from tests.schemas.test_codec_roundtrip import SAMPLES
from tests.support.schema_registry import SchemaRegistryServer, running_registry

AVRO_DIR = Path(schemas.__file__).with_name("avro")
USER_INFO = "engine:registry-secret-42"


@pytest.fixture
def registry() -> Iterator[tuple[SchemaRegistryServer, SchemaRegistryClient]]:
    server = SchemaRegistryServer(user_info=USER_INFO)
    with (running_registry(server) as url,
          SchemaRegistryClient({"url": url, "basic.auth.user.info": USER_INFO}) as client):
        yield server, client


def _avro(path: Path) -> Schema:
    return Schema(path.read_text("utf-8"), "AVRO")


def test_registering_answers_one_id_per_schema_and_serves_it_back(
        registry: tuple[SchemaRegistryServer, SchemaRegistryClient]) -> None:
    _, client = registry
    voice = _avro(AVRO_DIR / "VoiceRequested.avsc")
    first = client.register_schema("generation.requested.voice-value", voice)
    assert client.register_schema("generation.requested.voice-value", voice) == first
    assert client.register_schema("other-value", voice) == first  # ids are global
    assert json.loads(client.get_schema(first).schema_str) == json.loads(voice.schema_str)
    latest = client.get_latest_version("generation.requested.voice-value")
    assert (latest.schema_id, latest.version) == (first, 1)
    assert client.get_subjects() == ["generation.requested.voice-value", "other-value"]


def test_evolution_follows_the_compatibility_level(
        registry: tuple[SchemaRegistryServer, SchemaRegistryClient]) -> None:
    _, client = registry
    subject = "generation.requested.voice-value"
    old = _avro(AVRO_DIR / "history" / "VoiceRequested.v1.avsc")
    client.register_schema(subject, old)
    new = _avro(AVRO_DIR / "VoiceRequested.avsc")
    assert client.test_compatibility(subject, new) is True
    broken = json.loads(new.schema_str)
    broken["fields"].append({"name": "mood", "type": "string"})
    breaking = Schema(json.dumps(broken), "AVRO")
    assert client.test_compatibility(subject, breaking) is False
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, breaking)
    assert refused.value.http_status_code == 409 and "mood" in refused.value.error_message
    assert client.get_compatibility() == "BACKWARD"
    client.set_compatibility(subject, "NONE")
    assert client.get_compatibility(subject) == "NONE"
    client.register_schema(subject, breaking)
    assert client.get_latest_version(subject).version == 2


def test_unknowns_and_bad_credentials_are_refused_with_confluents_codes(
        registry: tuple[SchemaRegistryServer, SchemaRegistryClient]) -> None:
    server, client = registry
    assert server.url is not None
    with pytest.raises(SchemaRegistryError) as missing:
        client.get_schema(999)
    assert missing.value.error_code == 40403
    with pytest.raises(SchemaRegistryError) as no_subject:
        client.get_latest_version("nothing-value")
    assert no_subject.value.error_code == 40401
    with pytest.raises(SchemaRegistryError) as invalid:
        client.register_schema("x-value", Schema('{"type": "record"}', "AVRO"))
    assert invalid.value.error_code == 42201
    with (SchemaRegistryClient({"url": server.url, "basic.auth.user.info": "engine:wrong"}) as wrong,
          pytest.raises(SchemaRegistryError) as unauthorized):
        wrong.get_subjects()
    assert unauthorized.value.http_status_code == 401


@pytest.mark.parametrize("event", SAMPLES[:4], ids=lambda e: type(e).__name__)
def test_confluent_serdes_round_trip_the_engines_events_in_the_wire_format(
        registry: tuple[SchemaRegistryServer, SchemaRegistryClient], event: Any) -> None:
    _, client = registry
    name = type(event).avro_name.rsplit(".", 1)[-1]
    text = (AVRO_DIR / f"{name}.avsc").read_text("utf-8")
    context = SerializationContext("generation.topic", MessageField.VALUE)
    serializer = AvroSerializer(client, text, conf={"auto.register.schemas": True})
    record = event.model_dump(mode="python")
    value = serializer(record, context)
    assert value is not None
    schema_id = client.get_latest_version("generation.topic-value").schema_id
    assert value[:5] == b"\x00" + schema_id.to_bytes(4, "big")  # Confluent's framing
    # the body is the engine's Avro body: the single-object record less its 10-byte header
    assert value[5:] == EventCodec().encode(event, "avro")[10:]
    assert AvroDeserializer(client)(value, context) == record
    parsed = fastavro.parse_schema(json.loads(text), named_schemas={})
    assert fastavro.schemaless_reader(io.BytesIO(value[5:]), parsed, None) == record
