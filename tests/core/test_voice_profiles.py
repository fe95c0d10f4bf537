"""Voice profiles per character (request > profile > defaults) and choosing the backend from
settings (VOICE_BACKEND, the key, PERSONA_ENGINE_URL, VOICE_PROFILES_PATH)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.outputs import OutputStore
from core.settings import ConfigurationError, Settings, load_settings
from core.voice import VoiceJob, VoiceProfiles, build_voice_service
from schemas.errors import EngineError, ErrorCode
from schemas.events import VoiceRequested
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, RecordingSleep
from tests.support.persona_server import PersonaLLMServer

RACHEL = "21m00Tcm4TlvDq8ikWAM"
SARAH = "EXAVITQu4vr4xnSDxMaL"
LIAM = "TX3LPaxmHKxFdv7VOQHJ"
PROFILES = {
    "sarah": {"voice_id": SARAH, "model_id": "eleven_v3", "stability": 0.4,
              "similarity_boost": 0.9, "use_speaker_boost": True, "speed": 1.1},
    "liam": {"voice_id": LIAM},
}


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.chdir(tmp_path)  # no stray .env

    def make(**overrides: Any) -> Settings:
        return load_settings(**overrides)

    return make


def profiles_file(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "voice_profiles.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


async def test_profile_fills_what_the_request_leaves_out_and_the_request_wins(
    settings: Any, server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore,
    tmp_path: Path,
) -> None:
    service = build_voice_service(
        settings(elevenlabs_api_key=DEFAULT_KEY, elevenlabs_api_url=server.api_url,
                 voice_profiles_path=profiles_file(tmp_path, PROFILES)),
        store, http, sleep=RecordingSleep(),
    )
    sarah = await service.generate(VoiceRequested(
        request_id="1", conversation_id="c", character_id="sarah", text="Hi.",
        inject_emotion=False))
    override = await service.generate(VoiceRequested(
        request_id="2", conversation_id="c", character_id="sarah", text="Hi.",
        inject_emotion=False, voice_id=RACHEL, stability=0.8, model_id="eleven_multilingual_v2"))
    liam = await service.generate(VoiceJob("Hi.", character_id="liam", inject_emotion=False))
    stranger = await service.generate(VoiceJob("Hi.", character_id="nobody",
                                               inject_emotion=False))

    first, second, third, fourth = server.tts_requests()
    assert (sarah.voice_id, first.voice_id) == (SARAH, SARAH)
    assert first.json["model_id"] == "eleven_v3"
    # the profile's stability 0.4, as v3 takes it (0.0, 0.5 or 1.0: the nearest)
    assert first.json["voice_settings"] == {"stability": 0.5, "similarity_boost": 0.9,
                                            "use_speaker_boost": True, "speed": 1.1}
    assert (override.voice_id, second.json["model_id"]) == (RACHEL, "eleven_multilingual_v2")
    assert second.json["voice_settings"] == {"stability": 0.8, "similarity_boost": 0.9,
                                             "use_speaker_boost": True, "speed": 1.1}
    assert (liam.voice_id, third.json) == (LIAM, {"text": "Hi.",
                                                  "model_id": "eleven_multilingual_v2"})
    assert (stranger.voice_id, fourth.voice_id) == (RACHEL, RACHEL)


async def test_a_profile_model_decides_whether_tags_are_performed(
    settings: Any, server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore,
    tmp_path: Path,
) -> None:
    service = build_voice_service(
        settings(elevenlabs_api_key=DEFAULT_KEY, elevenlabs_api_url=server.api_url,
                 voice_profiles_path=profiles_file(tmp_path, PROFILES)),
        store, http, sleep=RecordingSleep(),
    )
    v3 = await service.generate(VoiceJob("Haha, hi!", character_id="sarah"))
    v2 = await service.generate(VoiceJob("Haha, hi!", character_id="liam"))
    assert v3.enhanced_text == "[laughs] Haha, hi!" and v2.enhanced_text == "Haha, hi!"


@pytest.mark.parametrize(
    ("content", "in_message"),
    [
        ("{not json", "not JSON"),
        ([1, 2], "the top level"),
        ({"sarah": {"stability": 2}}, "sarah.stability"),
        ({"sarah": {"speed": 0.2}}, "sarah.speed"),
        ({"sarah": {"voice": "x"}}, "sarah.voice"),
        ({"sarah": {"voice_id": " "}}, "sarah.voice_id"),
        ({"sarah": "EXAVITQu4vr4xnSDxMaL"}, "sarah"),
    ],
)
def test_an_invalid_profiles_file_stops_start_up_with_one_line(
    tmp_path: Path, content: Any, in_message: str
) -> None:
    path = profiles_file(tmp_path, content)
    with pytest.raises(ConfigurationError) as caught:
        VoiceProfiles.load(path)
    message = str(caught.value)
    assert "\n" not in message and "VOICE_PROFILES_PATH" in message and str(path) in message
    assert in_message in message


def test_a_missing_profiles_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read it"):
        VoiceProfiles.load(tmp_path / "nope.json")


# --- choosing the backend ---


async def test_auto_picks_elevenlabs_with_a_key_and_local_without(
    settings: Any, store: OutputStore, http: httpx.AsyncClient
) -> None:
    def backend(**overrides: Any) -> str:
        return build_voice_service(settings(**overrides), store, http).backend.name

    assert backend() == "local"
    assert backend(elevenlabs_api_key="k") == "elevenlabs"
    assert backend(elevenlabs_api_key="k", voice_backend="local") == "local"
    assert build_voice_service(settings(), store).backend.name == "local"  # the old 2-arg call


@pytest.mark.parametrize("key", [None, "", "   "])
async def test_elevenlabs_without_a_key_is_a_one_line_configuration_error(
    settings: Any, store: OutputStore, http: httpx.AsyncClient, key: str | None
) -> None:
    overrides: dict[str, Any] = {"voice_backend": "elevenlabs"}
    if key is not None:
        overrides["elevenlabs_api_key"] = key
    with pytest.raises(ConfigurationError) as caught:
        build_voice_service(settings(**overrides), store, http)
    message = str(caught.value)
    assert "\n" not in message and "ELEVENLABS_API_KEY" in message and "VOICE_BACKEND" in message


def test_elevenlabs_needs_the_engines_http_client(settings: Any, store: OutputStore) -> None:
    with pytest.raises(ValueError, match="httpx.AsyncClient"):
        build_voice_service(settings(elevenlabs_api_key="k"), store)


async def test_persona_engine_url_puts_the_llm_in_front_of_the_rules(
    settings: Any, store: OutputStore, http: httpx.AsyncClient
) -> None:
    llm = PersonaLLMServer()
    await llm.start()
    try:
        llm.reply = lambda messages: "warm"
        service = build_voice_service(settings(persona_engine_url=llm.url), store, http)
        result = await service.generate(VoiceJob("See you soon"))
    finally:
        await llm.stop()
    assert len(llm.received) == 1 and result.enhanced_text == "See you soon."


async def test_the_built_elevenlabs_service_reports_upstream_codes(
    settings: Any, server: ElevenLabsServer, http: httpx.AsyncClient, store: OutputStore
) -> None:
    service = build_voice_service(
        settings(elevenlabs_api_key="sk_wrong", elevenlabs_api_url=server.api_url),
        store, http, sleep=RecordingSleep())
    with pytest.raises(EngineError) as caught:
        await service.generate(VoiceJob("Hi."))
    assert caught.value.code == ErrorCode.UPSTREAM_REJECTED
    assert service.quota is not None
