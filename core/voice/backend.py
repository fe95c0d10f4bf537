"""What a speech backend is: the seam between :class:`~core.voice.service.VoiceService` and
an engine (the local espeak-ng one, ElevenLabs over HTTP)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.voice.dictionaries import PronunciationDictionary
from core.voice.streams import AudioSink
from core.voice.timing import Alignment

__all__ = ["SEED_MAX", "VoiceBackend", "VoiceSettings"]

SEED_MAX = 4_294_967_295
"""The largest seed ElevenLabs takes ("integer between 0 and 4294967295")."""


@dataclass(frozen=True)
class VoiceSettings:
    """The voice a request asks for, with ElevenLabs' meaning of each field: ``voice_id``
    and ``model_id`` name an ElevenLabs voice and model (``None``: the backend's default
    model); ``stability``, ``similarity_boost`` and ``style`` are within 0..1, ``speed``
    within 0.7..1.2 (1 is normal), ``use_speaker_boost`` a switch; ``None`` for the
    engine's default.

    How it is to be spoken as well: ``seed`` (0..:data:`SEED_MAX`, ``None``: the engine
    samples freely) asks for the same audio again, ``pronunciation_dictionaries`` (at most
    3, the character's) fix how words are said. The local engine is deterministic and
    ignores both. ``output_format`` is ElevenLabs' name of the file to write
    (:mod:`core.voice.formats`; ``None``: the backend's default)."""

    voice_id: str
    model_id: str | None = None
    stability: float | None = None
    similarity_boost: float | None = None
    style: float | None = None
    speed: float | None = None
    use_speaker_boost: bool | None = None
    seed: int | None = None
    pronunciation_dictionaries: tuple[PronunciationDictionary, ...] = ()
    output_format: str | None = None


class VoiceBackend(Protocol):
    """A speech engine that writes one audio file per call, streaming it as it goes."""

    @property
    def name(self) -> str:
        """Short name for logs and ``/health`` (``local``, ``elevenlabs``)."""
        ...

    @property
    def audio_variant(self) -> str:
        """What else decides the bytes this engine writes for a text and its settings
        (ElevenLabs: its API and output format; espeak: its voice and rate). It is part of
        the key a result is remembered under, so that once it changes a replay is spoken
        anew instead of being answered with a file made the old way."""
        ...

    def performs_audio_tags(self, model_id: str | None) -> bool:
        """Whether ``model_id`` on this engine performs audio tags such as ``[warmly]``
        (ElevenLabs v3) instead of reading them aloud; if not, the service strips them."""
        ...

    @property
    def default_output_format(self) -> str:
        """The format of a request that names none (ElevenLabs' name)."""
        ...

    async def synthesize_to(self, path: Path, text: str, settings: VoiceSettings,
                            sink: AudioSink | None = None) -> Alignment | None:
        """Speak ``text`` into a new file at ``path`` in ``settings.output_format``, writing
        the audio to ``sink`` as it is made (when given), and return when each character
        of ``text`` is spoken (``None``: the engine does not say).

        The bytes written to ``sink`` are those of the file: a header that needs the end
        (a WAV file's sizes, a joined MP3's counts) is written over the sink's start with
        ``sink.rewrite`` when the file is complete (:mod:`core.voice.assembly`).
        Raises an :class:`~schemas.errors.EngineError` on failure; the caller removes a
        partly written file.
        """
        ...
