"""Voice profiles: each character's voice, model and settings, from one JSON file.

The file (VOICE_PROFILES_PATH) maps ``character_id`` to a profile; every field is optional::

    {
      "sarah": {"voice_id": "EXAVITQu4vr4xnSDxMaL", "model_id": "eleven_v3",
                "stability": 0.5, "similarity_boost": 0.8, "style": 0.2,
                "use_speaker_boost": true, "speed": 1.0},
      "max":   {"voice_id": "TX3LPaxmHKxFdv7VOQHJ",
                "pronunciation_dictionaries": [{"id": "5xM3yVvZQKV0EfqQpLrJ",
                                                "version_id": "Kx7bA0Gz2F9r4wYlQpTe"}]}
    }

``pronunciation_dictionaries`` (at most 3, each ``{id, version_id}``, ``version_id``
optional: the latest) are sent with every request of that character
(:mod:`core.voice.dictionaries`).

A request's own fields win over its character's profile, which wins over the defaults
(DEFAULT_VOICE_ID, ELEVENLABS_MODEL_ID). A character without a profile just gets the
defaults. The file is read once, at start-up: an unreadable or invalid file stops start-up
with a :class:`~core.settings.ConfigurationError` naming the file and the first bad field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from core.settings import ConfigurationError
from core.voice.dictionaries import MAX_DICTIONARIES, PronunciationDictionary

__all__ = ["VoiceProfile", "VoiceProfiles"]

_Unit = Annotated[float, Field(ge=0.0, le=1.0)]
_Id = Annotated[str, Field(min_length=1, pattern=r"\S")]


class VoiceProfile(BaseModel):
    """One character's voice; ``None`` fields fall through to the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    voice_id: _Id | None = None
    model_id: _Id | None = None
    stability: _Unit | None = None
    similarity_boost: _Unit | None = None
    style: _Unit | None = None
    use_speaker_boost: bool | None = None
    speed: Annotated[float, Field(ge=0.7, le=1.2)] | None = None
    pronunciation_dictionaries: Annotated[
        tuple[PronunciationDictionary, ...], Field(max_length=MAX_DICTIONARIES)] = ()


_FILE = TypeAdapter(dict[_Id, VoiceProfile])


class VoiceProfiles:
    """Profiles by ``character_id`` (an empty set when none are configured)."""

    def __init__(self, profiles: Mapping[str, VoiceProfile] | None = None) -> None:
        self._profiles = dict(profiles or {})

    @classmethod
    def load(cls, path: Path) -> VoiceProfiles:
        """The profiles in the JSON file at ``path``.

        Raises :class:`ConfigurationError` (one line: the variable, the file, what is wrong)
        when it cannot be read, is not JSON, or a profile is invalid.
        """
        prefix = f"invalid configuration: VOICE_PROFILES_PATH={str(path)!r}"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"{prefix} (cannot read it: {exc.strerror})") from None
        except ValueError as exc:
            raise ConfigurationError(f"{prefix} (not JSON: {exc})") from None
        try:
            profiles = _FILE.validate_python(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the top level"
            raise ConfigurationError(
                f"{prefix} ({where}: {first['msg']}; expected an object of character_id to "
                "{voice_id, model_id, stability, similarity_boost, style, use_speaker_boost, "
                "speed, pronunciation_dictionaries: at most 3 of {id, version_id}})"
            ) from None
        return cls(profiles)

    def get(self, character_id: str | None) -> VoiceProfile | None:
        """The profile of ``character_id``, or ``None``."""
        return self._profiles.get(character_id) if character_id else None

    def __len__(self) -> int:
        return len(self._profiles)
