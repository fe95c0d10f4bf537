"""Reading Confluent-framed records through :class:`schemas.registry.RegistryFraming`, against
the local Schema Registry of tests/support: an id the registry did not have yet (a lagging
replica) is read once it has it, and ids it does not have neither push real schemas out of
the cache nor pile up."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

import schemas
from schemas import EventCodec, VoiceRequested
from schemas.errors import UndecodableError
from schemas.registry import RegistryFraming, SchemaRegistryError
from tests.support.schema_registry import SchemaRegistryServer, running_registry

AVRO_DIR = Path(schemas.__file__).with_name("avro")
SUBJECT = "generation.requested.voice-value"
REQUEST = VoiceRequested(request_id="r-1", conversation_id="c-1", text="Hello there")


@dataclass
class Reading:
    server: SchemaRegistryServer
    client: SchemaRegistryClient  # Confluent's, as a producer's side would register
    framing: RegistryFraming
    codec: EventCodec

    def gets(self, schema_id: int) -> int:
        """How many times the registry was asked for ``schema_id``."""
        return self.server.requests.count(("GET", f"/schemas/ids/{schema_id}"))


@pytest.fixture
async def reading() -> AsyncIterator[Reading]:
    server = SchemaRegistryServer()
    with running_registry(server) as url, SchemaRegistryClient({"url": url}) as client:
        async with httpx.AsyncClient(timeout=5.0) as http:
            framing = RegistryFraming(url, http, cache_size=2)
            yield Reading(server, client, framing, EventCodec(framing=framing))


def framed(schema_id: int) -> bytes:
    """``REQUEST`` in Confluent's wire format, naming ``schema_id`` (its body written with
    the current VoiceRequested schema)."""
    body = EventCodec().encode(REQUEST, "avro")[10:]  # after C3 01 + the fingerprint
    return b"\x00" + struct.pack(">I", schema_id) + body


async def read(reading: Reading, value: bytes) -> VoiceRequested:
    await reading.codec.resolve_writer(value)
    return reading.codec.decode(value, None, VoiceRequested)


async def test_an_id_the_registry_gets_later_is_read_then(reading: Reading) -> None:
    early = framed(1)  # named before the registry (a lagging replica) has it
    with pytest.raises(UndecodableError, match="has no Avro schema with id 1"):
        await read(reading, early)

    schema = Schema((AVRO_DIR / "VoiceRequested.avsc").read_text("utf-8"), "AVRO")
    assert reading.client.register_schema(SUBJECT, schema) == 1
    assert await read(reading, early) == REQUEST
    assert await read(reading, early) == REQUEST
    assert reading.gets(1) == 2  # the miss, then the schema, kept from then on


async def test_unknown_ids_neither_push_schemas_out_nor_pile_up(reading: Reading) -> None:
    schema = Schema((AVRO_DIR / "VoiceRequested.avsc").read_text("utf-8"), "AVRO")
    known = reading.client.register_schema(SUBJECT, schema)
    assert await read(reading, framed(known)) == REQUEST

    hostile = range(1000, 1100)  # each one undecodable, the cache holding 2 schemas
    for schema_id in hostile:
        with pytest.raises(UndecodableError, match=f"no Avro schema with id {schema_id}"):
            await read(reading, framed(schema_id))
    assert await read(reading, framed(known)) == REQUEST
    assert reading.gets(known) == 1  # still cached: not asked for again
    assert reading.framing.cached(hostile[0]) is None  # the misses kept are bounded


async def test_unusable_ids_are_told_in_the_writers_terms(reading: Reading) -> None:
    # An id the registry lacks: the caller is told so, the registry's address is for the log.
    with pytest.raises(UndecodableError) as missing:
        await read(reading, framed(7))
    assert missing.value.public_message == "the Schema Registry has no Avro schema with id 7"
    assert reading.framing.url in str(missing.value)
    # An id of a schema that is not a record (a string): no parser's words.
    not_record = reading.client.register_schema(SUBJECT, Schema('"string"', "AVRO"))
    with pytest.raises(UndecodableError) as unusable:
        await read(reading, framed(not_record))
    assert unusable.value.public_message == (
        f"the Schema Registry's schema id {not_record} is not a usable Avro record schema")
    assert "dictionary update sequence" in str(unusable.value)


@pytest.mark.parametrize(("body", "said"), [
    ("{not json", "with a body that is not JSON"),
    ('"a string"', "with JSON that is neither an object nor an array"),
])
async def test_a_registry_answering_garbage_is_told_without_parser_words(
    body: str, said: str
) -> None:
    # The engine puts this error in the failed event of the record it was reading.
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/schemas/ids/{id}", garbage)
    async with TestServer(app, host="127.0.0.1") as server, \
            httpx.AsyncClient(timeout=5.0) as http:
        framing = RegistryFraming(str(server.make_url("")).rstrip("/"), http)
        with pytest.raises(SchemaRegistryError) as info:
            await framing.resolve(framed(5))
    assert str(info.value) == f"the Schema Registry answered /schemas/ids/5 {said}"
