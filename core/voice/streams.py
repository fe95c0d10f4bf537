"""Live voice audio: what a request has made so far, for its listeners.

An :class:`AudioStream` is written by the backend as the audio arrives (the ElevenLabs
stream's chunks, the local voice's sentences) and read by listeners from its start,
whenever they join: a listener gets the bytes so far at once and then each new chunk as
it is written, until the stream finishes (the listener's read ends) or is aborted (a
failure or a cancel: the read raises :class:`StreamAborted`, so a half stream is never
mistaken for a whole one). A header that needs the end (a WAV file's sizes, a joined
MP3's frame count) is written over the stream's first bytes when the audio is complete
(:meth:`AudioStream.rewrite`): a listener who starts reading after that reads the file,
byte for byte; one who read the start before has the header a live stream has.

Memory stays bounded whatever the audio's length: the bytes go to a spool file on disk as
they come, and each listener reads that file from its own offset in blocks of
:data:`READ_BLOCK`. Listeners are bounded too: a stream takes ``max_listeners`` at once
(:meth:`AudioStream.join` raises :class:`ListenersFull` beyond), and whoever serves one
gives it ``write_timeout`` seconds to take each block (``http_files/streams.py`` drops a
listener that stops reading). A stream stays readable for ``linger`` seconds after it
ended (a listener that joins late still gets all of it), then its file is removed.

:class:`AudioStreams` names streams: ``{base_url}/streams/voice/{instance}/{id}``. A live
stream exists only in the process making it, so its URL names that instance (see the
README, "Streaming voice", for a fleet behind one address).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

__all__ = ["MAX_LISTENERS", "READ_BLOCK", "WRITE_TIMEOUT", "AudioSink", "AudioStream",
           "AudioStreams", "ListenersFull", "Listening", "StreamAborted"]

logger = logging.getLogger(__name__)

READ_BLOCK = 64 * 1024
MAX_LISTENERS = 16
"""Listeners one stream takes at once: a conversation's players, with room to spare; each
costs a connection and a block or two of buffers."""
WRITE_TIMEOUT = 60.0
"""Seconds a listener may take to accept one block before it is dropped: a player that
plays as it reads takes a block (and the buffers behind it, ~112 KiB) in under 30 s at
the slowest format's 32 kbit/s, so only a listener that stopped reading waits longer."""
_INSTANCE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class StreamAborted(Exception):
    """The stream ended before its audio was complete (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ListenersFull(Exception):
    """The stream has ``limit`` listeners already: one more may join when one leaves."""

    def __init__(self, stream_id: str, limit: int) -> None:
        super().__init__(f"stream {stream_id} has its {limit} listeners already")
        self.stream_id = stream_id
        self.limit = limit


class Listening:
    """A listener's place in a stream (:meth:`AudioStream.join`), held until
    :meth:`leave` or the end of a ``with`` block; leaving twice leaves once."""

    def __init__(self, stream: AudioStream) -> None:
        self._stream: AudioStream | None = stream

    def leave(self) -> None:
        if self._stream is not None:
            self._stream._left()
            self._stream = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.leave()


class AudioSink(Protocol):
    """Where a backend writes audio as it arrives."""

    async def write(self, data: bytes) -> None:
        """Append ``data`` (called on the event loop, in order)."""
        ...

    async def rewrite(self, offset: int, data: bytes) -> None:
        """Write ``data`` over bytes already written at ``offset`` (a header that
        needed the end: listeners who read that far already keep what they read)."""
        ...


class AudioStream:
    """One request's audio as it is made (see the module docstring). Written on the event
    loop only; ``first_audio`` is set at the first non-empty write. ``max_listeners``
    listeners may :meth:`join` at once; ``write_timeout`` is how long whoever serves a
    listener waits for it to take one block. Raises ``ValueError`` naming the argument
    for ``max_listeners`` below 1 or a ``write_timeout`` not above 0."""

    def __init__(self, stream_id: str, spool: Path, content_type: str, *,
                 max_listeners: int = MAX_LISTENERS,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        _check_limits(max_listeners, write_timeout)
        self.id = stream_id
        self.content_type = content_type
        self.max_listeners = max_listeners
        self.write_timeout = write_timeout
        self._listeners = 0
        self.first_audio = asyncio.Event()
        self._spool = spool
        self._file = open(spool, "wb", buffering=0)  # noqa: SIM115 - closed at the end
        self._size = 0
        self._ended = False
        self._aborted: str | None = None
        self._changed = asyncio.Event()

    @property
    def size(self) -> int:
        return self._size

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def listeners(self) -> int:
        """Listeners that have joined and not left."""
        return self._listeners

    def join(self) -> Listening:
        """A place for one more listener, held until it leaves (use it in a ``with``
        block around the reading). Raises :class:`ListenersFull` when ``max_listeners``
        hold one."""
        if self._listeners >= self.max_listeners:
            raise ListenersFull(self.id, self.max_listeners)
        self._listeners += 1
        return Listening(self)

    def _left(self) -> None:
        self._listeners -= 1

    async def write(self, data: bytes) -> None:
        """Append ``data`` for the listeners. Raises :class:`StreamAborted` once aborted
        (the writer should stop) and ``ValueError`` once finished."""
        if self._aborted is not None:
            raise StreamAborted(self._aborted)
        if self._ended:
            raise ValueError(f"stream {self.id} is finished")
        if not data:
            return
        self._file.write(data)  # a local spool, written through: a few KiB at a time
        self._size += len(data)
        self.first_audio.set()
        self._wake()

    async def rewrite(self, offset: int, data: bytes) -> None:
        """Write ``data`` over the stream's bytes at ``offset``: a listener who has not
        read them yet (one who joins later) reads the new ones. Raises ``ValueError``
        outside the bytes written, or once the stream ended."""
        if self._ended:
            raise ValueError(f"stream {self.id} has ended")
        if offset < 0 or offset + len(data) > self._size:
            raise ValueError(f"bytes {offset}..{offset + len(data)} are not all written yet "
                             f"({self._size} are)")
        os.pwrite(self._file.fileno(), data, offset)

    def finish(self) -> None:
        """The audio is complete: listeners read to the end and stop."""
        self._end(None)

    def abort(self, reason: str) -> None:
        """The audio will not be complete: listeners stop with :class:`StreamAborted`."""
        self._end(reason)

    def _end(self, aborted: str | None) -> None:
        if self._ended:
            return
        self._ended, self._aborted = True, aborted
        self._file.close()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def discard(self) -> None:
        """Remove the spool (listeners with it open keep reading what they have)."""
        self._end(self._aborted or "discarded")
        try:
            os.unlink(self._spool)
        except FileNotFoundError:
            pass

    async def read(self) -> AsyncGenerator[bytes, None]:
        """The whole stream from its start: what is there at once, then each new chunk,
        until it finishes. Raises :class:`StreamAborted` when it is aborted."""
        try:
            reader = open(self._spool, "rb", buffering=0)  # noqa: SIM115, ASYNC230 - a local file, closed below
        except FileNotFoundError:
            raise StreamAborted("the stream is gone") from None
        try:
            offset = 0
            while True:
                changed = self._changed
                size, ended, aborted = self._size, self._ended, self._aborted
                while offset < size:
                    block = reader.read(min(READ_BLOCK, size - offset))
                    if not block:
                        break
                    offset += len(block)
                    yield block
                if aborted is not None:
                    raise StreamAborted(aborted)
                if ended and offset >= size:
                    return
                if offset >= size:
                    await changed.wait()
        finally:
            reader.close()


class AudioStreams:
    """The live streams of this instance: their spool files are in ``directory``'s
    subfolder named ``instance`` (several instances may share ``directory``, as a fleet
    shares OUTPUT_DIR: at start each removes only its own previous run's spools),
    ``base_url`` is where this instance is reached (VOICE_STREAM_BASE_URL, else
    PUBLIC_BASE_URL) and ``instance`` its name in stream URLs; a stream is kept ``linger``
    seconds after it ended; each stream takes ``max_listeners`` listeners at once, each
    given ``write_timeout`` seconds per block (:class:`AudioStream`). Raises
    ``ValueError`` naming the argument for an instance name other than 1..100 of
    ``[A-Za-z0-9._-]``, a negative ``linger``, ``max_listeners`` below 1 or a
    ``write_timeout`` not above 0."""

    def __init__(self, directory: Path, base_url: str, instance: str,
                 linger: float = 60.0, *, max_listeners: int = MAX_LISTENERS,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        if not _INSTANCE.match(instance):
            raise ValueError(f"instance must be 1..100 of [A-Za-z0-9._-], got {instance!r}")
        if linger < 0:
            raise ValueError(f"linger must be >= 0 seconds, got {linger}")
        _check_limits(max_listeners, write_timeout)
        directory = directory / instance  # "." and ".." are names no host has
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.part"):  # this instance's previous run's: unread now
            old.unlink(missing_ok=True)
        self._directory = directory
        self._base_url = base_url.rstrip("/")
        self.instance = instance
        self._linger = linger
        self._max_listeners = max_listeners
        self._write_timeout = write_timeout
        self._streams: dict[str, AudioStream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def open(self, content_type: str) -> AudioStream:
        """A new, empty stream, listed until it has ended and lingered (:meth:`close`)."""
        stream_id = str(uuid.uuid4())
        stream = AudioStream(stream_id, self._directory / f"{stream_id}.part", content_type,
                             max_listeners=self._max_listeners,
                             write_timeout=self._write_timeout)
        self._streams[stream_id] = stream
        return stream

    def get(self, stream_id: str) -> AudioStream | None:
        return self._streams.get(stream_id)

    def url_for(self, stream: AudioStream) -> str:
        return f"{self._base_url}/streams/voice/{self.instance}/{stream.id}"

    def close(self, stream: AudioStream) -> None:
        """``stream`` has ended (finished or aborted): drop it after the linger."""
        if not stream.ended:
            stream.abort("closed")
        asyncio.get_running_loop().call_later(self._linger, self._drop, stream.id)

    def _drop(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.discard()


def _check_limits(max_listeners: int, write_timeout: float) -> None:
    if max_listeners < 1:
        raise ValueError(f"max_listeners must be >= 1, got {max_listeners}")
    if not write_timeout > 0:
        raise ValueError(f"write_timeout must be > 0 seconds, got {write_timeout}")
