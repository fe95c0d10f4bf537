"""ElevenLabs v3 audio tags (``[warmly]``, ``[laughs]``, ``[whispers softly]``).

An audio tag is a bracketed name from the engine's vocabulary
(:data:`~core.voice.emotion.KNOWN_TAGS`, case and blanks inside the brackets aside): the
tags emotion injection adds, and the ones a caller may write for v3. Other brackets are the
caller's text (``Meet me at [Central Park].``) and are never removed.

Only v3 performs tags; every other model and the local engine would read them aloud, so
:func:`strip_audio_tags` removes them before such a synthesizer sees the text. For a v3 text
split into requests, :func:`moods_in_force` gives each part the mood tag it would otherwise
lose (each request is independent upstream).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence

__all__ = ["MOOD_TAGS", "audio_tags", "moods_in_force", "strip_audio_tags"]

MOOD_TAGS: frozenset[str] = frozenset({
    "whispers", "whispers softly", "softly", "sad", "sorrowful", "crying", "nervous",
    "sheepishly", "annoyed", "angry", "frustrated", "shouting", "sarcastic", "surprised",
    "excited", "happy", "cheerfully", "playfully", "mischievously", "warmly", "tenderly",
    "curious", "thoughtful", "calm",
})
"""Tags that say how to speak what follows (a mood, held until another mood tag). The other
known tags are sounds or pauses (``[laughs]``, ``[sighs]``, ``[short pause]``), performed
once where they stand."""

# Punctuation a removed tag's blanks go with ("Hi [laughs]!" -> "Hi!").
_PUNCTUATION = frozenset(",.!?;:…。、，！？；：")
_BLANKS = re.compile(r"\s+")


@functools.cache
def _audio_tag() -> re.Pattern[str]:
    # imported here: emotion needs backend, which needs timing, which needs this module
    from core.voice.emotion import KNOWN_TAGS

    names = "|".join(re.escape(tag).replace(r"\ ", r"\s+")
                     for tag in sorted(KNOWN_TAGS, key=len, reverse=True))
    return re.compile(rf"\[\s*(?:{names})\s*\]", re.IGNORECASE)


def audio_tags(text: str) -> Iterator[re.Match[str]]:
    """The audio tags of ``text`` (see the module docstring), in order."""
    return _audio_tag().finditer(text)


def strip_audio_tags(text: str) -> str:
    """``text`` without audio tags (see the module docstring), its whitespace collapsed to
    single spaces and trimmed. Other brackets and their words stay as written.

    A tag between two words leaves a blank ("Hi [laughs] you" -> "Hi you"); one before
    punctuation goes with the blanks before it ("Hi [laughs]!" -> "Hi!").
    """
    pieces: list[str] = []
    last = 0
    for match in audio_tags(text):
        kept = text[last : match.start()]
        if text[match.end() : match.end() + 1] in _PUNCTUATION:
            pieces.append(kept.rstrip())
        else:
            pieces += (kept, " ")
        last = match.end()
    pieces.append(text[last:])
    return _BLANKS.sub(" ", "".join(pieces)).strip()


def _tag_name(tag: str) -> str:
    return _BLANKS.sub(" ", tag[1:-1].strip()).lower()


def moods_in_force(parts: Sequence[str]) -> list[str | None]:
    """For each of ``parts`` (a text's consecutive pieces, in order), the mood tag in force
    where it starts, as written (``[sad]``), or ``None``: the last tag of
    :data:`MOOD_TAGS` in the parts before it, ``None`` for the first part and for a part
    that starts with a tag of its own."""
    moods: list[str | None] = []
    mood: str | None = None
    for part in parts:
        starts_tagged = _audio_tag().match(part.lstrip()) is not None
        moods.append(None if starts_tagged or not moods else mood)
        for match in audio_tags(part):
            if _tag_name(match.group(0)) in MOOD_TAGS:
                mood = match.group(0)
    return moods
