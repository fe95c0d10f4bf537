"""The local voice end to end in core: real espeak-ng, real MP3 files, read back by mutagen."""

from __future__ import annotations

import asyncio
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import mutagen.mp3
import numpy as np
import pytest

from core.outputs import OutputStore
from core.voice import (
    EspeakSynthesizer,
    LocalVoiceBackend,
    VoiceJob,
    VoiceService,
    VoiceSettings,
    strip_audio_tags,
)
from core.voice.service import DEFAULT_MAX_TEXT_CHARS
from schemas.errors import InternalError, InvalidRequestError, UpstreamUnavailableError
from schemas.events import VoiceRequested

SARAH = "Hello, I'm Sarah! How can I help you today?"
DEFAULT_VOICE = "21m00Tcm4TlvDq8ikWAM"


@pytest.fixture(scope="module")
def synthesizer() -> EspeakSynthesizer:
    return EspeakSynthesizer()


@pytest.fixture
def store(tmp_path: Path) -> OutputStore:
    return OutputStore(tmp_path / "outputs", "http://engine:8000")


@pytest.fixture
def service(synthesizer: EspeakSynthesizer, store: OutputStore) -> VoiceService:
    return VoiceService(LocalVoiceBackend(synthesizer), store, DEFAULT_VOICE)


def mp3_length(path: Path) -> float:
    """The duration as an independent reader (mutagen, not libsndfile) sees it."""
    audio: Any = mutagen.mp3.MP3(path)  # type: ignore[no-untyped-call]
    return float(audio.info.length)


async def test_the_sample_sentence_becomes_a_playable_mp3(
    service: VoiceService, store: OutputStore
) -> None:
    result = await service.generate(VoiceJob(SARAH, stability=0.5, similarity_boost=0.5))

    path = store.resolve(result.filename)
    assert path is not None
    assert result.filename == f"{result.audio_id}.mp3"
    assert result.url == f"http://engine:8000/outputs/{result.filename}"
    assert result.text == SARAH and result.enhanced_text == SARAH
    assert result.voice_id == DEFAULT_VOICE
    assert abs(mp3_length(path) - result.duration_seconds) < 0.05
    assert 0.5 < result.duration_seconds < 10
    assert result.timestamp.endswith("Z") and datetime.fromisoformat(result.timestamp)


async def test_longer_text_gives_longer_audio(service: VoiceService) -> None:
    short = await service.generate(VoiceJob("Hello."))
    long = await service.generate(VoiceJob(f"{SARAH} It is a lovely day for a long walk."))
    assert long.duration_seconds > short.duration_seconds + 1


async def test_audio_tags_are_never_spoken(service: VoiceService) -> None:
    result = await service.generate(VoiceJob("[warmly] Hello [laughs]!", model_id="eleven_v3"))
    assert result.enhanced_text == "Hello!"


async def test_emotion_injection_adds_punctuation_only(service: VoiceService) -> None:
    injected = await service.generate(VoiceJob("[whispers softly] Hello there"))
    plain = await service.generate(VoiceJob("[whispers softly] Hello there", inject_emotion=False))
    assert injected.enhanced_text == "Hello there."
    assert plain.enhanced_text == "Hello there"


async def test_the_requested_voice_id_is_reported_unchanged(service: VoiceService) -> None:
    result = await service.generate(VoiceJob("Hi.", voice_id="EXAVITQu4vr4xnSDxMaL"))
    assert result.voice_id == "EXAVITQu4vr4xnSDxMaL"


async def test_a_voice_requested_event_is_accepted_as_is(service: VoiceService) -> None:
    event = VoiceRequested(request_id="r-1", conversation_id="c-1", text=SARAH, style=0.3)
    result = await service.generate(event)
    assert result.text == SARAH and result.duration_seconds > 0.5


