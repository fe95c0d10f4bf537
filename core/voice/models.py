"""What the engine knows about ElevenLabs models: whether they perform audio tags, how
many characters one request may carry, and whether they take request stitching.

From ElevenLabs' documentation (FACTS.md): v3 performs tags such as ``[warmly]`` and takes
3,000 characters per request (sent in chunks of at most 2,000 so that the tags and the
model's own margin fit); multilingual v2 takes 10,000; flash and turbo v2.5 take 40,000.
Request stitching (``previous_request_ids``, ElevenLabs' documentation: "not available
for eleven_v3") is used on multilingual v2 and flash/turbo v2.5; v3 gets
``previous_text``/``next_text`` instead. Any other model is treated conservatively: no
tags, 5,000 characters, no stitching (``previous_text``/``next_text`` work everywhere).
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


def model_facts(model_id: str) -> ModelFacts:
    """The facts for ``model_id`` (an ElevenLabs model id such as ``eleven_v3``)."""
    if model_id.startswith("eleven_v3"):
        return ModelFacts(model_id, True, 3_000, 2_000)
    if model_id.endswith(("flash_v2_5", "turbo_v2_5")):
        return ModelFacts(model_id, False, 40_000, 40_000, stitching=True)
    if model_id == "eleven_multilingual_v2":
        return ModelFacts(model_id, False, 10_000, 10_000, stitching=True)
    return ModelFacts(model_id, False, 5_000, 5_000)
