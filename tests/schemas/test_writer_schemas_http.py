"""``GET /schemas/{fingerprint}``: every writer schema the engine knows, by the fingerprint of
its single-object records, so that a consumer holding older ``.avsc`` files reads records of
newer schemas by Avro resolution instead of failing on an unknown fingerprint."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import fastavro
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

import schemas
from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.scheduling import build_scheduling
from core.settings import load_settings
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from http_files import AppServices, create_app
from http_files.auth import AccessPolicy
from http_files.uploads import UploadLimits
from schemas import EventCodec, schema_fingerprint
from tests.schemas.test_codec_roundtrip import IDS, SAMPLES
from tests.support.openapi_check import check_client

Client = TestClient[web.Request, web.Application]
Start = Callable[..., Coroutine[Any, Any, Client]]

AVRO_DIR = Path(schemas.__file__).with_name("avro")
KNOWN = sorted(AVRO_DIR.glob("*.avsc")) + sorted((AVRO_DIR / "history").glob("*.avsc"))
KEY = "schema-reader-key-0123456789"


def _app(tmp_path: Path, access: AccessPolicy | None = None) -> web.Application:
    metrics = EngineMetrics(CollectorRegistry())
    store = OutputStore(tmp_path / "outputs", cleanup_delay=3600)
    services = AppServices(
        health=EngineHealth(voice_backend="local"), metrics=metrics, store=store,
        codec=EventCodec(),
        voice=VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store, "21m00Tcm4TlvDq8ikWAM"),
        scheduling=build_scheduling(load_settings(), metrics))
    return create_app(services, UploadLimits(tmp_path / "temp" / "uploads"), access)


@pytest.fixture
async def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Start]:
    check_client(monkeypatch)  # every exchange fits docs/openapi.json
    clients: list[Client] = []

    async def started(access: AccessPolicy | None = None) -> Client:
        client: Client = TestClient(TestServer(_app(tmp_path, access), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield started
    for client in clients:
        await client.close()


def _load(path: Path) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return schema


@pytest.mark.parametrize("path", KNOWN, ids=[p.stem for p in KNOWN])
async def test_every_known_schema_is_served_by_its_fingerprint(start: Start, path: Path) -> None:
    client = await start()
    schema = _load(path)
    hex_fp = schema_fingerprint(schema).hex()
    for spelled in (hex_fp, hex_fp.upper()):
        response = await client.get(f"/schemas/{spelled}")
        assert response.status == 200
        assert response.content_type == "application/json"
        assert "immutable" in response.headers["Cache-Control"]
        served = await response.json()
        assert served == schema  # as written: docs and defaults kept
        assert schema_fingerprint(served).hex() == hex_fp


@pytest.mark.parametrize("text", ["0123456789abcde", "0123456789abcdef0", "0123456789abcdeg",
                                  "c3010123456789abcdef", "-123456789abcdef"])
async def test_a_malformed_fingerprint_is_a_400_naming_it(start: Start, text: str) -> None:
    client = await start()
    response = await client.get(f"/schemas/{text}")
    assert response.status == 400
    body = await response.json()
    assert body["error_code"] == "INVALID_REQUEST" and body["retryable"] is False
    assert body["message"].startswith("fingerprint: ")


async def test_an_unknown_fingerprint_is_a_404(start: Start) -> None:
    client = await start()
    response = await client.get("/schemas/0123456789abcdef")
    assert response.status == 404
    body = await response.json()
    assert body["error_code"] == "NOT_FOUND" and "0123456789abcdef" in body["message"]


async def test_with_api_keys_it_needs_a_key_as_openapi_json_does(start: Start) -> None:
    client = await start(AccessPolicy((hashlib.sha256(KEY.encode()).digest(),)))
    path = f"/schemas/{schema_fingerprint(_load(AVRO_DIR / 'VoiceRequested.avsc')).hex()}"
    assert (await client.get(path)).status == 401
    assert (await client.get(path, headers={"Authorization": f"Bearer {KEY}"})).status == 200


# --- a consumer of the first release ------------------------------------------------------

class FirstReleaseConsumer:
    """What a consumer written against the engine's first release does: it holds only that
    release's ``.avsc`` files and, for a fingerprint it does not know, fetches the writer
    schema from ``GET /schemas/{fingerprint}`` (once) and resolves it with its own."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.fetched: list[str] = []
        first = {p.name.split(".", 1)[0]: _load(p)
                 for p in sorted((AVRO_DIR / "history").glob("*.v1.avsc"))}
        for path in sorted(AVRO_DIR.glob("*.avsc")):  # never changed since: still v1
            first.setdefault(path.stem, _load(path))
        self.readers = {name: fastavro.parse_schema(s, named_schemas={})
                        for name, s in first.items()}
        self._writers = {schema_fingerprint(s): self.readers[name] for name, s in first.items()}

    async def read(self, value: bytes) -> tuple[str, dict[str, Any]]:
        assert value[:2] == b"\xc3\x01"
        fp = value[2:10]
        writer = self._writers.get(fp)
        if writer is None:
            response = await self._client.get(f"/schemas/{fp.hex()}")
            assert response.status == 200, await response.text()
            self.fetched.append(fp.hex())
            writer = fastavro.parse_schema(await response.json(), named_schemas={})
            self._writers[fp] = writer
        name = writer["name"].rsplit(".", 1)[-1]
        record = fastavro.schemaless_reader(io.BytesIO(value[10:]), writer, self.readers[name])
        assert isinstance(record, dict)
        return name, record


async def test_a_first_release_consumer_reads_every_current_event(start: Start) -> None:
    client = await start()
    consumer = FirstReleaseConsumer(client)
    codec = EventCodec()
    changed = {p.name.split(".", 1)[0] for p in (AVRO_DIR / "history").glob("*.v1.avsc")}
    for event, sample_id in zip(SAMPLES, IDS, strict=True):
        name, record = await consumer.read(codec.encode(event, "avro"))
        assert name == type(event).avro_name.rsplit(".", 1)[-1], sample_id
        # every field of the first release, with the value the engine sent now
        sent = event.model_dump(mode="python")
        fields = [f["name"] for f in consumer.readers[name]["fields"]]
        assert record == {f: sent[f] for f in fields}, sample_id
    # the events whose schema changed since were read through the endpoint, each once
    current = {p.stem: schema_fingerprint(_load(p)).hex() for p in AVRO_DIR.glob("*.avsc")}
    sampled = {type(e).__name__ for e in SAMPLES}
    assert sorted(consumer.fetched) == sorted(current[n] for n in changed & sampled)
    assert changed & sampled, "the samples must include an event whose schema changed"
