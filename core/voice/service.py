"""The one entry for voice work: a validated request in, an MP3 output and its result out.

The Kafka consumer and the HTTP endpoint both call :meth:`VoiceService.generate`, so the
two paths cannot drift apart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from core.outputs import OutputStore
from core.voice.backend import VoiceBackend, VoiceSettings
from core.voice.emotion import EmotionInjector, PunctuationInjector
from core.voice.mp3 import audio_duration
from core.voice.tags import strip_audio_tags
from schemas.errors import InternalError, InvalidRequestError

__all__ = ["VoiceJob", "VoiceRequestLike", "VoiceResult", "VoiceService"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_TEXT_CHARS = 10_000


class VoiceRequestLike(Protocol):
    """What the service reads of a request: ``VoiceRequested``, the HTTP body model and
    :class:`VoiceJob` all fit."""

    @property
    def text(self) -> str: ...
    @property
    def voice_id(self) -> str | None: ...
    @property
    def stability(self) -> float | None: ...
    @property
    def similarity_boost(self) -> float | None: ...
    @property
    def style(self) -> float | None: ...
    @property
    def model_id(self) -> str | None: ...
    @property
    def inject_emotion(self) -> bool: ...


@dataclass(frozen=True)
class VoiceJob:
    """A plain voice request (the original API's body), for callers without an event."""

    text: str
    voice_id: str | None = None
    stability: float | None = None
    similarity_boost: float | None = None
    style: float | None = None
    model_id: str | None = None
    inject_emotion: bool = True


@dataclass(frozen=True)
class VoiceResult:
    """The original ``/generate/voice`` response: ``text`` as requested, ``enhanced_text``
    as spoken, ``duration_seconds`` read from the written file, ``timestamp`` ISO-8601 UTC."""

    audio_id: str
    filename: str
    text: str
    enhanced_text: str
    voice_id: str
    url: str
    duration_seconds: float
    timestamp: str


class VoiceService:
    """Turns voice requests into MP3 outputs in ``store`` through ``backend``.

    ``default_voice_id`` is used when a request names no voice; ``injector`` rewrites text
    when a request asks for emotion (default: :class:`PunctuationInjector`); texts longer
    than ``max_text_chars`` are rejected. Raises ``ValueError`` for an empty
    ``default_voice_id`` or a ``max_text_chars`` below 1.
    """

    def __init__(
        self,
        backend: VoiceBackend,
        store: OutputStore,
        default_voice_id: str,
        injector: EmotionInjector | None = None,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    ) -> None:
        if not default_voice_id:
            raise ValueError("default_voice_id must not be empty")
        if max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {max_text_chars}")
        self._backend = backend
        self._store = store
        self._default_voice_id = default_voice_id
        self._injector = injector if injector is not None else PunctuationInjector()
        self._max_text_chars = max_text_chars

    @property
    def backend(self) -> VoiceBackend:
        return self._backend

    async def generate(self, request: VoiceRequestLike) -> VoiceResult:
        """Speak ``request.text`` into a new MP3 output and describe it.

        Tags such as ``[warmly]`` reach the backend only if it performs them for the
        requested model; ``enhanced_text`` is exactly what was sent to the backend.

        Raises :class:`InvalidRequestError` (before any work) for a text that is empty once
        audio tags are removed, or too long, or a voice setting outside 0..1; the backend's
        :class:`~schemas.errors.EngineError` as raised; :class:`InternalError` when the
        output cannot be written or read back. A failed request leaves no file.
        """
        settings = self._settings(request)
        plain = self._checked_text(request.text)

        text = request.text
        if request.inject_emotion:
            text = await self._injector.inject(text, settings.model_id)
        if self._backend.performs_audio_tags(settings.model_id):
            spoken = text.strip()
        else:
            spoken = strip_audio_tags(text)
        if not strip_audio_tags(spoken):
            logger.warning("emotion injection returned no speech; speaking the text as given")
            spoken = plain

        duration = 0.0

        async def write(path: Path) -> None:
            nonlocal duration
            await self._backend.synthesize_to(path, spoken, settings)
            # from the file itself, not from the samples: a header read, ~0.1 ms
            duration = audio_duration(path)

        try:
            stored = await self._store.write_with_async(write, "mp3")
        except OSError as exc:
            raise InternalError(f"cannot write the voice output: {exc}") from exc
        logger.debug("voice %s: %d chars, %.3f s", stored.filename, len(spoken), duration)
        return VoiceResult(
            audio_id=stored.file_id,
            filename=stored.filename,
            text=request.text,
            enhanced_text=spoken,
            voice_id=settings.voice_id,
            url=stored.url,
            duration_seconds=round(duration, 3),
            timestamp=_iso_utc(stored.created_at),
        )

    def _settings(self, request: VoiceRequestLike) -> VoiceSettings:
        for field in ("stability", "similarity_boost", "style"):
            value = getattr(request, field)
            if value is not None and not 0.0 <= value <= 1.0:
                raise InvalidRequestError(f"{field} must be within 0..1, got {value}", field=field)
        if request.voice_id is not None and not request.voice_id.strip():
            raise InvalidRequestError("voice_id must not be blank", field="voice_id")
        return VoiceSettings(
            voice_id=request.voice_id if request.voice_id is not None else self._default_voice_id,
            model_id=request.model_id,
            stability=request.stability,
            similarity_boost=request.similarity_boost,
            style=request.style,
        )

    def _checked_text(self, text: str) -> str:
        if len(text) > self._max_text_chars:
            raise InvalidRequestError(
                f"text has {len(text)} characters, at most {self._max_text_chars} are allowed",
                field="text",
            )
        plain = strip_audio_tags(text)
        if not plain:
            raise InvalidRequestError(
                "text is empty (audio tags alone are not speech)", field="text"
            )
        return plain


def _iso_utc(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
