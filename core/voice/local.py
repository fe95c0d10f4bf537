"""The local voice: espeak-ng in-process, encoded via libsndfile. No key, no network.

It writes every format of :mod:`core.voice.formats` and speaks sentence by sentence: each
sentence is encoded on its own and goes to the request's stream as soon as it is
synthesized, and the file is that stream (:mod:`core.voice.assembly`: MP3 sentences
joined frame by frame, Opus page by page, raw samples under one WAV header). The
characters' timings come from espeak-ng's word events: each word's characters from its
start to the next word's start (the sentence's end for the last), shifted to where the
sentence plays in the file.

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

import numpy as np
import numpy.typing as npt

from core.voice.assembly import PartsStream
from core.voice.backend import VoiceSettings
from core.voice.chunking import SENTENCE_END
from core.voice.espeak import DEFAULT_RATE, EspeakSynthesizer
from core.voice.formats import (
    DEFAULT_OUTPUT_FORMAT,
    OutputFormat,
    encode,
    encode_raw,
    format_named,
    resample,
)
from core.voice.streams import AudioSink
from core.voice.timing import Alignment
from schemas.errors import InternalError

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

    @property
    def default_output_format(self) -> str:
        return DEFAULT_OUTPUT_FORMAT

    async def synthesize_to(self, path: Path, text: str, settings: VoiceSettings,
                            sink: AudioSink | None = None) -> Alignment:
        """Speak ``text`` into a file at ``path`` in ``settings.output_format`` (MP3 when
        ``None``), sentence by sentence into ``sink`` (see the module docstring), in
        worker threads (espeak and the encoders release nothing to the event loop).
        Returns the characters' timings. Raises :class:`~schemas.errors.InternalError`
        when synthesis or encoding fails."""
        fmt = format_named(settings.output_format or DEFAULT_OUTPUT_FORMAT)
        sentences = _sentences(text)
        if not sentences:
            raise InternalError("espeak-ng has nothing to speak")
        live = PartsStream(path, sink, fmt, len(sentences))
        timed: list[tuple[int, Alignment]] = []
        try:
            for index, (start, end) in enumerate(sentences):
                samples, words = await asyncio.to_thread(self._sentence, text[start:end],
                                                         settings, fmt)
                if samples.size == 0:  # a sentence of punctuation alone: a moment of silence
                    samples = np.zeros(max(1, fmt.sample_rate // 100), dtype=np.int16)
                await live.write(index, await asyncio.to_thread(_piece, samples, fmt))
                await live.done(index)
                timed.append((start, _aligned(text[start:end], words,
                                              samples.size / fmt.sample_rate)))
            await live.finish()
        finally:
            live.close()
        return Alignment.joined(text, [(position, aligned.shifted(at)) for (position, aligned), at
                                       in zip(timed, live.part_starts(), strict=True)])

    def _sentence(self, text: str, settings: VoiceSettings, fmt: OutputFormat
                  ) -> tuple[npt.NDArray[np.int16], list[tuple[int, int, float]]]:
        stability = 0.5 if settings.stability is None else settings.stability
        style = 0.0 if settings.style is None else settings.style
        speed = 1.0 if settings.speed is None else settings.speed
        samples, sample_rate, words = self._synthesizer.synthesize_timed(
            text,
            voice=self._voice,
            rate=min(450, max(80, round(self._rate * speed * (1 + 0.2 * style)))),
            pitch_range=round(20 + 60 * (1 - stability)),
        )
        return resample(samples, sample_rate, fmt.sample_rate), words


def _sentences(text: str) -> list[tuple[int, int]]:
    """Spans of ``text``'s sentences (each with its end punctuation, no trailing blanks)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in SENTENCE_END.finditer(text):
        spans.append((start, match.end()))
        start = match.end()
    spans.append((start, len(text)))
    return [(a, a + len(text[a:b].rstrip())) for a, b in spans if text[a:b].strip()]


def _aligned(text: str, words: list[tuple[int, int, float]], seconds: float) -> Alignment:
    """Each word's characters timed from its start to the next word's start. espeak-ng
    reports an unspaced script's sentence (Japanese, Chinese) as one span with an event
    per character it reads: the span's characters then take those events in turn."""
    starts: list[float | None] = [None] * len(text)
    ends: list[float | None] = [None] * len(text)
    spans: list[tuple[int, int, list[float]]] = []  # (position, length, event times)
    for position, length, start in words:
        if spans and spans[-1][:2] == (position, length):
            spans[-1][2].append(start)
        else:
            spans.append((position, length, [start]))
    for i, (position, length, times) in enumerate(spans):
        end = spans[i + 1][2][0] if i + 1 < len(spans) else seconds
        marks = [*times, max(times[-1], end)]
        chars = range(max(0, position), min(len(text), position + length))
        for j, k in enumerate(chars):
            event = j * len(times) // len(chars)  # the event this character falls in
            starts[k], ends[k] = marks[event], max(marks[event], marks[event + 1])
    return Alignment(text, tuple(starts), tuple(ends))


def _piece(samples: npt.NDArray[np.int16], fmt: OutputFormat) -> bytes:
    """One sentence as the stream takes it: raw bytes, or a file of its own (at ``fmt``'s
    rate)."""
    return encode_raw(samples, fmt) if fmt.raw else encode(samples, fmt.sample_rate, fmt)
