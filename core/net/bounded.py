"""Reading an upstream's answer within bounds of size and of time.

httpx's timeouts bound each network read, not an answer: a server sending one byte a second
is never cut off, and ``response.content`` or ``aiter_lines`` keep all that arrives, however
much. These read a streamed ``httpx.Response`` (from ``client.stream``) with both bounds,
counting decoded bytes:

- :func:`read_capped`: the whole body, refused (:class:`BodyTooLarge`) past ``limit``
  bytes, and (:class:`Stalled`) when it is not complete within ``seconds``;
- :func:`read_prefix`: at most the first ``limit`` bytes of a body (an error page), and
  what arrived within ``seconds``; the rest is never read;
- :class:`BoundedLines`: the body's non-blank lines, each of at most ``max_bytes``
  (:class:`BodyTooLarge`), with a clock of progress: :class:`Stalled` once ``stall``
  seconds pass waiting for upstream since the reader began or the caller last said
  :meth:`BoundedLines.progressed`. Time the caller spends between lines is not counted, so
  a long stream that keeps making progress is never cut off.

Callers translate these errors into their own where the upstream enters, keeping the
cause. ``seconds``/``stall`` of ``None`` mean no bound of time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

__all__ = ["BodyTooLarge", "BoundedLines", "Stalled", "read_capped", "read_prefix"]


class BodyTooLarge(Exception):
    """An answer (or one of its lines) longer than its bound of ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


class Stalled(Exception):
    """An answer that did not progress within its bound of ``seconds``."""

    def __init__(self, seconds: float | None) -> None:
        super().__init__(f"no progress within {seconds}s")
        self.seconds = seconds


def _deadline(seconds: float | None) -> float | None:
    return None if seconds is None else asyncio.get_running_loop().time() + seconds


async def read_capped(response: httpx.Response, limit: int, *,
                      seconds: float | None) -> bytes:
    """The body of ``response``: at most ``limit`` bytes, all within ``seconds``.

    Raises :class:`BodyTooLarge` past ``limit`` and :class:`Stalled` when the body is not
    complete in time; ``httpx.RequestError`` when the connection fails.
    """
    body = bytearray()
    try:
        async with asyncio.timeout_at(_deadline(seconds)):
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(limit)
    except TimeoutError as exc:
        raise Stalled(seconds) from exc
    return bytes(body)


async def read_prefix(response: httpx.Response, limit: int, *,
                      seconds: float | None) -> bytes:
    """At most the first ``limit`` bytes of ``response``'s body, as many as arrived within
    ``seconds``; the rest is left unread (closing the response drops it).

    Raises ``httpx.RequestError`` when the connection fails.
    """
    body = bytearray()
    try:
        async with asyncio.timeout_at(_deadline(seconds)):
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= limit:
                    break
    except TimeoutError:
        pass  # what arrived in time is all there is to tell
    return bytes(body[:limit])


class BoundedLines:
    """The non-blank lines of ``response`` (without their line ends), each of at most
    ``max_bytes``, upstream making progress within ``stall`` seconds (see the module
    docstring).

    Iterating raises :class:`BodyTooLarge` for a longer line, :class:`Stalled` when the
    progress clock runs out while waiting for upstream, and ``httpx.RequestError`` when
    the connection fails.
    """

    def __init__(self, response: httpx.Response, *, max_bytes: int,
                 stall: float | None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if stall is not None and stall <= 0:
            raise ValueError(f"stall must be > 0, got {stall}")
        self._chunks = response.aiter_bytes()
        self._max_bytes = max_bytes
        self._stall = stall
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no line end
        self._ended = False
        self._deadline = _deadline(stall)

    def progressed(self) -> None:
        """Upstream made progress (a line worth having): the clock starts again now."""
        self._deadline = _deadline(self._stall)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end < 0 and self._ended:
                end = len(self._buffer)
                if not end:
                    raise StopAsyncIteration
            if end >= 0:
                line = bytes(self._buffer[:end]).rstrip(b"\r")
                del self._buffer[:end + 1]
                self._scanned = 0
                if len(line) > self._max_bytes:
                    raise BodyTooLarge(self._max_bytes)
                if line.strip():
                    return line
                continue
            if len(self._buffer) > self._max_bytes:
                raise BodyTooLarge(self._max_bytes)
            self._scanned = len(self._buffer)
            await self._more()

    async def _more(self) -> None:
        try:
            async with asyncio.timeout_at(self._deadline):
                self._buffer += await anext(self._chunks)
        except StopAsyncIteration:
            self._ended = True
        except TimeoutError as exc:
            raise Stalled(self._stall) from exc
