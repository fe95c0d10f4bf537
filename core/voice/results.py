"""Remembered voice results: a replay costs nothing twice and sounds the same.

A result is keyed by a fingerprint of what decides the audio: the request's text and
``inject_emotion``, the backend and what else decides its bytes (its ``audio_variant``:
for ElevenLabs the API and ELEVENLABS_OUTPUT_FORMAT), the model, the voice and its
settings as resolved (request, then profile, then defaults), the pronunciation
dictionaries and the seed. The
entry keeps what was actually spoken and the settings actually sent (after emotion
injection), so that once the file was cleaned up a replay asks the backend for exactly the
same audio again, without asking the Persona Engine's LLM again. Entries are small
(≈ 500 bytes) and bounded (RESULT_CACHE_MAX_ENTRIES, least recently used first, in
:class:`~core.remembered.RememberedResults`).

Only requests with a seed are remembered: without one the upstream samples freely, so
there is no "same audio" to answer with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from core.remembered import RememberedResults
from core.voice.backend import VoiceSettings
from core.voice.dictionaries import PronunciationDictionary

__all__ = ["RememberedVoice", "VoiceResults", "voice_fingerprint"]


@dataclass(frozen=True)
class RememberedVoice:
    """A voice output as made: the file, what was spoken and how."""

    audio_id: str
    filename: str
    spoken: str
    duration_seconds: float
    settings: VoiceSettings
    alignment_filename: str | None = None  # the characters' timings, a JSON output


def voice_fingerprint(text: str, inject_emotion: bool, settings: VoiceSettings,
                      backend: str, model_id: str | None, variant: str) -> str:
    """The cache key of a request: ``settings`` as resolved before emotion injection
    (seed included), ``model_id`` the model it runs on (the backend's default when the
    request and profile name none), ``variant`` the backend's ``audio_variant``."""
    content = {
        "text": text, "inject_emotion": inject_emotion, "backend": backend,
        "variant": variant, "model": model_id, "settings": _settings_json(settings),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class VoiceResults:
    """Voice results by fingerprint, stored in ``store``."""

    def __init__(self, store: RememberedResults) -> None:
        self._store = store

    @property
    def shared(self) -> bool:
        """Whether a lookup may ask the object store (then: from a worker thread)."""
        return self._store.shared

    def get(self, key: str) -> RememberedVoice | None:
        """The result remembered under ``key``; ``None`` when none or unreadable (an entry
        of another version of the engine is simply not used)."""
        raw = self._store.get(key)
        if raw is None:
            return None
        try:
            settings = dict(raw["settings"])
            dictionaries = tuple(PronunciationDictionary.model_validate(d)
                                 for d in settings.pop("pronunciation_dictionaries"))
            return RememberedVoice(
                audio_id=str(raw["audio_id"]), filename=str(raw["filename"]),
                spoken=str(raw["spoken"]), duration_seconds=float(raw["duration_seconds"]),
                settings=VoiceSettings(**settings, pronunciation_dictionaries=dictionaries),
                alignment_filename=raw.get("alignment_filename"),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, result: RememberedVoice) -> None:
        """Remember ``result`` under ``key``. Raises ``OSError`` when the disk fails."""
        self._store.put(key, {**asdict(result), "settings": _settings_json(result.settings)})


def _settings_json(settings: VoiceSettings) -> dict[str, Any]:
    fields = asdict(settings)
    fields["pronunciation_dictionaries"] = [
        d.model_dump() for d in settings.pronunciation_dictionaries]
    return fields
