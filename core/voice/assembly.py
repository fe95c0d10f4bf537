"""A text spoken in parts (ElevenLabs' requests, the local voice's sentences) becomes one
stream, and the file is that stream.

:class:`PartsStream` takes each part's bytes as they arrive, puts them in part order (a
part that arrives early waits, in memory, for those before it), makes them one stream and
sends it, as it goes, to the sink and into the file; :meth:`PartsStream.finish` completes
the file: a header that needs the end is written over the first bytes of both (so that a
listener who starts after that reads the file exactly). Memory holds only the parts that
wait for the ones before them, whatever the audio's length.

- **One part** (MP3, Opus): the part as it came, byte for byte; nothing is written over.
- **Several MP3 parts**: frame by frame under one header frame
  (:class:`~core.voice.mp3join.Mp3Joiner`); its counts are written over at the end.
- **Several Opus parts**: one logical Ogg stream (:class:`~core.voice.oggjoin.OggOpusJoiner`);
  nothing is written over.
- **Raw formats** (PCM, G.711): one WAV header of unknown length
  (:func:`~core.voice.formats.wav_header`), then the bytes; the header with the sizes is
  written over at the end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Protocol

from core.voice.formats import OutputFormat, wav_header
from core.voice.mp3join import Mp3Joiner
from core.voice.oggjoin import OggOpusJoiner
from core.voice.streams import AudioSink
from schemas.errors import InternalError

__all__ = ["PartsStream"]


class _Muxer(Protocol):
    """Ordered part bytes in, stream bytes out."""

    def feed(self, data: bytes) -> bytes: ...
    def end_part(self) -> bytes: ...
    def restart_part(self) -> None: ...
    def finish(self) -> bytes | None: ...
    def part_starts(self) -> list[float]: ...


class _AsItCame:
    """One MP3 or Opus part: the stream is the part."""

    def feed(self, data: bytes) -> bytes:
        return data

    def end_part(self) -> bytes:
        return b""

    def restart_part(self) -> None:
        return None

    def finish(self) -> bytes | None:
        return None

    def part_starts(self) -> list[float]:
        return [0.0]


class _Raw:
    """Raw parts under one WAV header."""

    def __init__(self, fmt: OutputFormat) -> None:
        self._fmt = fmt
        self._size = 0  # bytes of the parts before the current one
        self._current = 0
        self._starts: list[float] = []

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        head = wav_header(self._fmt, None) if not self._size and not self._current else b""
        self._current += len(data)
        return head + data

    def end_part(self) -> bytes:
        self._starts.append(self._size / self._fmt.bytes_per_sample / self._fmt.sample_rate)
        self._size += self._current
        self._current = 0
        return b""

    def restart_part(self) -> None:
        self._current = 0

    def finish(self) -> bytes | None:
        if not self._size:
            raise InternalError(f"no {self._fmt.name} audio")
        return wav_header(self._fmt, self._size)

    def part_starts(self) -> list[float]:
        return list(self._starts)


def _muxer(fmt: OutputFormat, parts: int) -> _Muxer:
    if fmt.raw:
        return _Raw(fmt)
    if parts == 1:
        return _AsItCame()
    if fmt.codec == "mp3":
        return Mp3Joiner()
    return OggOpusJoiner(parts)


class PartsStream:
    """The stream of ``parts`` parts in ``fmt`` into the file at ``path`` (created) and into
    ``sink`` (``None``: the file alone); see the module docstring. Bytes of a part go out
    once every part before it is done; each call is made on the event loop, in order for a
    part; the file is made at the first bytes out (``OSError`` when it cannot be).
    :meth:`close` it in any case (:meth:`finish` does on success). Raises ``ValueError``
    for ``parts`` < 1.
    """

    def __init__(self, path: Path, sink: AudioSink | None, fmt: OutputFormat,
                 parts: int) -> None:
        if parts < 1:
            raise ValueError(f"parts must be >= 1, got {parts}")
        self._sink = sink
        self._parts = parts
        self._mux = _muxer(fmt, parts)
        self._path = path
        self._file: BinaryIO | None = None  # made at the first bytes out
        self._size = 0
        self._part_start = 0  # where the current part's bytes begin in the file
        self._current = 0
        self._held: dict[int, bytearray] = {}
        self._done: set[int] = set()

    def heard(self, part: int) -> bool:
        """Whether any of ``part``'s own audio went out to the sink: from then on that part
        cannot be asked for again (the stream holds its start). A later part's bytes that
        wait in memory have not: they are dropped when it is asked again."""
        if self._sink is None:
            return False
        return part < self._current or (part == self._current and self._size > self._part_start)

    async def write(self, part: int, data: bytes) -> None:
        """``data`` of ``part``, out now if every part before it is done."""
        if part == self._current:
            await self._out(self._mux.feed(data))
        else:
            self._held.setdefault(part, bytearray()).extend(data)

    def restart(self, part: int) -> None:
        """``part`` is asked for again: forget what it sent (only while :meth:`heard` is
        false for it: its bytes held in memory are dropped, what went into the file alone
        is cut off)."""
        self._held.pop(part, None)
        if part == self._current and self._file is not None and self._size > self._part_start:
            self._file.truncate(self._part_start)
            self._file.seek(self._part_start)
            self._size = self._part_start
        if part == self._current:
            self._mux.restart_part()

    async def done(self, part: int) -> None:
        """``part`` is complete: the parts after it that waited go out."""
        if part != self._current:
            self._done.add(part)
            return
        await self._next_part()
        while self._current < self._parts:
            held = self._held.pop(self._current, None)
            if held:
                await self._out(self._mux.feed(bytes(held)))
            if self._current not in self._done:
                break
            await self._next_part()

    async def _next_part(self) -> None:
        await self._out(self._mux.end_part())
        self._current += 1
        self._part_start = self._size

    async def finish(self) -> None:
        """Complete the file once every part is done: the header that needed the end is
        written over the start of the file and the sink's stream; the file is closed.
        Raises :class:`InternalError` when parts are missing or held no audio."""
        if self._current != self._parts:
            raise InternalError(f"audio part {self._current} of {self._parts} is missing")
        if self._file is None or not self._size:
            raise InternalError("no audio to write")
        header = self._mux.finish()
        if header is not None:
            os.pwrite(self._file.fileno(), header, 0)
            if self._sink is not None:
                await self._sink.rewrite(0, header)
        self.close()

    def close(self) -> None:
        """Close the file (a failed one is the caller's to remove)."""
        if self._file is not None:
            self._file.close()

    def part_starts(self) -> list[float]:
        """Where each part's own time 0 plays in the file, in seconds (after
        :meth:`finish`)."""
        return self._mux.part_starts()

    async def _out(self, data: bytes) -> None:
        if not data:
            return
        if self._file is None:  # a local temporary file, written through as the spool is
            self._file = open(self._path, "wb", buffering=0)  # noqa: SIM115, ASYNC230
        self._file.write(data)  # a regular file: written whole
        self._size += len(data)
        if self._sink is not None:
            await self._sink.write(data)
