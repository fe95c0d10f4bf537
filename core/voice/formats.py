"""The audio formats a voice request may ask for: ElevenLabs' ``output_format`` names, and
the file each becomes.

=============================  ===========  ======  ============  ===========================
name                           codec        suffix  content type  from ElevenLabs
=============================  ===========  ======  ============  ===========================
``mp3_{rate}_{kbps}``          MP3          .mp3    audio/mpeg    the file as sent
``opus_48000_{kbps}``          Opus in Ogg  .ogg    audio/ogg     the file as sent
``pcm_{rate}``                 16-bit PCM   .wav    audio/wav     raw samples, given a header
``ulaw_8000``, ``alaw_8000``   G.711        .wav    audio/wav     raw bytes, given a header
=============================  ===========  ======  ============  ===========================

The local voice writes the same formats from espeak-ng's samples (resampled to the
format's rate, linear interpolation); its MP3 and Opus bitrates are the encoders' defaults
(LAME's variable bitrate keeps the exact duration in the file), not the named ones.

A WAV file being streamed does not know its length yet: :func:`wav_header` without a
length writes the sizes as ``0xFFFFFFFF``, what streaming WAV writers use for "until the
end"; once the audio is complete the header with the true sizes (and sample count, for
G.711) is written over it, in the file and in the stream (:mod:`core.voice.assembly`).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
import soundfile

from schemas.errors import InternalError, InvalidRequestError
from schemas.events import VoiceOutputFormat

__all__ = [
    "DEFAULT_OUTPUT_FORMAT", "OUTPUT_FORMATS", "OutputFormat", "encode", "encode_raw",
    "format_named", "resample", "wav_header",
]

Codec = Literal["mp3", "opus", "pcm", "ulaw", "alaw"]

OUTPUT_FORMATS: tuple[str, ...] = get_args(VoiceOutputFormat)
"""Every name ElevenLabs lists (``elevenlabs-openapi-tts.json``, ``output_format``)."""
DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"

_WAV_TAGS = {"pcm": 1, "alaw": 6, "ulaw": 7}  # WAVE_FORMAT_PCM, _ALAW, _MULAW
_UNKNOWN = 0xFFFFFFFF


@dataclass(frozen=True)
class OutputFormat:
    """One of :data:`OUTPUT_FORMATS`, parsed: ``bitrate`` in kbit/s for MP3 and Opus."""

    name: str
    codec: Codec
    sample_rate: int
    bitrate: int | None = None

    @property
    def suffix(self) -> str:
        return {"mp3": "mp3", "opus": "ogg"}.get(self.codec, "wav")

    @property
    def content_type(self) -> str:
        return {"mp3": "audio/mpeg", "opus": "audio/ogg"}.get(self.codec, "audio/wav")

    @property
    def raw(self) -> bool:
        """Whether ElevenLabs sends bare samples, which the engine puts in a WAV file."""
        return self.codec in _WAV_TAGS

    @property
    def bytes_per_sample(self) -> int:
        """Of a raw format (PCM 2, G.711 1)."""
        return 2 if self.codec == "pcm" else 1


def format_named(name: str) -> OutputFormat:
    """The format called ``name``. Raises :class:`InvalidRequestError` naming
    ``output_format`` for any name ElevenLabs does not list."""
    if name not in OUTPUT_FORMATS:
        raise InvalidRequestError(
            f"output_format {name!r} is not one of ElevenLabs' formats ({', '.join(OUTPUT_FORMATS)})",
            field="output_format")
    codec, rate, *kbps = name.split("_")
    return OutputFormat(name, codec, int(rate), int(kbps[0]) if kbps else None)  # type: ignore[arg-type]


def wav_header(fmt: OutputFormat, data_bytes: int | None) -> bytes:
    """A WAV header for ``data_bytes`` of ``fmt``'s raw audio, mono (``None``: a stream of
    unknown length). G.711 gets the ``fact`` chunk its format requires."""
    if not fmt.raw:
        raise ValueError(f"{fmt.name} is not a raw format")
    width = fmt.bytes_per_sample
    extra = b"" if fmt.codec == "pcm" else struct.pack("<H", 0)  # cbSize
    fmt_chunk = struct.pack("<HHIIHH", _WAV_TAGS[fmt.codec], 1, fmt.sample_rate,
                            fmt.sample_rate * width, width, 8 * width) + extra
    chunks = b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk
    if fmt.codec != "pcm":
        samples = _UNKNOWN if data_bytes is None else data_bytes // width
        chunks += b"fact" + struct.pack("<II", 4, samples)
    size = _UNKNOWN if data_bytes is None else data_bytes
    riff = _UNKNOWN if data_bytes is None else 4 + len(chunks) + 8 + data_bytes
    return b"RIFF" + struct.pack("<I", riff) + b"WAVE" + chunks + b"data" + struct.pack("<I", size)


def encode(samples: npt.NDArray[np.int16], sample_rate: int, fmt: OutputFormat) -> bytes:
    """Mono int16 ``samples`` at ``sample_rate`` Hz as a complete file in ``fmt``: for a raw
    format the header and the data; otherwise what the encoder writes.

    Raises :class:`InternalError` when there is nothing to encode or the encoder fails.
    """
    if samples.size == 0:
        raise InternalError("no audio samples to encode")
    samples = resample(samples, sample_rate, fmt.sample_rate)
    data = encode_raw(samples, fmt) if fmt.raw else None
    if data is not None:
        return wav_header(fmt, len(data)) + data
    buffer = io.BytesIO()
    try:
        if fmt.codec == "opus":
            soundfile.write(buffer, samples, fmt.sample_rate, format="OGG", subtype="OPUS")
        else:
            soundfile.write(buffer, samples, fmt.sample_rate, format="MP3")
    except (soundfile.LibsndfileError, TypeError, ValueError) as exc:
        raise InternalError(f"{fmt.name} encoding failed: {exc}") from exc
    return buffer.getvalue()


def encode_raw(samples: npt.NDArray[np.int16], fmt: OutputFormat) -> bytes:
    """``samples`` (already at ``fmt``'s rate) as ``fmt``'s bare bytes, no header."""
    if fmt.codec == "pcm":
        return samples.astype("<i2").tobytes()
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, fmt.sample_rate, format="RAW", subtype=fmt.codec.upper())
    return buffer.getvalue()


def resample(samples: npt.NDArray[np.int16], rate: int, to: int) -> npt.NDArray[np.int16]:
    """``samples`` at ``to`` Hz (linear interpolation; the same array when equal)."""
    if rate == to:
        return samples
    count = max(1, round(samples.size * to / rate))
    positions = np.arange(count) * (rate / to)
    resampled: npt.NDArray[np.int16] = np.interp(
        positions, np.arange(samples.size), samples).astype(np.int16)
    return resampled
