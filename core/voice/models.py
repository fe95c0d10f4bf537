"""What the engine knows about ElevenLabs models: whether they perform audio tags, how
many characters one request may carry, and whether they take request stitching.

Per-request character limits (FACTS.md and ElevenLabs' models page): v3 3,000 (sent in
chunks of at most 2,000 so that the tags and the model's own margin fit); multilingual v2
10,000; flash and turbo v2 (English) 30,000; flash and turbo v2.5 40,000. The voices API
also lists the flash models as ``eleven_v2_flash`` and ``eleven_v2_5_flash``
(``high_quality_base_model_ids`` in ``elevenlabs-openapi-tts.json``): same facts.

Request stitching (``previous_request_ids``; ElevenLabs: "not available for eleven_v3")
is used on every one of these but v3, which refuses ``previous_text``/``next_text`` too
(400 ``unsupported_model``): its parts go without context. Any other model is treated
conservatively: no tags, 5,000 characters, no stitching (``previous_text``/``next_text``
only).

A text longer than a model's limit is spoken in parts only if the engine accepts it at
all: VOICE_MAX_TEXT_CHARS (:class:`~core.voice.service.VoiceService`) must exceed the
limit for the parts, and so the stitching, to happen.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelFacts", "model_facts"]


@dataclass(frozen=True)
class ModelFacts:
    """``max_chars`` is upstream's per-request limit, ``chunk_chars`` the most the backend
    sends in one request (at most ``max_chars``); ``stitching`` whether the model takes
    ``previous_request_ids``/``next_request_ids``."""

    model_id: str
    performs_audio_tags: bool
    max_chars: int
    chunk_chars: int
    stitching: bool = False


# models that stitch, by id: characters per request
_STITCHING_LIMITS: dict[str, int] = {
    "eleven_multilingual_v2": 10_000,
    "eleven_flash_v2": 30_000,
    "eleven_turbo_v2": 30_000,
    "eleven_v2_flash": 30_000,
    "eleven_flash_v2_5": 40_000,
    "eleven_turbo_v2_5": 40_000,
    "eleven_v2_5_flash": 40_000,
}
_OTHER_LIMIT = 5_000


def model_facts(model_id: str) -> ModelFacts:
    """The facts for ``model_id`` (an ElevenLabs model id such as ``eleven_v3``)."""
    if model_id.startswith("eleven_v3"):
        return ModelFacts(model_id, True, 3_000, 2_000)
    limit = _STITCHING_LIMITS.get(model_id)
    if limit is not None:
        return ModelFacts(model_id, False, limit, limit, stitching=True)
    return ModelFacts(model_id, False, _OTHER_LIMIT, _OTHER_LIMIT)
