"""The JSON body of one ElevenLabs text-to-speech request, with what ``eleven_v3`` refuses
left out or made acceptable.

``eleven_v3`` answers 400 ``unsupported_model`` ("Providing previous_text or next_text is
not yet supported with the 'eleven_v3' model.") to a body with ``previous_text`` or
``next_text``, and 400 ``invalid_ttd_stability`` ("Must be one of: [0.0, 0.5, 1.0]") to a
``voice_settings.stability`` other than those three (ElevenLabs' Creative, Natural and
Robust; measured upstream, e.g. pipecat-ai/pipecat#4916). So on v3 a part carries no text
context, and the stability sent is the allowed value nearest to the one asked for (from the
request, the character's profile or an emotion's shift), a tie going to 0.5: below 0.25 is
0.0, above 0.75 is 1.0, the rest 0.5. Every other model gets what it is given.
"""

from __future__ import annotations

import logging
from typing import Any

from core.voice.backend import VoiceSettings
from core.voice.dictionaries import locators

__all__ = ["V3_STABILITIES", "request_body", "v3_stability"]

logger = logging.getLogger(__name__)

V3_STABILITIES = (0.0, 0.5, 1.0)
"""The only stabilities ``eleven_v3`` takes: Creative, Natural, Robust."""

_VOICE_SETTINGS = ("stability", "similarity_boost", "style", "use_speaker_boost", "speed")


def _is_v3(model_id: str) -> bool:
    return model_id.startswith("eleven_v3")


def v3_stability(value: float) -> float:
    """The value of :data:`V3_STABILITIES` nearest to ``value`` (0..1), a tie going to 0.5."""
    if value < 0.25:
        return 0.0
    if value > 0.75:
        return 1.0
    return 0.5


def request_body(
    text: str, model_id: str, settings: VoiceSettings, *,
    previous: str | None = None, following: str | None = None,
) -> dict[str, Any]:
    """The body for ``text`` on ``model_id``: ``voice_settings`` with only the fields given
    (none: left out, the voice's stored settings apply), ``seed`` and
    ``pronunciation_dictionary_locators`` when there are any, and ``previous``/``following``
    as ``previous_text``/``next_text`` where the model takes them (see the module
    docstring)."""
    body: dict[str, Any] = {"text": text, "model_id": model_id}
    voice_settings = {name: value for name in _VOICE_SETTINGS
                      if (value := getattr(settings, name)) is not None}
    stability = voice_settings.get("stability")
    if stability is not None and _is_v3(model_id):
        voice_settings["stability"] = v3_stability(stability)
        if voice_settings["stability"] != stability:
            logger.debug("stability %s sent to %s as %s (it takes only %s)", stability,
                         model_id, voice_settings["stability"], list(V3_STABILITIES))
    if voice_settings:
        body["voice_settings"] = voice_settings
    if settings.seed is not None:
        body["seed"] = settings.seed
    if settings.pronunciation_dictionaries:
        body["pronunciation_dictionary_locators"] = locators(settings.pronunciation_dictionaries)
    if not _is_v3(model_id):
        if previous:
            body["previous_text"] = previous
        if following:
            body["next_text"] = following
    return body
