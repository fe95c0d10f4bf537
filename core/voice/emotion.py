"""Emotion injection: what it promises, and the emotions it knows.

Model-aware (DESIGN.md, Voice): a model that performs audio tags (ElevenLabs v3) gets the
emotion as tags in the text (``[warmly] I missed you.``); every other model and the local
engine would read tags aloud, so there the emotion becomes voice settings (lower stability,
more style, another speed; :func:`shift_settings`) and punctuation, and the text carries no
tags. Injectors are :class:`EmotionInjector`: the deterministic rules
(:class:`~core.voice.emotion_rules.RulesEmotionInjector`) and the Persona Engine's LLM with
the rules as fallback (:class:`~core.voice.emotion_llm.LLMEmotionInjector`).

Each emotion, with its v3 tag, its settings shift (added to stability and style, the base
being the request's or profile's value, else 0.5 and 0; speed is multiplied, base 1.0) and
the punctuation a plain sentence end becomes:

============  ============  =========  =====  =====  ======
emotion       v3 tag        stability  style  speed  ending
============  ============  =========  =====  =====  ======
laughing      [laughs]      -0.25      +0.35  ×1.05  !
whispering    [whispers]    +0.15      0      ×0.90
sad           [sad]         +0.10      +0.10  ×0.90  ...
sighing       [sighs]       +0.05      +0.10  ×0.92  ...
nervous       [nervous]     -0.20      +0.10  ×1.08
annoyed       [annoyed]     -0.15      +0.30  ×1.05  !
surprised     [surprised]   -0.20      +0.25  ×1.05  !
excited       [excited]     -0.20      +0.30  ×1.08  !
warm          [warmly]      -0.05      +0.15  ×0.97
curious       [curious]     -0.10      +0.10  ×1.00
============  ============  =========  =====  =====  ======
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from core.voice.backend import VoiceSettings

__all__ = [
    "EMOTIONS",
    "KNOWN_TAGS",
    "Emotion",
    "EmotionInjector",
    "Expression",
    "emotion_of_tag",
    "shift_settings",
]


@dataclass(frozen=True)
class Emotion:
    name: str
    tag: str
    stability: float
    style: float
    speed: float
    ending: str | None = None


EMOTIONS: dict[str, Emotion] = {
    e.name: e
    for e in (
        Emotion("laughing", "laughs", -0.25, 0.35, 1.05, "!"),
        Emotion("whispering", "whispers", 0.15, 0.0, 0.90),
        Emotion("sad", "sad", 0.10, 0.10, 0.90, "..."),
        Emotion("sighing", "sighs", 0.05, 0.10, 0.92, "..."),
        Emotion("nervous", "nervous", -0.20, 0.10, 1.08),
        Emotion("annoyed", "annoyed", -0.15, 0.30, 1.05, "!"),
        Emotion("surprised", "surprised", -0.20, 0.25, 1.05, "!"),
        Emotion("excited", "excited", -0.20, 0.30, 1.08, "!"),
        Emotion("warm", "warmly", -0.05, 0.15, 0.97),
        Emotion("curious", "curious", -0.10, 0.10, 1.00),
    )
}
"""The emotions, in the order the rules prefer them when a sentence shows several."""

# Tags v3 performs that suit a companion (a subset of ElevenLabs' documented set), each
# with the emotion it expresses for a model that cannot perform it (None: no shift).
_TAG_EMOTIONS: dict[str, str | None] = {
    "laughs": "laughing", "laughs harder": "laughing", "starts laughing": "laughing",
    "giggles": "laughing", "chuckles": "laughing", "wheezing": "laughing",
    "snorts": "laughing",
    "whispers": "whispering", "whispers softly": "whispering", "softly": "whispering",
    "sad": "sad", "crying": "sad", "sorrowful": "sad", "sniffles": "sad",
    "sighs": "sighing", "exhales": "sighing", "yawns": "sighing",
    "nervous": "nervous", "hesitates": "nervous", "sheepishly": "nervous",
    "annoyed": "annoyed", "angry": "annoyed", "frustrated": "annoyed", "shouting": "annoyed",
    "sarcastic": "annoyed",
    "surprised": "surprised", "gasps": "surprised",
    "excited": "excited", "happy": "excited", "cheerfully": "excited",
    "playfully": "excited", "mischievously": "excited",
    "warmly": "warm", "tenderly": "warm",
    "curious": "curious", "thoughtful": "curious",
    "calm": None, "pause": None, "short pause": None, "long pause": None,
    "clears throat": None, "breathes": None,
}
KNOWN_TAGS: frozenset[str] = frozenset(_TAG_EMOTIONS)
"""Audio tags an injector may add (lower case, without brackets)."""


def emotion_of_tag(tag: str) -> Emotion | None:
    """The emotion a tag such as ``whispers softly`` (no brackets) expresses, if known."""
    name = _TAG_EMOTIONS.get(tag.strip().lower())
    return EMOTIONS[name] if name is not None else None


@dataclass(frozen=True)
class Expression:
    """What an injector made of a text: ``text`` to speak (with tags only when the model
    performs them), the dominant ``emotion`` (``None``: neutral) that
    :func:`shift_settings` applies for a model without tags, and its ``source``
    (``rules`` or ``llm``)."""

    text: str
    emotion: Emotion | None = None
    source: str = "rules"


class EmotionInjector(Protocol):
    async def express(self, text: str, performs_tags: bool) -> Expression:
        """``text`` made expressive for a model that does (``performs_tags``) or does not
        perform audio tags. Must keep every word of ``text`` and never fail for lack of an
        upstream (fall back to rules)."""
        ...


def _clamp(value: float, low: float, high: float) -> float:
    return round(min(high, max(low, value)), 3)


def shift_settings(
    settings: VoiceSettings, emotion: Emotion | None, keep: frozenset[str] = frozenset()
) -> VoiceSettings:
    """``settings`` shifted by ``emotion`` (see the table above), except the fields named
    in ``keep`` (those a request set explicitly). Results stay within 0..1 (speed
    0.7..1.2)."""
    if emotion is None:
        return settings
    stability, style, speed = settings.stability, settings.style, settings.speed
    if emotion.stability and "stability" not in keep:
        stability = _clamp((0.5 if stability is None else stability) + emotion.stability, 0, 1)
    if emotion.style and "style" not in keep:
        style = _clamp((0.0 if style is None else style) + emotion.style, 0, 1)
    if emotion.speed != 1.0 and "speed" not in keep:
        speed = _clamp((1.0 if speed is None else speed) * emotion.speed, 0.7, 1.2)
    return replace(settings, stability=stability, style=style, speed=speed)
