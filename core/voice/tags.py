"""ElevenLabs v3 audio tags (``[warmly]``, ``[laughs]``, ``[whispers softly]``).

Only v3 performs them; every other model and the local engine would read them aloud, so
they are stripped before such a synthesizer sees the text.
"""

from __future__ import annotations

import re

__all__ = ["AUDIO_TAG", "strip_audio_tags"]

# A tag is a short bracketed group of letters, spaces, hyphens and apostrophes starting with
# a letter; bracketed digits or punctuation ("[1]", "[...]") are left alone.
_TAG = r"\[[A-Za-z][A-Za-z '\-]{0,29}\]"
AUDIO_TAG = re.compile(_TAG)
"""One audio tag, anywhere in a text."""
# A tag right before punctuation goes with the blanks before it ("Hi [laughs]!" -> "Hi!").
_TAG_BEFORE_PUNCTUATION = re.compile(rf"\s*{_TAG}(?=[,.!?;:])")
_BLANKS = re.compile(r"\s+")


def strip_audio_tags(text: str) -> str:
    """``text`` without audio tags, its whitespace collapsed to single spaces and trimmed.

    Text without tags only has its whitespace normalised.
    """
    text = _TAG_BEFORE_PUNCTUATION.sub("", text)
    text = AUDIO_TAG.sub(" ", text)
    return _BLANKS.sub(" ", text).strip()
