"""Deterministic emotion injection: keywords, emoji and punctuation decide, per sentence.

For each sentence (ending at ``.``, ``!``, ``?`` or ``…``, or at a full-width or other
script's sentence end such as ``。``: :data:`~core.voice.chunking.SENTENCE_FINAL`):

1. its emotion is that of an audio tag it already has (``[sighs]``, or a roleplay action
   such as ``*sighs*``), else the first of :data:`~core.voice.emotion.EMOTIONS` whose cues
   it shows (``haha``/😂 laughing, ``secret``/🤫 whispering, ``sorry``/``miss you``/😢 sad,
   ``ugh``/``tired`` sighing, ``worried`` nervous, ``angry`` annoyed, ``wow``/``no way``
   surprised, ``amazing``/``yay``/``!!``/🎉 excited, ``love``/``dear``/❤️ warm, and a
   question starting with what/how/why curious);
2. emoji are removed (they carry emotion, not words);
3. with tags: the sentence is prefixed with its emotion's tag, unless it has a tag already
   or the previous sentence got the same one; without tags: every tag goes, and a sentence
   ending in a plain ``.`` takes the emotion's ending (``!`` or ``...``).

The text then ends with sentence punctuation (``。`` and the like count; where there is
none, a full stop is added, ``。`` after Chinese or Japanese, so that synthesizers end on a
falling intonation), and the most frequent emotion is the one the settings follow. Words
are never added, removed or changed; sentences stay apart as they were (one space where
there was white space, none where a sentence ended at ``。`` or the like without any).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

from core.voice.chunking import CJK_SCRIPTS, CLOSERS, SENTENCE_END, SENTENCE_FINAL
from core.voice.emotion import EMOTIONS, Emotion, Expression, emotion_of_tag
from core.voice.tags import strip_audio_tags

__all__ = ["RulesEmotionInjector", "actions_to_tags", "remove_emoji"]

_TAG = re.compile(r"\[([A-Za-z][A-Za-z '\-]{0,29})\]")
_ACTION = re.compile(r"\*([A-Za-z][A-Za-z ]{0,29})\*")
_TERMINAL = re.compile(rf"[.!?…{SENTENCE_FINAL}][{CLOSERS}\]]*$")
_CJK = re.compile(f"[{CJK_SCRIPTS}]")
_PLAIN_END = re.compile(rf"(?<![.…])\.([{CLOSERS}]*)$")
_EMOJI = re.compile(
    "[\U0001f000-\U0001faff\U00002600-\U000027bf\U0001f1e6-\U0001f1ff\ufe0f\u200d]+"
)
_BLANKS = re.compile(r"[ \t]{2,}")


def _cues(words: str, emoji: str) -> re.Pattern[str]:
    return re.compile(rf"{words}|[{emoji}]", re.IGNORECASE)


_CUES: dict[str, re.Pattern[str]] = {
    "laughing": _cues(r"\b(?:ha){2,}h?\b|\b(?:he){2,}\b|\blol\b|\blmao\b|\brofl\b",
                      "\U0001f602\U0001f923\U0001f606\U0001f639"),
    "whispering": _cues(r"\bsecrets?\b|\bwhisper|\bdon'?t tell\b|\bbetween (?:you and me|us)\b"
                        r"|\bquietly\b", "\U0001f92b"),
    "sad": _cues(r"\bsorry\b|\bsad\b|\bmiss(?:ed)? you\b|\blonely\b|\bcry(?:ing)?\b"
                 r"|\bunfortunately\b|\bheartbroken\b",
                 "\U0001f622\U0001f62d\U0001f614\U0001f61e\U0001f494\U0001f97a"),
    "sighing": _cues(r"\bsigh\b|\bugh\b|\btired\b|\bexhausted\b|\bwhat a day\b",
                     "\U0001f629"),
    "nervous": _cues(r"\bnervous\b|\banxious\b|\bscared\b|\bafraid\b|\bworried\b",
                     "\U0001f62c\U0001f630\U0001f628"),
    "annoyed": _cues(r"\bangry\b|\bfurious\b|\bannoy\w*|\bhate\b",
                     "\U0001f620\U0001f621\U0001f644"),
    "surprised": _cues(r"\bwow\b|\bwhoa\b|\boh my\b|\bno way\b|\breally\?",
                       "\U0001f62e\U0001f632\U0001f62f\U0001f92f"),
    "excited": _cues(r"\bamazing\b|\bawesome\b|\byay\b|\bcan'?t wait\b|\bexcited\b"
                     r"|\bfantastic\b|\bincredible\b|\bhooray\b|!!",
                     "\U0001f389\U0001f929\U0001f973\u2728"),
    "warm": _cues(r"\blove\b|\bdear\b|\bsweetheart\b|\bhoney\b|\bdarling\b|\bhugs?\b"
                  r"|\bglad\b|\bthank you\b|\bproud of you\b",
                  "\u2764\U0001f970\U0001f60a\U0001f495\U0001f496\U0001f618\U0001f917"),
    "curious": re.compile(r"^\W*(?:what|how|why|tell me|i wonder|do you)\b.*\?\W*$|\U0001f914",
                          re.IGNORECASE | re.DOTALL),
}


def _sentences(text: str) -> Iterator[str]:
    """``text`` cut after each sentence end of :data:`~core.voice.chunking.SENTENCE_END`,
    the blanks after an end going with the sentence they precede."""
    start = 0
    for match in SENTENCE_END.finditer(text):
        end = match.start() + len(match.group().rstrip())
        yield text[start:end]
        start = end
    yield text[start:]


def remove_emoji(text: str) -> str:
    """``text`` without emoji (pictographs, flags, variation selectors, joiners)."""
    return _BLANKS.sub(" ", _EMOJI.sub("", text)).strip()


def _detect(sentence: str) -> Emotion | None:
    for match in _TAG.finditer(sentence):
        emotion = emotion_of_tag(match.group(1))
        if emotion is not None:
            return emotion
    for name, pattern in _CUES.items():
        if pattern.search(sentence):
            return EMOTIONS[name]
    return None


def actions_to_tags(text: str) -> str:
    """``*sighs*`` → ``[sighs]`` for actions that are known tags; other ``*…*`` stay."""
    return _ACTION.sub(
        lambda m: f"[{m.group(1).lower()}]" if emotion_of_tag(m.group(1)) is not None
        or m.group(1).lower() in ("pause", "calm") else m.group(0),
        text,
    )


class RulesEmotionInjector:
    """:class:`~core.voice.emotion.EmotionInjector` by the rules of the module docstring."""

    async def express(self, text: str, performs_tags: bool) -> Expression:
        return self.apply(text, performs_tags)

    def apply(self, text: str, performs_tags: bool) -> Expression:
        """The rules on ``text`` (synchronous: no I/O)."""
        text = actions_to_tags(text)
        pieces: list[str] = []
        seen: list[Emotion] = []
        last_tag: str | None = None
        for raw in _sentences(text):
            if not raw.strip():
                continue
            found = _detect(raw)
            sentence = remove_emoji(raw)
            if not strip_audio_tags(sentence):  # emoji or tags alone: nothing to say
                if found is not None:
                    seen.append(found)
                continue
            if found is not None:
                seen.append(found)
            if performs_tags:
                has_tag = _TAG.search(sentence) is not None
                if found is not None and not has_tag and found.tag != last_tag:
                    sentence = f"[{found.tag}] {sentence}"
                if has_tag or found is not None:
                    last_tag = found.tag if found is not None else last_tag
            else:
                sentence = strip_audio_tags(sentence)
                if found is not None and found.ending:
                    sentence = _PLAIN_END.sub(rf"{found.ending}\1", sentence)
            pieces.append(f" {sentence}" if raw[:1].isspace() else sentence)
        spoken = "".join(pieces).lstrip()
        if spoken and not _TERMINAL.search(spoken):
            spoken += "。" if _CJK.match(spoken[-1]) else "."
        dominant = None
        if seen:
            counts = Counter(e.name for e in seen)
            dominant = EMOTIONS[max(counts, key=lambda n: (counts[n], -_first(seen, n)))]
        return Expression(spoken, dominant, "rules")


def _first(seen: list[Emotion], name: str) -> int:
    return next(i for i, e in enumerate(seen) if e.name == name)
