"""Prompt optimization: the Persona Engine's LLM first, deterministic rules as fallback.

The LoRA's trigger word is always in the final prompt: the optimizer may never drop it.
An LLM answer that is slow, failing, garbage, or that drops the trigger word is replaced by
the rules' prompt, so the result never depends on the LLM being well.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

from core.llm import ChatClient, LLMUnavailable

__all__ = ["OptimizedPrompt", "PromptOptimizer", "rules_prompt", "with_trigger"]

logger = logging.getLogger(__name__)

_SYSTEM = (
    "You rewrite image requests into one prompt for the FLUX.1 text-to-image model. "
    "Keep every subject and detail the user gave, add concrete visual detail (composition, "
    "lighting, lens, style) and quality cues. Answer with the prompt only: one paragraph, "
    "no quotes, no explanations, at most 120 words.{trigger}"
)

_QUALITY = "highly detailed, sharp focus, natural lighting, high quality"
_STYLE_CUES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("portrait", "face", "selfie", "headshot"), "portrait photograph, 85mm lens, shallow depth of field"),
    (("landscape", "mountain", "sunset", "beach", "forest", "ocean"), "wide-angle landscape photograph, golden hour"),
    (("anime", "manga", "cartoon"), "anime illustration, clean line art, vibrant colors"),
    (("painting", "oil", "watercolor"), "fine-art painting, visible brush strokes"),
    (("city", "street", "night", "neon"), "cinematic street photograph, dramatic lighting"),
)
_MAX_WORDS = 200


@dataclass(frozen=True)
class OptimizedPrompt:
    prompt: str
    source: Literal["llm", "rules", "as_given"]


def with_trigger(prompt: str, trigger_word: str | None) -> str:
    """``prompt`` with the trigger word in front unless it is already there as a word."""
    if not trigger_word or re.search(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", prompt,
                                     re.IGNORECASE):
        return prompt
    return f"{trigger_word}, {prompt}"


def rules_prompt(prompt: str, trigger_word: str | None) -> str:
    """Deterministic enhancement: style cues for recognised subjects and quality markers."""
    lowered = prompt.lower()
    parts = [prompt.rstrip(" ,.")]
    for words, cue in _STYLE_CUES:
        if any(re.search(rf"\b{w}\b", lowered) for w in words):
            parts.append(cue)
            break
    if "detailed" not in lowered and "quality" not in lowered:
        parts.append(_QUALITY)
    return with_trigger(", ".join(parts), trigger_word)


class PromptOptimizer:
    """Turns a user prompt into the prompt actually used."""

    def __init__(self, llm: ChatClient | None) -> None:
        self._llm = llm

    async def optimize(self, prompt: str, trigger_word: str | None, enabled: bool
                       ) -> OptimizedPrompt:
        if not enabled:
            return OptimizedPrompt(with_trigger(prompt, trigger_word), "as_given")
        if self._llm is not None:
            hint = (f" The prompt MUST contain the word '{trigger_word}' (it names the "
                    "character).") if trigger_word else ""
            try:
                answer = await self._llm.complete(_SYSTEM.format(trigger=hint), prompt)
            except LLMUnavailable as exc:
                logger.info("prompt optimization falls back to rules: %s", exc)
            else:
                cleaned = _clean(answer)
                if cleaned is not None and (trigger_word is None or
                                            with_trigger(cleaned, trigger_word) == cleaned):
                    return OptimizedPrompt(cleaned, "llm")
                logger.info("prompt optimization falls back to rules: unusable LLM answer")
        return OptimizedPrompt(rules_prompt(prompt, trigger_word), "rules")


def _clean(answer: str) -> str | None:
    text = answer.strip().strip('"').strip()
    text = re.sub(r"^(prompt|here is[^:]*):\s*", "", text, flags=re.IGNORECASE)
    if not text or "\n\n" in text or len(text.split()) > _MAX_WORDS or "<" in text:
        return None
    return " ".join(text.split())
