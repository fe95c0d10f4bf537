"""When each character and each word is spoken.

A backend reports an :class:`Alignment` of the text it spoke (ElevenLabs: its
``alignment`` of every character sent; the local voice: espeak-ng's word events, the
word's time given to each of its characters). Parts of a stitched text are joined into one
timeline with :meth:`Alignment.joined`, each part's times shifted by the audio before it.

:func:`word_timings` maps the spoken text's timings back onto the caller's text: the words
of both texts (audio tags excluded) are matched in order, so that words the engine added
(emotion injection) or punctuation it changed never appear, and every word of the caller's
text does, with its position in that text. A caller's word that matches no spoken word
(an injector that rephrased it) takes the time between its neighbours.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.events import WordTiming

__all__ = ["Alignment", "word_timings"]

# a word: letters/digits with inner apostrophes or hyphens ("don't", "well-known")
_WORD = re.compile(r"\w+(?:['’\-]\w+)*")
_TAG = re.compile(r"\[[A-Za-z][A-Za-z '\-]{0,29}\]")


@dataclass(frozen=True)
class Alignment:
    """Per character of ``text``: ``starts[i]``/``ends[i]`` in seconds, ``None`` for a
    character without a time of its own (white space between parts)."""

    text: str
    starts: tuple[float | None, ...]
    ends: tuple[float | None, ...]

    @staticmethod
    def of_characters(text: str, characters: Sequence[str], starts: Sequence[float],
                      ends: Sequence[float]) -> Alignment:
        """``text``'s alignment from timed ``characters`` that spell it (ElevenLabs'
        ``alignment``); characters are matched to ``text`` where they differ."""
        spelled = "".join(characters)
        if spelled == text and len(characters) == len(text):
            return Alignment(text, tuple(starts), tuple(ends))
        # one timed entry per character of ``spelled``, even if upstream grouped some
        flat_starts: list[float] = []
        flat_ends: list[float] = []
        for char, start, end in zip(characters, starts, ends, strict=False):
            flat_starts += [start] * len(char)
            flat_ends += [end] * len(char)
        mine: list[float | None] = [None] * len(text)
        mine_end: list[float | None] = [None] * len(text)
        matcher = difflib.SequenceMatcher(None, text, spelled, autojunk=False)
        for a, b, size in matcher.get_matching_blocks():
            for k in range(size):
                if b + k < len(flat_starts):
                    mine[a + k], mine_end[a + k] = flat_starts[b + k], flat_ends[b + k]
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
        """ElevenLabs' shape, for the characters that have a time."""
        kept = [i for i, s in enumerate(self.starts) if s is not None]
        return {"characters": [self.text[i] for i in kept],
                "character_start_times_seconds": [round(self.starts[i] or 0.0, 4) for i in kept],
                "character_end_times_seconds": [round(self.ends[i] or 0.0, 4) for i in kept]}


def _words(text: str) -> list[tuple[int, int]]:
    """Spans of the words of ``text``, audio tags left out."""
    spans: list[tuple[int, int]] = []
    tags = [m.span() for m in _TAG.finditer(text)]
    for match in _WORD.finditer(text):
        if not any(a <= match.start() < b for a, b in tags):
            spans.append(match.span())
    return spans


def word_timings(caller_text: str, alignment: Alignment) -> list[WordTiming]:
    """Every word of ``caller_text`` with when ``alignment`` (of the spoken text) says it
    is spoken (see the module docstring); starts never decrease."""
    mine = _words(caller_text)
    spoken = _words(alignment.text)
    times: list[tuple[float, float] | None] = [None] * len(mine)
    matcher = difflib.SequenceMatcher(
        None, [caller_text[a:b].lower() for a, b in mine],
        [alignment.text[a:b].lower() for a, b in spoken], autojunk=False)
    for i, j, size in matcher.get_matching_blocks():
        for k in range(size):
            a, b = spoken[j + k]
            starts = [s for s in alignment.starts[a:b] if s is not None]
            ends = [e for e in alignment.ends[a:b] if e is not None]
            if starts and ends:
                times[i + k] = (min(starts), max(ends))
    words: list[WordTiming] = []
    floor = 0.0
    for index, (a, b) in enumerate(mine):
        timed = times[index]
        if timed is None:  # between its neighbours
            after = next((t[0] for t in times[index + 1:] if t is not None), None)
            timed = (floor, floor if after is None else max(floor, after))
        start = max(floor, timed[0])
        end = max(start, timed[1])
        floor = start
        words.append(WordTiming(word=caller_text[a:b], start=round(start, 4), end=round(end, 4),
                                char_start=a, char_end=b))
    return words
