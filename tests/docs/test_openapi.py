"""docs/openapi.json: valid OpenAPI 3.1 by openapi-spec-validator, served by the app as
``GET /openapi.json``, and a real oracle: the exchange check the HTTP tests run
(:mod:`tests.support.openapi_check`) catches responses and requests that do not fit it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry

from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.scheduling import build_scheduling
from core.settings import load_settings
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from http_files import AppServices, create_app
from http_files.form import _NUMBER_FIELDS, _TEXT_FIELDS
from http_files.openapi import _FORM_FIELDS, build_openapi, openapi_text
from http_files.uploads import UploadLimits
from schemas.codec import EventCodec
from tests.support.openapi_check import DOCS, check_client

Client = TestClient[web.Request, web.Application]


def test_the_document_is_valid_openapi_3_1() -> None:
    document = json.loads((DOCS / "openapi.json").read_text("utf-8"))
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises with the first problem


def test_every_route_of_the_app_is_documented(tmp_path: Path) -> None:
    app = _app(tmp_path)
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    documented = {(method, path) for path, item in build_openapi()["paths"].items()
                  for method in item}
    assert routes == documented


def test_the_training_form_lists_the_fields_the_form_reader_takes() -> None:
    assert set(_FORM_FIELDS) == _TEXT_FIELDS | set(_NUMBER_FIELDS)


async def test_the_app_serves_the_document_the_code_generates(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    check_client(monkeypatch)
    async with TestClient(TestServer(_app(tmp_path), host="127.0.0.1")) as client:
        response = await client.get("/openapi.json")
        assert response.status == 200
        assert response.content_type == "application/json"
        # the same text as docs/openapi.json, which tests/docs/test_drift.py holds to it
        assert await response.text() == openapi_text()


# --- the check catches what does not fit ---------------------------------------------------

def _health() -> dict[str, Any]:
    health = EngineHealth(voice_backend="local", kafka_enabled=False, started=True)
    return health.snapshot()


def _without(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != name}


async def _liar(request: web.Request) -> web.StreamResponse:
    """A server that answers what the query asks for, documented or not."""
    answer = request.query.get("answer", "")
    if answer == "missing":
        return web.json_response(_without(_health(), "gpu"))
    if answer == "extra":
        return web.json_response({**_health(), "uptime_seconds": 12})
    if answer == "wrong-type":
        return web.json_response({**_health(), "status": 200})
    if answer == "status":
        return web.json_response(_health(), status=418)
    return web.json_response(_health())


async def _accepts_anything(request: web.Request) -> web.StreamResponse:
    return web.json_response({"audio_id": "a", "filename": "a.mp3", "text": "", "seed": 1,
                              "enhanced_text": "", "voice_id": "v", "url": "/outputs/a.mp3",
                              "duration_seconds": 1.0, "timestamp": "2024-01-01T00:00:00Z"})


async def _metrics_as_json(request: web.Request) -> web.StreamResponse:
    return web.json_response({"requests": 1})


@pytest.fixture
async def liar(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Client]:
    check_client(monkeypatch)
    app = web.Application()
    app.router.add_get("/health", _liar)
    app.router.add_post("/generate/voice", _accepts_anything)
    app.router.add_get("/metrics", _metrics_as_json)
    app.router.add_get("/not-documented", _liar)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


async def test_a_documented_answer_passes(liar: Client) -> None:
    response = await liar.get("/health")
    assert response.status == 200 and (await response.json())["status"] == "ok"


@pytest.mark.parametrize(("answer", "words"), [
    ("missing", "'gpu' is a required property"),
    ("extra", "uptime_seconds"),
    ("wrong-type", "200 is not one of"),
    ("status", "418"),
])
async def test_a_response_that_does_not_fit_is_caught(liar: Client, answer: str,
                                                      words: str) -> None:
    with pytest.raises(AssertionError, match="does not fit|418") as caught:
        await liar.get("/health", params={"answer": answer})
    assert words in str(caught.value)


async def test_a_response_of_an_undocumented_content_type_is_caught(liar: Client) -> None:
    with pytest.raises(AssertionError, match="application/json"):
        await liar.get("/metrics")


async def test_a_request_that_does_not_fit_but_is_accepted_is_caught(liar: Client) -> None:
    with pytest.raises(AssertionError, match="request does not fit.*not refused"):
        await liar.post("/generate/voice", json={"voice_id": "no text"})
    response = await liar.post("/generate/voice", json={"text": "fits"})
    assert response.status == 200


async def test_an_undocumented_path_that_answers_is_caught(liar: Client) -> None:
    with pytest.raises(AssertionError, match="not in docs/openapi.json"):
        await liar.get("/not-documented")


def _app(tmp_path: Path) -> web.Application:
    metrics = EngineMetrics(CollectorRegistry())
    store = OutputStore(tmp_path / "outputs", cleanup_delay=3600)
    services = AppServices(
        health=EngineHealth(voice_backend="local"), metrics=metrics, store=store,
        codec=EventCodec(),
        voice=VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store, "21m00Tcm4TlvDq8ikWAM"),
        scheduling=build_scheduling(load_settings(), metrics))
    return create_app(services, UploadLimits(tmp_path / "temp" / "uploads"))
