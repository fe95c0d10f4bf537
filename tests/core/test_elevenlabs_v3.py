"""What ``eleven_v3`` refuses upstream, and the engine not sending it: text context
(``previous_text``/``next_text``, see test_elevenlabs_stitching.py for long text) and a
stability other than 0.0, 0.5 or 1.0, which is sent as the nearest of them. Against the
local ElevenLabs, which refuses both on v3 as the real API does."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from core.outputs import OutputStore
from core.settings import load_settings
from core.voice import ElevenLabsBackend, VoiceJob, VoiceService, build_voice_service
from schemas.events import VoiceRequested
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, RecordingSleep

RACHEL = "21m00Tcm4TlvDq8ikWAM"
SARAH = "EXAVITQu4vr4xnSDxMaL"
PATHS = ["", "/stream", "/with-timestamps", "/stream/with-timestamps"]
NO_CONTEXT = ("Providing previous_text or next_text is not yet supported with the "
              "'eleven_v3' model.")
NO_STABILITY = "Invalid TTD stability value. Must be one of: [0.0, 0.5, 1.0]"


def service(http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
            ) -> VoiceService:
    backend = ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY),
                                sleep=RecordingSleep())
    return VoiceService(backend, store, RACHEL)


async def post(http: httpx.AsyncClient, server: ElevenLabsServer, path: str,
               body: dict[str, Any]) -> httpx.Response:
    return await http.post(f"{server.api_url}/text-to-speech/{RACHEL}{path}",
                           headers={"xi-api-key": DEFAULT_KEY}, json={"text": "Hi.", **body})


@pytest.mark.parametrize("path", PATHS)
async def test_the_local_server_refuses_on_v3_what_elevenlabs_refuses(
    http: httpx.AsyncClient, server: ElevenLabsServer, path: str
) -> None:
    v3 = {"model_id": "eleven_v3"}
    for context in ({"previous_text": "Before."}, {"next_text": "After."}):
        refused = await post(http, server, path, {**v3, **context})
        assert refused.status_code == 400
        assert refused.json() == {"detail": {"status": "unsupported_model",
                                             "message": NO_CONTEXT}}
    refused = await post(http, server, path, {**v3, "voice_settings": {"stability": 0.3}})
    assert refused.status_code == 400
    assert refused.json() == {"detail": {"status": "invalid_ttd_stability",
                                         "message": NO_STABILITY}}
    for stability in (0.0, 0.5, 1.0):
        fine = await post(http, server, path, {**v3, "voice_settings": {"stability": stability}})
        assert fine.status_code == 200
    other = await post(http, server, path, {"model_id": "eleven_multilingual_v2",
                                            "previous_text": "Before.", "next_text": "After.",
                                            "voice_settings": {"stability": 0.3}})
    assert other.status_code == 200


@pytest.mark.parametrize(
    ("asked", "sent"),
    [(0.0, 0.0), (0.2, 0.0), (0.24, 0.0), (0.25, 0.5), (0.3, 0.5), (0.5, 0.5), (0.7, 0.5),
     (0.75, 0.5), (0.76, 1.0), (0.9, 1.0), (1.0, 1.0)],
)
async def test_a_stability_on_v3_is_sent_as_the_nearest_it_takes(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore,
    caplog: pytest.LogCaptureFixture, asked: float, sent: float,
) -> None:
    caplog.set_level(logging.DEBUG, logger="core.voice.elevenlabs_body")
    result = await service(http, server, store).generate(
        VoiceJob("Hello there.", model_id="eleven_v3", stability=asked, inject_emotion=False))
    (request,) = server.tts_requests()
    assert request.status == 200 and store.exists(result.filename)
    assert request.json["voice_settings"]["stability"] == sent
    logged = [r.getMessage() for r in caplog.records if r.name == "core.voice.elevenlabs_body"]
    expected = f"stability {asked} sent to eleven_v3 as {sent} (it takes only [0.0, 0.5, 1.0])"
    assert logged == ([] if asked == sent else [expected])


async def test_other_models_get_the_stability_as_asked(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
) -> None:
    await service(http, server, store).generate(
        VoiceJob("Hello there.", model_id="eleven_multilingual_v2", stability=0.3,
                 inject_emotion=False))
    (request,) = server.tts_requests()
    assert request.status == 200 and request.json["voice_settings"]["stability"] == 0.3


async def test_a_profiles_stability_on_v3_is_sent_as_the_nearest_it_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: httpx.AsyncClient,
    server: ElevenLabsServer, store: OutputStore,
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps({"sarah": {"voice_id": SARAH, "model_id": "eleven_v3",
                                              "stability": 0.8, "similarity_boost": 0.7}}))
    voice = build_voice_service(
        load_settings(elevenlabs_api_key=DEFAULT_KEY, elevenlabs_api_url=server.api_url,
                      voice_profiles_path=profiles),
        store, http, sleep=RecordingSleep())
    await voice.generate(VoiceRequested(request_id="p-1", conversation_id="c",
                                        character_id="sarah", text="I missed you so much!"))
    (request,) = server.tts_requests()
    assert request.status == 200
    assert request.json["voice_settings"] == {"stability": 1.0, "similarity_boost": 0.7}
