"""Long text with the settings as shipped: VOICE_MAX_TEXT_CHARS lets a text through that is
longer than what a stitching model takes in one request, so the backend speaks it in parts
stitched by ``request-id`` (against the local ElevenLabs, which refuses a part over the
model's limit as the real API does); a text over VOICE_MAX_TEXT_CHARS is refused before
any upstream call; the setting's bounds; the engine's model facts agree with the server's."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from core.outputs import OutputStore
from core.settings import ConfigurationError, Settings, load_settings
from core.voice import VoiceService, build_voice_service, model_facts
from core.voice.service import DEFAULT_MAX_TEXT_CHARS
from schemas.errors import InvalidRequestError
from schemas.events import VoiceRequested
from tests.support.elevenlabs_server import DEFAULT_KEY, MODELS, ElevenLabsServer, RecordingSleep

SENTENCE = "This is sentence number {} of a long story, told slowly and with care."


def text_over(limit: int) -> str:
    """Whole sentences, a few hundred characters more than ``limit``."""
    sentences: list[str] = []
    i = 0
    while sum(len(s) + 1 for s in sentences) <= limit + 300:
        sentences.append(SENTENCE.format(i))
        i += 1
    return " ".join(sentences)


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults as shipped: no .env, no voice variables from the environment."""
    monkeypatch.chdir(tmp_path)
    for name in ("VOICE_MAX_TEXT_CHARS", "ELEVENLABS_MODEL_ID", "VOICE_BACKEND",
                 "ELEVENLABS_API_KEY", "ELEVENLABS_API_URL", "VOICE_PROFILES_PATH"):
        monkeypatch.delenv(name, raising=False)


def default_service(server: ElevenLabsServer, store: OutputStore, http: httpx.AsyncClient,
                    **overrides: object) -> VoiceService:
    settings = load_settings(elevenlabs_api_key=DEFAULT_KEY, elevenlabs_api_url=server.api_url,
                             **overrides)
    return build_voice_service(settings, store, http, sleep=RecordingSleep())


@pytest.mark.usefixtures("shipped")
@pytest.mark.parametrize("model_id", [None, "eleven_turbo_v2", "eleven_flash_v2_5"])
async def test_with_the_default_settings_a_text_over_the_models_limit_is_stitched(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore, model_id: str | None
) -> None:
    server.seconds_per_char = 0.0001  # short audio: the parts are what is tested
    service = default_service(server, store, http)
    model = model_id or Settings().elevenlabs_model_id  # None: the default model
    text = text_over(MODELS[model])
    result = await service.generate(VoiceRequested(
        request_id="long-1", conversation_id="c", text=text, inject_emotion=False,
        model_id=model_id))

    first, second = server.tts_requests()
    assert (first.status, second.status) == (200, 200)
    assert first.json["model_id"] == second.json["model_id"] == model
    assert first.request_id is not None
    assert "previous_request_ids" not in first.json
    assert second.json["previous_request_ids"] == [first.request_id]
    assert second.json["text"].startswith(first.json["next_text"])
    assert first.json["seed"] == second.json["seed"] == result.seed
    assert f"{first.json['text']} {second.json['text']}" == text == result.enhanced_text
    assert store.exists(result.filename)


@pytest.mark.usefixtures("shipped")
async def test_a_text_over_the_setting_is_refused_before_any_call(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
) -> None:
    service = default_service(server, store, http, voice_max_text_chars=2_000)
    with pytest.raises(InvalidRequestError, match="at most 2000") as refused:
        await service.generate(VoiceRequested(request_id="r", conversation_id="c",
                                              text="x" * 2_001))
    assert refused.value.field == "text"
    assert server.tts_calls == 0
    shipped_service = default_service(server, store, http)
    with pytest.raises(InvalidRequestError, match=f"at most {DEFAULT_MAX_TEXT_CHARS}"):
        await shipped_service.generate(VoiceRequested(
            request_id="r", conversation_id="c", text="x" * (DEFAULT_MAX_TEXT_CHARS + 1)))
    assert server.tts_calls == 0


@pytest.mark.usefixtures("shipped")
@pytest.mark.parametrize("value", ["0", "100001", "many"])
def test_the_setting_is_bounded(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("VOICE_MAX_TEXT_CHARS", value)
    with pytest.raises(ConfigurationError, match="VOICE_MAX_TEXT_CHARS"):
        load_settings()


@pytest.mark.usefixtures("shipped")
def test_the_default_exceeds_every_stitching_models_limit() -> None:
    default = Settings().voice_max_text_chars
    assert default == DEFAULT_MAX_TEXT_CHARS  # the service's own default agrees
    stitching = [m for m in MODELS if model_facts(m).stitching]
    assert set(stitching) == set(MODELS) - {"eleven_v3"}
    assert all(model_facts(m).max_chars < default for m in stitching)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_the_model_facts_agree_with_the_servers_limits(model_id: str) -> None:
    facts = model_facts(model_id)
    assert facts.max_chars == MODELS[model_id]
    assert facts.chunk_chars <= facts.max_chars
    assert facts.stitching == (model_id != "eleven_v3")
    assert facts.performs_audio_tags == (model_id == "eleven_v3")
