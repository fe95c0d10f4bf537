"""Emotion injection: rewriting text so that it is spoken with feeling.

:class:`EmotionInjector` is the seam; an LLM-backed, model-aware injector (audio tags for
ElevenLabs v3, punctuation for the rest) plugs in here. Whatever an injector returns, the
service strips audio tags before a backend that would read them aloud.
"""

from __future__ import annotations

import re
from typing import Protocol

__all__ = ["EmotionInjector", "PunctuationInjector"]

_TERMINAL = re.compile(r"[.!?…]['\")\]]*$")


class EmotionInjector(Protocol):
    async def inject(self, text: str, model_id: str | None) -> str:
        """``text`` rewritten for expressive speech by ``model_id`` (``None``: the
        backend's default model). Must not fail for lack of an upstream: fall back to
        returning rules-based text (or ``text`` itself)."""
        ...


class PunctuationInjector:
    """Deterministic rules only, never audio tags: text that does not end a sentence gets
    a full stop, so that synthesizers end on a falling intonation instead of hanging."""

    async def inject(self, text: str, model_id: str | None) -> str:
        text = text.strip()
        if text and not _TERMINAL.search(text):
            return f"{text}."
        return text
