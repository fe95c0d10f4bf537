"""Splitting a long text into requests a model accepts, at sentence boundaries.

Sentences end at ``.``, ``!``, ``?`` or ``…`` followed by white space, or at a sentence
end of a script written without spaces (``。``, ``！``, ``？``, and the like: see
:data:`SENTENCE_END`), closing quotes and brackets included. Chunks of at most
``max_chars`` characters are cut where the text allows, coarsest first:

1. after the last sentence end that fits, unless the sentence after it is longer than a
   chunk by itself;
2. else (in such a sentence) after clause punctuation (``,``, ``;``, ``:``, dashes,
   ``，``, ``、``, ``；``);
3. else between words;
4. else, in a run with none of these (a word longer than a chunk), at the character that
   fills it, moved back so as not to part a character from its combining marks or an
   emoji sequence.

A bracketed group such as ``[whispers softly]`` is never cut, and never parted from the
text after it (an audio tag belongs to what it colours): a cut that would fall inside or
right after one moves to before it. Chunks are slices of the text, stripped, in order.
Splitting is linear in the text's length.

Each chunk is sent with its neighbours as ``previous_text``/``next_text`` (but on v3, which
refuses them) so that the voice carries on across the joint; :func:`context` trims them to
the nearest words.
"""

from __future__ import annotations

import bisect
import re
import unicodedata

__all__ = [
    "CJK_SCRIPTS",
    "CLOSERS",
    "CONTEXT_CHARS",
    "SENTENCE_END",
    "SENTENCE_FINAL",
    "UNSPACED_SCRIPTS",
    "context",
    "split_text",
]

CONTEXT_CHARS = 1_000  # of each neighbour; continuity needs the nearby words, not all

CJK_SCRIPTS = (
    "\u3005-\u3007\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\uff66-\uff9f\U00020000-\U0003134f"
)
"""A character class body: Chinese and Japanese (kana and kanji), whose sentences end at
``。``."""
UNSPACED_SCRIPTS = CJK_SCRIPTS + "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"
"""A character class body: the scripts written without spaces between words
(:data:`CJK_SCRIPTS`, Thai, Lao, Myanmar, Khmer)."""
SENTENCE_FINAL = "。！？｡．‼⁇⁈⁉؟।॥։።။"
"""Sentence-final punctuation other than ``.``, ``!``, ``?`` and ``…`` (full-width, and
other scripts'): a sentence ends there, with or without white space after it."""
CLOSERS = "\"'”’)»›」』）】〕〉》〗〙〛｣"
"""Closing quotes and brackets that belong to the sentence they close."""

SENTENCE_END = re.compile(
    rf"[.!?…]+[{CLOSERS}]*\s+|[!?…]+[{CLOSERS}]*(?=[{UNSPACED_SCRIPTS}])"
    rf"|[{SENTENCE_FINAL}]+[.!?…{SENTENCE_FINAL}{CLOSERS}]*\s*"
)
"""The end of a sentence: its punctuation, closing quotes or brackets, and the blanks
after (needed after ``.!?…``, except that ``!?…`` right before a character of
:data:`UNSPACED_SCRIPTS` ends a sentence too)."""
_CLAUSE_END = re.compile(r"[,;:—–]\s+|[，、；：،؛]\s*")
_WORD_GAP = re.compile(r"\s+")
_BRACKETED = re.compile(r"\[[^\[\]\n]{1,60}\]")
_JOINERS = frozenset("\u200d\ufe0e\ufe0f")  # zero-width joiner, variation selectors


class _Boundaries:
    """Where one level of boundary lets a chunk end (``ends``, before the blanks) and the
    next begin (``starts``), in order; with ``coarser``'s own. None inside a bracketed
    group or right after one (``opened_at``: its start, by its end)."""

    def __init__(self, text: str, pattern: re.Pattern[str], coarser: _Boundaries | None,
                 inside: bytearray, opened_at: dict[int, int]) -> None:
        spans = [] if coarser is None else list(zip(coarser.ends, coarser.starts, strict=True))
        for match in pattern.finditer(text):
            blanks = len(match.group(0)) - len(match.group(0).rstrip())
            spans.append((match.end() - blanks, match.end()))
        self.ends: list[int] = []
        self.starts: list[int] = []
        for end, start in sorted(spans):  # two sorted runs: Timsort merges them, linear
            if self.ends and self.ends[-1] == end:
                continue  # the same blanks, found at two levels
            if 0 < end < len(text) and not inside[end] and end not in opened_at:
                self.ends.append(end)
                self.starts.append(start)


