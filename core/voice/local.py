"""The local voice: espeak-ng in-process, MP3 via libsndfile. No key, no network.

ElevenLabs voice ids mean nothing to espeak, so every request speaks with the one configured
espeak voice; the service still reports the requested ``voice_id``. The voice settings map
deterministically onto espeak's prosody:

- ``stability`` (default 0.5) sets the pitch range: ``20 + 60 * (1 - stability)``, so 0.5 is
  espeak's own intonation (50), 1.0 steady (20), 0.0 lively (80);
- ``style`` (default 0) speeds speech up by up to 20 %: ``rate * (1 + 0.2 * style)``;
- ``speed`` (default 1) multiplies the rate too; the result stays within espeak's 80..450
  words per minute;
- ``similarity_boost`` and ``use_speaker_boost`` have no local meaning and are ignored.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from core.voice.backend import VoiceSettings
from core.voice.espeak import DEFAULT_RATE, EspeakSynthesizer
from core.voice.mp3 import write_mp3

__all__ = ["FALLBACK_VOICE", "PREFERRED_VOICE", "LocalVoiceBackend"]

logger = logging.getLogger(__name__)

PREFERRED_VOICE = "en-us+f3"  # a female variant, closer to the companion than the default
FALLBACK_VOICE = "en-us"


class LocalVoiceBackend:
    """A :class:`~core.voice.backend.VoiceBackend` speaking through ``synthesizer``.

    ``voice`` is an espeak voice name (``language`` or ``language+variant``); ``None``
    picks :data:`PREFERRED_VOICE` when the bundled data has it, else :data:`FALLBACK_VOICE`.
    ``rate`` is the base speed in words per minute. Raises ``ValueError`` naming the voice
    when it does not exist, or a rate espeak does not accept.
    """

    def __init__(
        self, synthesizer: EspeakSynthesizer, voice: str | None = None, rate: int = DEFAULT_RATE
    ) -> None:
        if voice is None:
            voice = PREFERRED_VOICE if synthesizer.has_voice(PREFERRED_VOICE) else FALLBACK_VOICE
        if not synthesizer.has_voice(voice):
            raise ValueError(f"espeak voice {voice!r} does not exist in the espeak-ng data")
        if not 80 <= rate <= 375:  # 375 * 1.2 is espeak's maximum, 450
            raise ValueError(f"rate must be within 80..375 words per minute, got {rate}")
        self._synthesizer = synthesizer
        self._voice = voice
        self._rate = rate

    @property
    def name(self) -> str:
        return "local"

    @property
    def voice(self) -> str:
        """The espeak voice every request speaks with."""
        return self._voice

    @property
    def audio_variant(self) -> str:
        return f"espeak {self._voice} {self._rate}"

    def performs_audio_tags(self, model_id: str | None) -> bool:
        return False  # espeak would read "[warmly]" aloud

    async def synthesize_to(self, path: Path, text: str, settings: VoiceSettings) -> None:
        """Speak ``text`` into an MP3 at ``path``, in a worker thread (espeak and LAME release
        nothing to the event loop). Raises :class:`~schemas.errors.InternalError` when
        synthesis or encoding fails."""
        await asyncio.to_thread(self._synthesize_file, path, text, settings)

    def _synthesize_file(self, path: Path, text: str, settings: VoiceSettings) -> None:
        stability = 0.5 if settings.stability is None else settings.stability
        style = 0.0 if settings.style is None else settings.style
        speed = 1.0 if settings.speed is None else settings.speed
        samples, sample_rate = self._synthesizer.synthesize(
            text,
            voice=self._voice,
            rate=min(450, max(80, round(self._rate * speed * (1 + 0.2 * style)))),
            pitch_range=round(20 + 60 * (1 - stability)),
        )
        write_mp3(path, samples, sample_rate)
