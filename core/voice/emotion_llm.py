"""Emotion injection by the Persona Engine's LLM, validated, with the rules as fallback.

- For a model that performs tags, the LLM rewrites the text with audio tags. The answer is
  used only if it keeps every word of the text in order (tags, emoji, case and punctuation
  aside) and every tag it adds is a known one (:data:`~core.voice.emotion.KNOWN_TAGS`, or a
  tag the text already had).
- For any other model, the LLM names the emotion (one word from the list); the settings
  follow it, and the punctuation follows the rules.

Any other answer, an LLM that is slow or down (:class:`~core.llm.LLMUnavailable`), or a text
longer than ``max_chars`` (too slow to rewrite within a short timeout) leaves the work to
:class:`~core.voice.emotion_rules.RulesEmotionInjector`.
"""

from __future__ import annotations

import logging
import re

from core.llm import ChatClient, LLMUnavailable
from core.voice.emotion import EMOTIONS, KNOWN_TAGS, Expression, emotion_of_tag
from core.voice.emotion_rules import RulesEmotionInjector, actions_to_tags, remove_emoji
from core.voice.tags import strip_audio_tags

__all__ = ["LLMEmotionInjector"]

logger = logging.getLogger(__name__)

_TAG = re.compile(r"\[([A-Za-z][A-Za-z '\-]{0,29})\]")
_WORD = re.compile(r"[\w']+")
_FENCE = re.compile(r"^```\w*\s*|\s*```$")

_TAGS_PROMPT = (
    "You prepare a line that a companion character is about to say for ElevenLabs v3, "
    "which performs audio tags. Add audio tags where they make the emotion audible, right "
    "before the words they colour, at most one per sentence. Allowed tags: "
    + ", ".join(f"[{tag}]" for tag in sorted(KNOWN_TAGS))
    + ". Keep every word exactly as given and in the same order; you may only add tags and "
    "adjust punctuation. Answer with the line only."
)
_LABEL_PROMPT = (
    "Name the emotion with which a companion character says the user's line. Answer with "
    "exactly one word from: " + ", ".join([*EMOTIONS, "neutral"]) + "."
)


def _words(text: str) -> list[str]:
    return _WORD.findall(strip_audio_tags(remove_emoji(text)).lower())


class LLMEmotionInjector:
    """:class:`~core.voice.emotion.EmotionInjector` asking ``chat`` first (see the module
    docstring); ``rules`` is the fallback. Raises ``ValueError`` for ``max_chars`` < 1."""

    def __init__(
        self, chat: ChatClient, rules: RulesEmotionInjector | None = None, max_chars: int = 1_000
    ) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self._chat = chat
        self._rules = rules if rules is not None else RulesEmotionInjector()
        self._max_chars = max_chars

    async def express(self, text: str, performs_tags: bool) -> Expression:
        if len(text) <= self._max_chars:
            try:
                found = await (self._tagged(text) if performs_tags else self._labelled(text))
            except LLMUnavailable as exc:
                logger.info("emotion LLM unavailable (%s); using the rules", exc.message)
            else:
                if found is not None:
                    return found
        return self._rules.apply(text, performs_tags)

    async def _tagged(self, text: str) -> Expression | None:
        reply = await self._chat.complete(_TAGS_PROMPT, text, max_tokens=len(text) // 2 + 64)
        candidate = _FENCE.sub("", reply).strip().strip('"').strip()
        original = actions_to_tags(text)
        allowed = KNOWN_TAGS | {t.lower() for t in _TAG.findall(original)}
        tags = [t.lower() for t in _TAG.findall(candidate)]
        if _words(candidate) != _words(original) or any(t not in allowed for t in tags):
            logger.info("emotion LLM changed the words or used unknown tags; using the rules")
            return None
        emotion = next((e for e in map(emotion_of_tag, tags) if e is not None), None)
        return Expression(remove_emoji(candidate), emotion, "llm")

    async def _labelled(self, text: str) -> Expression | None:
        reply = await self._chat.complete(_LABEL_PROMPT, text, max_tokens=8, temperature=0.0)
        label = reply.strip().strip(".\"'").lower()
        if label != "neutral" and label not in EMOTIONS:
            logger.info("emotion LLM answered %r, not an emotion; using the rules", label[:40])
            return None
        punctuated = self._rules.apply(text, performs_tags=False)
        return Expression(punctuated.text, EMOTIONS.get(label), "llm")
