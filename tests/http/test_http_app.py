"""The HTTP app on a real server on 127.0.0.1, over the real output store and voice core."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import mutagen.mp3
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.scheduling import build_scheduling
from core.settings import load_settings
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from http_files import AppServices, create_app
from http_files.uploads import UploadLimits
from schemas.codec import EventCodec


@pytest.fixture
def store(tmp_path: Path) -> OutputStore:
    return OutputStore(tmp_path / "outputs", cleanup_delay=3600)


@pytest.fixture
def health() -> EngineHealth:
    return EngineHealth(voice_backend="local")


@pytest.fixture
async def client(store: OutputStore, health: EngineHealth, tmp_path: Path
                 ) -> AsyncIterator[TestClient]:
    metrics = EngineMetrics(CollectorRegistry())
    services = AppServices(
        health=health, metrics=metrics, store=store,
        codec=EventCodec(),
        voice=VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store, "21m00Tcm4TlvDq8ikWAM"),
        scheduling=build_scheduling(load_settings(), metrics),
    )
    app = create_app(services, UploadLimits(tmp_path / "temp" / "uploads"))
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


async def test_health_is_503_while_starting_or_degraded_and_200_when_ok(
    client: TestClient, health: EngineHealth
) -> None:
    response = await client.get("/health")
    assert response.status == 503 and (await response.json())["status"] == "starting"
    health.started = True
    response = await client.get("/health")
    assert response.status == 503 and (await response.json())["status"] == "degraded"
    health.kafka_connected = True
    health.assigned = [("generation.requested.voice", 0)]
    response = await client.get("/health")
    body = await response.json()
    assert response.status == 200 and body["status"] == "ok"
    assert set(body) >= {"status", "gpu", "image_model", "kafka", "voice"}
    assert body["kafka"]["assigned_partitions"] == [
        {"topic": "generation.requested.voice", "partition": 0}]
    assert body["voice"]["backend"] == "local"
    assert body["gpu"]["available"] in (True, False)


async def test_generate_voice_keeps_the_original_response_fields(client: TestClient) -> None:
    request = {"text": "Hello, I'm Sarah! How can I help you today?",
               "voice_id": "21m00Tcm4TlvDq8ikWAM", "stability": 0.5,
               "similarity_boost": 0.5, "style": 0.0}
    response = await client.post("/generate/voice", json=request)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert set(body) == {"audio_id", "filename", "text", "enhanced_text", "voice_id", "url",
                         "duration_seconds", "timestamp", "seed", "words", "alignment_url",
                         "output_format"}  # the original's, + seed, timings and format
    assert body["voice_id"] == request["voice_id"] and body["text"] == request["text"]
    assert body["url"] == f"/outputs/{body['audio_id']}.mp3"
    audio = await client.get(body["url"])
    assert audio.status == 200 and audio.headers["Content-Type"] == "audio/mpeg"
    data = await audio.read()
    assert abs(mutagen.mp3.MP3(io.BytesIO(data)).info.length - body["duration_seconds"]) < 0.05


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "text"),
        ({"text": "hi", "stability": 1.5}, "stability"),
        ({"text": "hi", "style": "loud"}, "style"),
        ({"text": "   "}, "text"),
    ],
)
async def test_invalid_voice_request_is_422_naming_the_field(
    client: TestClient, body: dict[str, object], field: str
) -> None:
    response = await client.post("/generate/voice", json=body)
    assert response.status == 422
    detail = (await response.json())["detail"]
    assert ["body", field] in [d["loc"] for d in detail]


async def test_body_that_is_not_json_is_422(client: TestClient) -> None:
    response = await client.post("/generate/voice", data=b"{nope",
                                 headers={"Content-Type": "application/json"})
    assert response.status == 422


async def test_outputs_support_range_requests(client: TestClient, store: OutputStore) -> None:
    stored = store.write(bytes(range(256)) * 4, "mp3")
    response = await client.get(stored.url, headers={"Range": "bytes=10-19"})
    assert response.status == 206
    assert await response.read() == bytes(range(10, 20))
    assert response.headers["Content-Range"] == "bytes 10-19/1024"


@pytest.mark.parametrize(
    "path",
    [
        "/outputs/..%2f..%2fetc%2fpasswd",
        "/outputs/%2e%2e",
        "/outputs/%2e%2e%2fsecret.mp3",
        "/outputs/..",
        "/outputs/%2fetc%2fpasswd",
        "/outputs//etc/passwd",
        "/outputs/../pyproject.toml",
        "/outputs/00000000-0000-4000-8000-000000000000.mp3",
        "/outputs/.tmp-x.mp3",
    ],
)
async def test_path_tricks_and_unknown_names_are_404(client: TestClient, path: str) -> None:
    response = await client.get(path, allow_redirects=False)
    assert response.status == 404


async def test_symlinked_and_expired_outputs_are_404(
    client: TestClient, store: OutputStore, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not an output")
    link = store.directory / "11111111-1111-4111-8111-111111111111.mp3"
    os.symlink(secret, link)
    assert (await client.get(f"/outputs/{link.name}")).status == 404

    stored = store.write(b"ID3 data", "mp3")
    assert (await client.get(stored.url)).status == 200
    old = stored.path.stat().st_mtime - 7200
    os.utime(stored.path, (old, old))  # created two hours ago: past CLEANUP_DELAY
    assert (await client.get(stored.url)).status == 404


async def test_metrics_are_prometheus_text(client: TestClient) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert "# TYPE engine_requests_consumed_total counter" in text
    assert "# TYPE engine_processing_seconds histogram" in text