@pytest.mark.parametrize(
    ("job", "field"),
    [
        (VoiceJob(""), "text"),
        (VoiceJob("   \n"), "text"),
        (VoiceJob("[sighs] [laughs]"), "text"),
        (VoiceJob("a" * (DEFAULT_MAX_TEXT_CHARS + 1)), "text"),
        (VoiceJob("Hi.", stability=1.5), "stability"),
        (VoiceJob("Hi.", similarity_boost=-0.1), "similarity_boost"),
        (VoiceJob("Hi.", style=2.0), "style"),
        (VoiceJob("Hi.", voice_id=" "), "voice_id"),
    ],
)
async def test_invalid_requests_are_rejected_before_any_work(
    service: VoiceService, store: OutputStore, job: VoiceJob, field: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await service.generate(job)
    assert caught.value.field == field
    assert os.listdir(store.directory) == []


async def test_concurrent_requests_all_succeed(service: VoiceService, store: OutputStore) -> None:
    texts = [SARAH, "Good morning!", SARAH, "How are you feeling today?"]
    results = await asyncio.gather(*(service.generate(VoiceJob(t)) for t in texts))

    assert len({r.filename for r in results}) == 4
    for result in results:
        path = store.resolve(result.filename)
        assert path is not None
        assert abs(mp3_length(path) - result.duration_seconds) < 0.05
    assert abs(results[0].duration_seconds - results[2].duration_seconds) < 0.05


class _TagPerformingBackend:
    """Speaks like the local engine but claims to perform tags, as ElevenLabs v3 does."""

    def __init__(self, inner: LocalVoiceBackend) -> None:
        self.inner = inner
        self.received: list[str] = []

    @property
    def name(self) -> str:
        return "tags"

    @property
    def audio_variant(self) -> str:
        return self.inner.audio_variant

    def performs_audio_tags(self, model_id: str | None) -> bool:
        return model_id == "eleven_v3"

    async def synthesize_to(self, path: Path, text: str, settings: VoiceSettings) -> None:
        self.received.append(text)
        await self.inner.synthesize_to(path, strip_audio_tags(text), settings)


async def test_tags_reach_only_a_backend_that_performs_them(
    synthesizer: EspeakSynthesizer, store: OutputStore
) -> None:
    backend = _TagPerformingBackend(LocalVoiceBackend(synthesizer))
    service = VoiceService(backend, store, DEFAULT_VOICE)

    v3 = await service.generate(VoiceJob("[warmly] Hello!", model_id="eleven_v3"))
    v2 = await service.generate(VoiceJob("[warmly] Hello!", model_id="eleven_multilingual_v2"))

    assert backend.received == ["[warmly] Hello!", "Hello!"]
    assert v3.enhanced_text == "[warmly] Hello!" and v2.enhanced_text == "Hello!"


class _FailingBackend:
    @property
    def name(self) -> str:
        return "failing"

    @property
    def audio_variant(self) -> str:
        return ""

    def performs_audio_tags(self, model_id: str | None) -> bool:
        return False

    async def synthesize_to(self, path: Path, text: str, settings: VoiceSettings) -> None:
        path.write_bytes(b"\xff\xfb partial mp3")
        raise UpstreamUnavailableError("upstream 503", retry_after=1.0)


async def test_a_failing_backend_leaves_no_file(store: OutputStore) -> None:
    service = VoiceService(_FailingBackend(), store, DEFAULT_VOICE)
    with pytest.raises(UpstreamUnavailableError):
        await service.generate(VoiceJob(SARAH))
    assert os.listdir(store.directory) == []


def test_espeak_gives_mono_int16_and_settings_do_not_leak(
    synthesizer: EspeakSynthesizer,
) -> None:
    normal, rate = synthesizer.synthesize(SARAH)
    synthesizer.synthesize(SARAH, rate=400, pitch=90, pitch_range=100)
    again, _ = synthesizer.synthesize(SARAH)

    assert rate == 22050 and normal.dtype == np.int16 and normal.ndim == 1
    assert np.abs(normal).max() > 1000  # not silence
    assert abs(len(again) - len(normal)) < 0.02 * len(normal)


def test_espeak_voices(synthesizer: EspeakSynthesizer) -> None:
    assert synthesizer.has_voice("en-us") and synthesizer.has_voice("en-us+f3")
    assert not synthesizer.has_voice("en-us+nosuchvariant")
    assert not synthesizer.has_voice("xx-nosuchlanguage")
    assert LocalVoiceBackend(synthesizer).voice == "en-us+f3"
    with pytest.raises(ValueError, match="nosuch"):
        LocalVoiceBackend(synthesizer, voice="nosuch")
    with pytest.raises(InternalError, match="no voice"):
        synthesizer.synthesize("Hi.", voice="nosuch")


def test_a_missing_library_is_a_clear_internal_error(tmp_path: Path) -> None:
    with pytest.raises(InternalError, match="cannot load libespeak-ng"):
        EspeakSynthesizer(str(tmp_path / "libespeak-ng.so"), str(tmp_path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[warmly] Hello", "Hello"),
        ("Hi [laughs], you!", "Hi, you!"),
        ("[whispers softly] I missed you [sighs]...", "I missed you..."),
        ("So [short pause] yes", "So yes"),
        ("Keep [1] and [...] and [this one is far too long to be a tag at all]", None),
        ("  spaced\n\ttext  ", "spaced text"),
    ],
)
def test_strip_audio_tags(text: str, expected: str | None) -> None:
    assert strip_audio_tags(text) == (text if expected is None else expected)


async def test_an_unspaced_scripts_characters_are_timed_one_after_another(
    service: VoiceService,
) -> None:
    # espeak-ng reports a Japanese sentence as one span with an event per character: each
    # character (a word of its own in an unspaced script) must get its own moment
    text = "今日はとても楽しかったです。"
    result = await service.generate(VoiceJob(text))
    assert result.words is not None
    spoken = [w for w in result.words if text[w.char_start:w.char_end].strip("。")]
    assert len(spoken) == len(text) - 1
    starts = [w.start for w in spoken]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert spoken[0].start < 0.5 and spoken[-1].end <= result.duration_seconds + 0.05
