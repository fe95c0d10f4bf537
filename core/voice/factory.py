"""Choosing and building the voice core from settings (``VOICE_BACKEND`` and friends)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import httpx

from core.answers import Answers
from core.backoff import Backoff
from core.llm import ChatClient
from core.outputs import OutputStore
from core.remembered import RememberedResults
from core.settings import ConfigurationError, Settings
from core.storage import ObjectStore
from core.voice.backend import VoiceBackend
from core.voice.elevenlabs import ElevenLabsBackend, Sleep
from core.voice.emotion import EmotionInjector
from core.voice.emotion_llm import LLMEmotionInjector
from core.voice.emotion_rules import RulesEmotionInjector
from core.voice.espeak import EspeakSynthesizer
from core.voice.formats import OUTPUT_FORMATS
from core.voice.local import LocalVoiceBackend
from core.voice.profiles import VoiceProfiles
from core.voice.quota import QuotaMonitor
from core.voice.results import VoiceResults
from core.voice.service import VoiceService
from core.voice.streams import AudioStreams
from schemas.errors import EngineError

__all__ = ["build_voice_service"]

logger = logging.getLogger(__name__)


def build_voice_service(
    settings: Settings,
    store: OutputStore,
    http: httpx.AsyncClient | None = None,
    *,
    objects: ObjectStore | None = None,
    sleep: Sleep = asyncio.sleep,
    on_retry: Callable[[EngineError], None] | None = None,
) -> VoiceService:
    """The voice core for these settings.

    - Backend: ElevenLabs when ``settings.use_elevenlabs`` (``VOICE_BACKEND=elevenlabs``, or
      ``auto`` with ELEVENLABS_API_KEY set), on ``http``, with its quota monitor; the local
      espeak-ng voice otherwise.
    - Emotion: the Persona Engine's LLM (on ``http``) with the rules as fallback when
      PERSONA_ENGINE_URL is set, the rules alone otherwise.
    - Profiles: read from VOICE_PROFILES_PATH when set.
    - Remembered results: ``{store}/.voice-results``, at most RESULT_CACHE_MAX_ENTRIES;
      which requests they answered: ``{store}/.answers/voice``, as many.
    - Texts of at most VOICE_MAX_TEXT_CHARS characters.
    - Live streams spooled in ``{store}/.voice-streams/{instance}``, named
      ``{VOICE_STREAM_BASE_URL or PUBLIC_BASE_URL}/streams/voice/{VOICE_STREAM_INSTANCE or
      the host name}/{id}``, kept VOICE_STREAM_LINGER_SECONDS after they end.

    ``http`` is the engine's shared client (the caller closes it); ``sleep`` is how the
    ElevenLabs backend waits between retries (tests pass a recorder). Its retries follow
    RETRY_MAX_ATTEMPTS, RETRY_BASE_DELAY and RETRY_MAX_DELAY, the consume loop's policy:
    a Kafka request brings the loop's budget, an HTTP one gets its own, which tells
    ``on_retry`` of each retry it grants (``engine_retries_total``; a Kafka request's
    budget tells the consume loop's listener).

    Raises :class:`ConfigurationError` (one line) when ElevenLabs is selected with an empty
    key or no key, ELEVENLABS_OUTPUT_FORMAT is not one of ElevenLabs' formats, or the
    profiles file is unreadable or invalid; ``ValueError`` when
    ElevenLabs is selected but no ``http`` client is given. (Without ``http`` the LLM is
    not used: the rules alone inject emotion, and a warning says so.)
    """
    profiles = (
        VoiceProfiles.load(settings.voice_profiles_path)
        if settings.voice_profiles_path is not None else VoiceProfiles()
    )
    injector: EmotionInjector = RulesEmotionInjector()
    if settings.persona_engine_url and http is None:
        logger.warning("PERSONA_ENGINE_URL is set but no HTTP client was given: emotion "
                       "injection uses the rules only")
    elif settings.persona_engine_url and http is not None:
        chat = ChatClient(http, settings.persona_engine_url, settings.persona_engine_model,
                          settings.persona_engine_timeout)
        injector = LLMEmotionInjector(chat)

    backend: VoiceBackend
    quota: QuotaMonitor | None = None
    if settings.use_elevenlabs:
        key = settings.elevenlabs_api_key
        if key is None or not key.get_secret_value().strip():
            shown = "unset" if key is None else "''"
            raise ConfigurationError(
                f"invalid configuration: ELEVENLABS_API_KEY is {shown} but "
                f"VOICE_BACKEND={settings.voice_backend!r} selects ElevenLabs (allowed: a "
                "non-empty key, or VOICE_BACKEND='local' with the key unset)"
            )
        if settings.elevenlabs_output_format not in OUTPUT_FORMATS:
            raise ConfigurationError(
                f"invalid configuration: ELEVENLABS_OUTPUT_FORMAT="
                f"{settings.elevenlabs_output_format!r} is not one of ElevenLabs' formats "
                f"({', '.join(OUTPUT_FORMATS)})")
        elevenlabs = ElevenLabsBackend(
            _require(http),
            settings.elevenlabs_api_url,
            key,
            default_model_id=settings.elevenlabs_model_id,
            output_format=settings.elevenlabs_output_format,
            max_concurrency=settings.elevenlabs_max_concurrency,
            account_concurrency=settings.elevenlabs_account_concurrency,
            adaptive_concurrency=settings.elevenlabs_adaptive_concurrency,
            timeout=httpx.Timeout(settings.elevenlabs_timeout,
                                  connect=min(5.0, settings.elevenlabs_timeout)),
            retry=Backoff(max_attempts=settings.retry_max_attempts,
                          base_delay=settings.retry_base_delay,
                          max_delay=settings.retry_max_delay),
            sleep=sleep,
            on_retry=on_retry,
        )
        backend, quota = elevenlabs, QuotaMonitor(elevenlabs)
    else:
        backend = LocalVoiceBackend(EspeakSynthesizer())
    results = VoiceResults(RememberedResults(store.directory / ".voice-results",
                                             max_entries=settings.result_cache_max_entries,
                                             shared=objects, namespace="results/voice"))
    answers = Answers(RememberedResults(store.directory / ".answers" / "voice",
                                        max_entries=settings.result_cache_max_entries,
                                        shared=objects, namespace="results/answers/voice"))
    instance = settings.voice_stream_instance or _host_name()
    streams = AudioStreams(store.directory / ".voice-streams",
                           settings.voice_stream_base_url or settings.public_base_url, instance,
                           linger=settings.voice_stream_linger_seconds)
    return VoiceService(backend, store, settings.default_voice_id, injector,
                        settings.voice_max_text_chars, profiles=profiles, quota=quota,
                        results=results, answers=answers, streams=streams)


def _host_name() -> str:
    """This host's name, as a stream URL may carry it."""
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return name[:100] or "engine"


def _require(http: httpx.AsyncClient | None) -> httpx.AsyncClient:
    if http is None:
        raise ValueError(
            "the ElevenLabs backend needs the engine's httpx.AsyncClient: "
            "build_voice_service(settings, store, http)"
        )
    return http
