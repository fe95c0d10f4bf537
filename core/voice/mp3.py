"""MP3 files without ffmpeg: the ``soundfile`` wheel's libsndfile encodes with LAME.

The default variable bitrate writes a LAME/Xing header, so a reader gets the exact duration
back from the file (``soundfile.info``, ``mutagen`` and players agree).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile

from schemas.errors import InternalError

__all__ = ["audio_duration", "write_mp3"]


def write_mp3(path: Path, samples: npt.NDArray[np.int16], sample_rate: int) -> None:
    """Encode mono int16 ``samples`` at ``sample_rate`` Hz as an MP3 file at ``path``.

    Raises :class:`InternalError` when there is nothing to encode or libsndfile fails.
    """
    if samples.size == 0:
        raise InternalError("no audio samples to encode")
    try:
        soundfile.write(path, samples, sample_rate, format="MP3")
    except (soundfile.LibsndfileError, TypeError, ValueError) as exc:
        raise InternalError(f"MP3 encoding failed: {exc}") from exc


def audio_duration(path: Path) -> float:
    """The playing time in seconds of the MP3 file at ``path``, as read from the file.

    Raises :class:`InternalError` when the file is not a readable MP3.
    """
    try:
        return float(soundfile.info(path).duration)
    except (RuntimeError, OSError) as exc:  # LibsndfileError is a RuntimeError
        raise InternalError(f"cannot read the duration of {path.name}: {exc}") from exc
