"""Offline speech: libespeak-ng (from the ``espeakng-loader`` wheel) driven in-process via ctypes.

libespeak-ng keeps one synthesizer per loaded library: the selected voice, the rate and
pitch, the synth callback and its output buffer are C globals. Two threads synthesizing at
once would interleave their audio, so every call into a library holds :data:`_LOCK`, and each
library is initialised once per process (:data:`_ENGINES`). These module-level objects
mirror that process-wide C state; they are not configuration.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt

from schemas.errors import InternalError

__all__ = ["DEFAULT_PITCH", "DEFAULT_PITCH_RANGE", "DEFAULT_RATE", "EspeakSynthesizer"]

logger = logging.getLogger(__name__)

DEFAULT_RATE = 175  # words per minute (espeakRATE_NORMAL)
DEFAULT_PITCH = 50  # 0-100, 50 is the voice's own pitch
DEFAULT_PITCH_RANGE = 50  # 0-100, 0 is monotone, 50 the voice's own intonation

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # return errors instead of calling exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4

_EVENT_LIST_TERMINATED, _EVENT_WORD = 0, 1


class _Event(ctypes.Structure):
    """speak_lib.h's espeak_EVENT."""

    _fields_ = [
        ("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int), ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)

_LOCK = threading.Lock()


class _Engine:
    """One initialised libespeak-ng; use only while holding :data:`_LOCK`."""

    def __init__(self, library_path: str, data_path: str) -> None:
        try:
            lib = ctypes.CDLL(library_path)
        except OSError as exc:
            raise InternalError(f"cannot load libespeak-ng from {library_path}: {exc}") from exc
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int

        sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT
        )
        if sample_rate <= 0:
            raise InternalError(f"libespeak-ng failed to initialise with data at {data_path}")
        self.lib = lib
        self.data_path = data_path
        self.sample_rate = int(sample_rate)
        self.chunks: list[bytes] = []
        # word events of the synthesis under way: (text position, 1-based), length, ms
        self.words: list[tuple[int, int, int]] = []
        # ctypes does not keep the C function pointer alive: the library calls it on every
        # synthesis, so this reference must live as long as the library.
        self._callback = _SynthCallback(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(
        self, wav: ctypes._Pointer[ctypes.c_short], count: int,
        events: ctypes._Pointer[_Event] | None,
    ) -> int:
        if count > 0 and wav:
            self.chunks.append(ctypes.string_at(wav, count * 2))
        if events:
            i = 0
            while events[i].type != _EVENT_LIST_TERMINATED:
                event = events[i]
                if event.type == _EVENT_WORD:
                    self.words.append((event.text_position, event.length, event.audio_position))
                i += 1
        return 0  # 0: go on synthesizing


_ENGINES: dict[str, _Engine] = {}


class EspeakSynthesizer:
    """Text to 16-bit mono PCM with espeak-ng; thread-safe (calls are serialised).

    ``library_path`` and ``data_path`` default to the ``espeakng-loader`` wheel's files.
    Raises :class:`InternalError` when the library or its data cannot be loaded.
    """

    def __init__(self, library_path: str | None = None, data_path: str | None = None) -> None:
        if library_path is None or data_path is None:
            import espeakng_loader

            library_path = library_path or espeakng_loader.get_library_path()
            data_path = data_path or espeakng_loader.get_data_path()
        with _LOCK:
            engine = _ENGINES.get(library_path)
            if engine is None:
                engine = _ENGINES[library_path] = _Engine(library_path, data_path)
                logger.info("libespeak-ng loaded from %s (%d Hz)", library_path, engine.sample_rate)
            elif engine.data_path != data_path:
                raise InternalError(
                    f"libespeak-ng at {library_path} is already initialised with data at "
                    f"{engine.data_path}, not {data_path}"
                )
        self._engine = engine

    @property
    def sample_rate(self) -> int:
        return self._engine.sample_rate

    def has_voice(self, name: str) -> bool:
        """Whether ``name`` (``language`` or ``language+variant``) exists in the data.

        espeak silently ignores an unknown variant, hence the explicit file check.
        """
        base, _, variant = name.partition("+")
        if variant and not (Path(self._engine.data_path) / "voices" / "!v" / variant).is_file():
            return False
        with _LOCK:
            return bool(self._engine.lib.espeak_SetVoiceByName(base.encode()) == _EE_OK)

    def synthesize(
        self,
        text: str,
        voice: str = "en-us",
        rate: int | None = None,
        pitch: int | None = None,
        pitch_range: int | None = None,
    ) -> tuple[npt.NDArray[np.int16], int]:
        """Speak ``text``: returns ``(samples, sample_rate)``, samples int16 mono.

        ``rate`` is words per minute (80-450), ``pitch`` and ``pitch_range`` 0-100; ``None``
        means espeak's default. Raises ``ValueError`` for a value out of range and
        :class:`InternalError` for an unknown voice or a failing synthesis.
        """
        samples, sample_rate, _ = self.synthesize_timed(text, voice, rate, pitch, pitch_range)
        return samples, sample_rate

    def synthesize_timed(
        self,
        text: str,
        voice: str = "en-us",
        rate: int | None = None,
        pitch: int | None = None,
        pitch_range: int | None = None,
    ) -> tuple[npt.NDArray[np.int16], int, list[tuple[int, int, float]]]:
        """:meth:`synthesize`, with espeak-ng's word events: ``(start, length, seconds)``
        per word, ``text[start:start + length]`` being the word as espeak read it and
        ``seconds`` when its sound begins. Raises as :meth:`synthesize`."""
        rate = _checked("rate", rate, DEFAULT_RATE, 80, 450)
        pitch = _checked("pitch", pitch, DEFAULT_PITCH, 0, 100)
        pitch_range = _checked("pitch_range", pitch_range, DEFAULT_PITCH_RANGE, 0, 100)
        data = text.replace("\0", " ").encode("utf-8") + b"\0"
        engine, lib = self._engine, self._engine.lib
        with _LOCK:
            if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise InternalError(f"espeak-ng has no voice {voice!r}")
            # The parameters are global: set every one on every call so that nothing of
            # the previous request leaks into this one.
            for parameter, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch),
                                     (_PARAM_RANGE, pitch_range)):  # fmt: skip
                lib.espeak_SetParameter(parameter, value, 0)
            engine.chunks.clear()
            engine.words.clear()
            try:
                status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8,
                                          None, None)  # fmt: skip
                if status == _EE_OK:
                    status = lib.espeak_Synchronize()
                pcm = b"".join(engine.chunks)
                words = list(engine.words)
            finally:
                engine.chunks.clear()
                engine.words.clear()
        if status != _EE_OK:
            raise InternalError(f"espeak-ng synthesis failed with status {status}")
        # the callback delivers C shorts, so native byte order is right
        return (np.frombuffer(pcm, dtype=np.int16), engine.sample_rate,
                [(position - 1, length, ms / 1000) for position, length, ms in words])


def _checked(name: str, value: int | None, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not low <= value <= high:
        raise ValueError(f"{name} must be within {low}..{high}, got {value}")
    return value
