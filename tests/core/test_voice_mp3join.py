"""Joining MP3 parts into one file: the tags and header frames go, one new header counts all
frames, and every reader sees the sum of the parts (plus under 0.05 s per joint at 44.1 kHz:
the inner parts' encoder delay and padding)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mutagen.mp3
import numpy as np
import pytest
import soundfile

from core.voice import audio_duration, join_mp3
from schemas.errors import InternalError

ID3V2 = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10  # a 10-byte tag of padding
ID3V1 = b"TAG" + b"\x00" * 125


def mp3(seconds: float, rate: int = 44100, pitch: float = 220) -> tuple[bytes, float]:
    n = round(seconds * rate)
    samples = (np.sin(2 * np.pi * pitch * np.arange(n) / rate) * 8000).astype(np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="MP3")
    return buffer.getvalue(), n / rate


def lengths(path: Path) -> tuple[float, float, float]:
    """Duration by libsndfile's header read, by mutagen, and by decoding every sample."""
    audio: Any = mutagen.mp3.MP3(path)  # type: ignore[no-untyped-call]
    decoded, rate = soundfile.read(path)
    return audio_duration(path), float(audio.info.length), len(decoded) / rate


@pytest.mark.parametrize("rate", [44100, 22050])
def test_joined_duration_is_the_sum_of_the_parts(tmp_path: Path, rate: int) -> None:
    parts = [mp3(s, rate, 200 + 50 * i) for i, s in enumerate((1.3, 2.7, 0.4, 1.0))]
    path = tmp_path / "joined.mp3"
    path.write_bytes(join_mp3([data for data, _ in parts]))

    header, independent, decoded = lengths(path)
    total = sum(seconds for _, seconds in parts)
    joints = len(parts) - 1
    assert header == pytest.approx(independent, abs=1e-6) == pytest.approx(decoded, abs=1e-6)
    frame = 1152 if rate >= 32000 else 576  # samples per MPEG-1 / MPEG-2 Layer III frame
    per_joint = (frame + 576 + 529) / rate  # padding < a frame; encoder + decoder delay
    assert total <= header <= total + joints * per_joint


def test_tags_around_the_parts_are_dropped(tmp_path: Path) -> None:
    parts = [mp3(0.5)[0], mp3(0.8, pitch=330)[0]]
    plain = join_mp3(parts)
    tagged = join_mp3([ID3V2 + p + ID3V1 for p in parts])
    assert tagged == plain and b"TAG" not in plain[-128:-125] and not plain.startswith(b"ID3")


def test_one_part_is_kept_as_it_is() -> None:
    data, _ = mp3(0.3)
    assert join_mp3([ID3V2 + data]) == ID3V2 + data


def test_what_cannot_be_joined_is_an_internal_error() -> None:
    with pytest.raises(InternalError, match="no MP3 parts"):
        join_mp3([])
    with pytest.raises(InternalError, match="part 1 holds no MPEG"):
        join_mp3([mp3(0.3)[0], b'{"detail": "not audio"}'])
    with pytest.raises(InternalError, match="differ in sample rate"):
        join_mp3([mp3(0.3, 44100)[0], mp3(0.3, 22050)[0]])
