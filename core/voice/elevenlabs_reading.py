"""Reading one ElevenLabs answer within bounds (:mod:`core.net.bounded`), and the errors
its failures are for callers.

- **Audio:** the JSON lines of a 200 answer, each at most :data:`MAX_LINE_BYTES`; each
  chunk's audio goes out the moment it arrives. The clock of progress is the read timeout
  (ELEVENLABS_TIMEOUT): no audio within it of the answer's start or of the chunk before
  (a hang, or a drip of bytes that never makes a chunk) is
  :class:`~core.net.bounded.Stalled`, whatever the
  stream's length, so a long text streaming for minutes is never cut off.
- **Errors:** at most :data:`ERROR_BODY_BYTES` of an error answer is read, within the read
  timeout; the rest is dropped unread.
- **Messages** reach callers (failed events, HTTP answers): they say what failed, never an
  exception's name, which the log and ``__cause__`` keep.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from core.net.bounded import BodyTooLarge, BoundedLines
from core.voice.elevenlabs_faults import ElevenLabsError, ElevenLabsUnavailableError

__all__ = ["ERROR_BODY_BYTES", "MAX_LINE_BYTES", "Answer", "cause_of", "read_audio",
           "unreachable"]

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 2 * 1024 * 1024
"""The longest stream line read: one audio chunk and its timings (ElevenLabs sends a few
KiB each); a longer line is a fault of upstream (``UPSTREAM_UNAVAILABLE``)."""

ERROR_BODY_BYTES = 64 * 1024
"""How much of an error answer is read (its ``detail``, or the start of a proxy's page);
the subscription answer is bounded likewise."""


@dataclass(frozen=True)
class Answer:
    """One part's answer: its ``request-id`` (``None`` when upstream sent none) and its
    characters' timings as upstream sent them (``None`` when it sent none)."""

    request_id: str | None
    timed: tuple[list[str], list[float], list[float]] | None


async def read_audio(response: httpx.Response, write: Callable[[bytes], Awaitable[None]], *,
                     stall: float | None, attempts: Callable[[], int]) -> Answer | None:
    """The JSON lines of a 200 answer, each chunk's audio given to ``write`` as it comes;
    ``None`` when they held no audio (see the module docstring for the bounds).

    Raises ``httpx.RequestError`` when the connection drops, :class:`~core.net.bounded.Stalled`
    when no audio
    came within ``stall`` seconds, and :class:`ElevenLabsUnavailableError` for a line that
    is not one of upstream's or longer than :data:`MAX_LINE_BYTES` (``attempts()`` is the
    request's count, for the error).
    """
    received = 0
    characters: list[str] = []
    starts: list[float] = []
    ends: list[float] = []
    lines = BoundedLines(response, max_bytes=MAX_LINE_BYTES, stall=stall)
    while True:
        try:
            line = await anext(lines)
        except StopAsyncIteration:
            break
        except BodyTooLarge as exc:
            raise _not_a_chunk(exc, attempts()) from exc
        try:
            chunk = json.loads(line)
            data = base64.b64decode(chunk.get("audio_base64") or "", validate=True)
            timed = chunk.get("alignment") or {}
            characters += [str(c) for c in timed.get("characters", [])]
            starts += [float(t) for t in timed.get("character_start_times_seconds", [])]
            ends += [float(t) for t in timed.get("character_end_times_seconds", [])]
        except (ValueError, TypeError, AttributeError, binascii.Error) as exc:
            raise _not_a_chunk(exc, attempts()) from exc
        if data:
            received += len(data)
            await write(data)
            lines.progressed()  # after the write: a slow listener is no stall upstream
    if not received:
        return None
    return Answer(response.headers.get("request-id") or None,
                  (characters, starts, ends) if characters else None)


def unreachable(exc: httpx.RequestError, *, attempts: int) -> ElevenLabsUnavailableError:
    """A connection failure (connect, write, pool, a body cut short) as callers are told
    of it; ``exc`` becomes its ``__cause__``."""
    error = ElevenLabsUnavailableError("ElevenLabs unreachable", attempts=attempts)
    error.__cause__ = exc
    return error


def cause_of(error: ElevenLabsError) -> str:
    """`` (ConnectError)``: the kind of ``error``'s cause, for the log only."""
    cause = error.__cause__
    return f" ({type(cause).__name__})" if cause is not None else ""


def _not_a_chunk(exc: Exception, attempts: int) -> ElevenLabsUnavailableError:
    logger.warning("ElevenLabs sent a stream line that is not an audio chunk (%s)",
                   type(exc).__name__)
    return ElevenLabsUnavailableError(
        "ElevenLabs sent a stream line that is not an audio chunk", http_status=200,
        attempts=attempts)
