"""Splitting a long text into requests a model accepts, at sentence boundaries.

Sentences end at ``.``, ``!``, ``?`` or ``…`` (closing quotes and brackets included)
followed by white space. Whole sentences are packed greedily into chunks of at most
``max_chars`` characters; a sentence longer than that is split at clause punctuation, then
between words, and only a single word longer than a chunk is cut. Audio tags such as
``[whispers softly]`` are never cut. Chunks are slices of the text, stripped, in order.

Each chunk is sent with its neighbours as ``previous_text``/``next_text`` so that the voice
carries on across the joint; :func:`context` trims them to the nearest words.
"""

from __future__ import annotations

import re

__all__ = ["CONTEXT_CHARS", "SENTENCE_END", "context", "split_text"]

CONTEXT_CHARS = 1_000  # of each neighbour; continuity needs the nearby words, not all

SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)]*\s+")
"""The end of a sentence: its punctuation, closing quotes or brackets, and the blanks after."""
_CLAUSE_END = re.compile(r"[,;:—–]\s+")
# white space that is not inside an audio tag (no "]" before the next "[")
_WORD_GAP = re.compile(r"\s+(?![^\[]*\])")


def _pieces(text: str, start: int, end: int, boundary: re.Pattern[str]) -> list[tuple[int, int]]:
    """``text[start:end]`` cut after each match of ``boundary``, as spans."""
    spans: list[tuple[int, int]] = []
    for match in boundary.finditer(text, start, end):
        if match.end() < end:
            spans.append((start, match.end()))
            start = match.end()
    spans.append((start, end))
    return spans


def _fit(text: str, span: tuple[int, int], max_chars: int, level: int) -> list[tuple[int, int]]:
    """``span`` as spans of at most ``max_chars`` (stripped), cut as coarsely as possible."""
    start, end = span
    if len(text[start:end].strip()) <= max_chars:
        return [span]
    if level == 0:
        return [(i, min(i + max_chars, end)) for i in range(start, end, max_chars)]
    boundary = (SENTENCE_END, _CLAUSE_END, _WORD_GAP)[3 - level]
    pieces = _pieces(text, start, end, boundary)
    if len(pieces) == 1:
        return _fit(text, span, max_chars, level - 1)
    packed: list[tuple[int, int]] = []
    for piece in pieces:
        for small in _fit(text, piece, max_chars, level - 1):
            if packed and len(text[packed[-1][0] : small[1]].strip()) <= max_chars:
                packed[-1] = (packed[-1][0], small[1])
            else:
                packed.append(small)
    return packed


def split_text(text: str, max_chars: int) -> list[str]:
    """``text`` as chunks of at most ``max_chars`` characters (see the module docstring).

    A text that fits is one chunk (stripped). Raises ``ValueError`` for ``max_chars`` < 1.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    spans = _fit(text, (0, len(text)), max_chars, 3)
    return [chunk for chunk in (text[a:b].strip() for a, b in spans) if chunk]


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
