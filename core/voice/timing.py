"""When each character and each word is spoken.

A backend reports an :class:`Alignment` of the text it spoke (ElevenLabs: its
``alignment`` of every character sent; the local voice: espeak-ng's word events, the
word's time given to each of its characters). Parts of a stitched text are joined into one
timeline with :meth:`Alignment.joined`, each part's times shifted by the audio before it.
:meth:`Alignment.as_json` writes every character, with ``null`` times for those without
one, so that reading it back (:meth:`Alignment.of_characters`) needs no matching.

:func:`word_timings` maps the spoken text's timings back onto the caller's text: the words
of both texts (audio tags excluded; in a script written without spaces, such as Chinese,
Japanese or Thai, each character is a word) are matched in order, so that words the engine
added (emotion injection) or punctuation it changed never appear, and every word of the
caller's text does, with its position in that text. A caller's word that matches no spoken word
(an injector that rephrased it) takes the time between its neighbours.

Matching is one walk through both sequences in order (:func:`_in_order`), linear in their
lengths: the texts differ only where the engine added or changed a little, so a bounded
look-ahead finds where they agree again.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from core.voice.chunking import UNSPACED_SCRIPTS
from core.voice.tags import audio_tags
from schemas.events import WordTiming

__all__ = ["Alignment", "word_timings"]


@functools.cache
def _word() -> re.Pattern[str]:
    """A word: one character of a script written without spaces, else letters and digits
    with inner apostrophes or hyphens ("don't", "well-known"); either with its combining
    marks, which ``\\w`` leaves out ("नमस्ते" is one word, "สวัสดี" four characters)."""
    marks = _combining_marks()
    letter = rf"[^\W{UNSPACED_SCRIPTS}]"
    run = rf"{letter}(?:{letter}|[{marks}])*"
    return re.compile(rf"(?=\w)[{UNSPACED_SCRIPTS}][{marks}]*|{run}(?:['’\-]{run})*")


def _combining_marks() -> str:
    """A character class body: every combining mark (categories Mn, Mc, Me) in the running
    Python's Unicode tables (~30 ms, once)."""
    ranges: list[list[int]] = []
    for code in (*range(0x20000), *range(0xE0100, 0xE01F0)):
        if unicodedata.category(chr(code))[0] != "M":
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return "".join(f"{chr(first)}-{chr(last)}" for first, last in ranges)


_T = TypeVar("_T")

LOOKAHEAD = 32
"""How far ahead (items) :func:`_in_order` looks for where two sequences agree again."""
_TIE_BREAK = 4  # items compared to choose between two places that agree


@dataclass(frozen=True)
class Alignment:
    """Per character of ``text``: ``starts[i]``/``ends[i]`` in seconds, ``None`` for a
    character without a time of its own (white space between parts)."""

    text: str
    starts: tuple[float | None, ...]
    ends: tuple[float | None, ...]

    @staticmethod
    def of_characters(text: str, characters: Sequence[str],
                      starts: Sequence[float | None], ends: Sequence[float | None]
                      ) -> Alignment:
        """``text``'s alignment from timed ``characters`` that spell it (ElevenLabs'
        ``alignment``, or :meth:`as_json` read back; a time may be ``None``). Where they
        spell it differently, they are matched in order, in linear time."""
        if len(characters) == len(text) == len(starts) == len(ends) \
                and "".join(characters) == text:
            return Alignment(text, tuple(starts), tuple(ends))
        # one timed entry per character of ``spelled``, even if upstream grouped some
        spelled: list[str] = []
        flat_starts: list[float | None] = []
        flat_ends: list[float | None] = []
        for group, start, end in zip(characters, starts, ends, strict=False):
            spelled += group
            flat_starts += [start] * len(group)
            flat_ends += [end] * len(group)
        mine: list[float | None] = [None] * len(text)
        mine_end: list[float | None] = [None] * len(text)
        for a, b in _in_order(text, spelled):
            if b < len(flat_starts):
                mine[a], mine_end[a] = flat_starts[b], flat_ends[b]
        return Alignment(text, tuple(mine), tuple(mine_end))

    @property
    def end(self) -> float:
        """The last time in it (0 when none)."""
        return max((e for e in self.ends if e is not None), default=0.0)

    def shifted(self, seconds: float) -> Alignment:
        return Alignment(self.text, tuple(None if s is None else s + seconds for s in self.starts),
                         tuple(None if e is None else e + seconds for e in self.ends))

    @staticmethod
    def joined(text: str, parts: Sequence[tuple[int, Alignment]]) -> Alignment:
        """One alignment of ``text`` from ``(position in text, alignment)`` parts, already
        on one timeline; characters no part covers have no time."""
        starts: list[float | None] = [None] * len(text)
        ends: list[float | None] = [None] * len(text)
        for position, part in parts:
            starts[position : position + len(part.text)] = part.starts
            ends[position : position + len(part.text)] = part.ends
        return Alignment(text, tuple(starts[: len(text)]), tuple(ends[: len(text)]))

    def as_json(self) -> dict[str, list[object]]:
        """ElevenLabs' shape, every character of :attr:`text` in order (``null`` times for
        one without a time), so that :meth:`of_characters` reads it back as it is."""
        return {"characters": list(self.text),
                "character_start_times_seconds": [None if s is None else round(s, 4)
                                                  for s in self.starts],
                "character_end_times_seconds": [None if e is None else round(e, 4)
                                                for e in self.ends]}