def _unsplittable(text: str, at: int) -> bool:
    """Whether cutting ``text`` before index ``at`` would part a grapheme (a combining mark,
    a joined, varied or skin-toned emoji, a surrogate pair)."""
    after, before = text[at], text[at - 1]
    return (unicodedata.category(after)[0] == "M" or after in _JOINERS
            or before in _JOINERS or "\U0001f3fb" <= after <= "\U0001f3ff"
            or "\ud800" <= before <= "\udbff")


def split_text(text: str, max_chars: int) -> list[str]:
    """``text`` as chunks of at most ``max_chars`` characters (see the module docstring).

    A text that fits is one chunk (stripped). Raises ``ValueError`` for ``max_chars`` < 1.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    stripped = text.strip()
    if len(stripped) <= max_chars:
        return [stripped] if stripped else []
    inside = bytearray(len(text) + 1)  # 1 where a cut would be inside a bracketed group
    opened_at: dict[int, int] = {}
    for match in _BRACKETED.finditer(text):
        inside[match.start() + 1 : match.end()] = bytes([1]) * (match.end() - match.start() - 1)
        opened_at[match.end()] = match.start()
    sentences = _Boundaries(text, SENTENCE_END, None, inside, opened_at)
    clauses = _Boundaries(text, _CLAUSE_END, sentences, inside, opened_at)
    gaps = _Boundaries(text, _WORD_GAP, clauses, inside, opened_at)
    levels = (sentences, clauses, gaps)

    chunks: list[str] = []
    end_of_text = len(text.rstrip())
    start = len(text) - len(text.lstrip())
    while end_of_text - start > max_chars:
        limit = start + max_chars
        end, following = _at_boundary(start, limit, levels, end_of_text, max_chars) \
            or _in_run(text, start, limit, inside, opened_at)
        chunks.append(text[start:end].rstrip())
        start = following
        while text[start].isspace():  # ends before end_of_text, which follows a non-blank
            start += 1
    chunks.append(text[start:end_of_text])
    return [chunk for chunk in chunks if chunk]


def _at_boundary(start: int, limit: int, levels: tuple[_Boundaries, ...], end_of_text: int,
                 max_chars: int) -> tuple[int, int] | None:
    """The chunk from ``start`` cut at the coarsest boundary before ``limit`` whose
    following sentence, clause or word fits a chunk (see the module docstring), as (its
    end, the next chunk's start); ``None`` when none does."""
    for level in levels:
        i = bisect.bisect_right(level.ends, limit) - 1
        if i < 0 or level.ends[i] <= start:
            continue
        following_end = level.ends[i + 1] if i + 1 < len(level.ends) else end_of_text
        if following_end - level.starts[i] <= max_chars:
            return level.ends[i], level.starts[i]
    return None


def _in_run(text: str, start: int, limit: int, inside: bytearray, opened_at: dict[int, int]
            ) -> tuple[int, int]:
    """The chunk from ``start`` cut at ``limit`` inside a run without boundaries, moved back
    out of a grapheme and a bracketed group, then to before the bracketed groups it would
    end with, as far as the chunk keeps something (a grapheme or group longer than a chunk
    is cut at ``limit`` after all)."""
    at = limit
    while at > start and (inside[at] or _unsplittable(text, at)):
        at -= 1
    if at == start:
        return limit, limit
    attached = at
    while True:  # ``attached`` only moves back: linear in the chunk
        content = attached
        while text[content - 1].isspace():  # text[start] is not blank
            content -= 1
        if content not in opened_at:
            return attached, attached
        if opened_at[content] <= start:  # nothing but bracketed groups before
            return at, at
        attached = opened_at[content]


def context(neighbour: str, *, before: bool, limit: int = CONTEXT_CHARS) -> str:
    """The part of a neighbouring chunk that touches the joint: its last ``limit``
    characters when it comes ``before``, its first ones otherwise, cut at a word."""
    if len(neighbour) <= limit:
        return neighbour
    if before:
        tail = neighbour[-limit:]
        return tail.split(" ", 1)[1] if " " in tail else tail
    head = neighbour[:limit]
    return head.rsplit(" ", 1)[0] if " " in head else head