def _in_order(a: Sequence[_T], b: Sequence[_T]) -> Iterator[tuple[int, int]]:
    """Pairs ``(i, j)`` with ``a[i] == b[j]``, increasing in both, from one walk through
    both. Where they differ, the walk resumes at the nearest place within
    :data:`LOOKAHEAD` items where they agree again, skipping what one of them added (the
    longer agreement wins a tie between the two); with none, both step on (an item
    changed). At most ``2 * LOOKAHEAD * _TIE_BREAK`` comparisons a step: linear in their
    lengths."""
    def agreeing(i: int, j: int) -> int:  # how many items agree from a[i], b[j]
        n = 0
        while n < _TIE_BREAK and i + n < len(a) and j + n < len(b) and a[i + n] == b[j + n]:
            n += 1
        return n

    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            yield i, j
            i += 1
            j += 1
            continue
        for k in range(1, LOOKAHEAD + 1):
            added_in_b = agreeing(i, j + k)
            added_in_a = agreeing(i + k, j)
            if added_in_b or added_in_a:
                if added_in_b >= added_in_a:
                    j += k
                else:
                    i += k
                break
        else:
            i += 1
            j += 1


def _words(text: str) -> list[tuple[int, int]]:
    """Spans of the words of ``text``, audio tags left out."""
    spans: list[tuple[int, int]] = []
    tags = iter([m.span() for m in audio_tags(text)])
    tag = next(tags, None)
    for match in _word().finditer(text):
        while tag is not None and tag[1] <= match.start():
            tag = next(tags, None)
        if tag is None or not tag[0] <= match.start():
            spans.append(match.span())
    return spans


def word_timings(caller_text: str, alignment: Alignment) -> list[WordTiming]:
    """Every word of ``caller_text`` with when ``alignment`` (of the spoken text) says it
    is spoken (see the module docstring); starts never decrease."""
    mine = _words(caller_text)
    spoken = _words(alignment.text)
    times: list[tuple[float, float] | None] = [None] * len(mine)
    for i, j in _in_order([caller_text[a:b].lower() for a, b in mine],
                          [alignment.text[a:b].lower() for a, b in spoken]):
        a, b = spoken[j]
        starts = [s for s in alignment.starts[a:b] if s is not None]
        ends = [e for e in alignment.ends[a:b] if e is not None]
        if starts and ends:
            times[i] = (min(starts), max(ends))
    following: list[float | None] = [None] * len(mine)  # the next timed word's start
    for index in range(len(mine) - 2, -1, -1):
        timed_after = times[index + 1]
        following[index] = timed_after[0] if timed_after is not None \
            else following[index + 1]
    words: list[WordTiming] = []
    floor = 0.0
    for index, (a, b) in enumerate(mine):
        timed = times[index]
        if timed is None:  # between its neighbours
            after = following[index]
            timed = (floor, floor if after is None else max(floor, after))
        start = max(floor, timed[0])
        end = max(start, timed[1])
        floor = start
        words.append(WordTiming(word=caller_text[a:b], start=round(start, 4), end=round(end, 4),
                                char_start=a, char_end=b))
    return words
