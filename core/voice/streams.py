"""Live voice audio: what a request has made so far, for any number of listeners.

An :class:`AudioStream` is written by the backend as the audio arrives (the ElevenLabs
stream's chunks, the local voice's sentences) and read by listeners from its start,
whenever they join: a listener gets the bytes so far at once and then each new chunk as
it is written, until the stream finishes (the listener's read ends) or is aborted (a
failure or a cancel: the read raises :class:`StreamAborted`, so a half stream is never
mistaken for a whole one). A header that needs the end (a WAV file's sizes, a joined
MP3's frame count) is written over the stream's first bytes when the audio is complete
(:meth:`AudioStream.rewrite`): a listener who starts reading after that reads the file,
byte for byte; one who read the start before has the header a live stream has.

Memory stays bounded whatever the audio's length and the listeners' number: the bytes go
to a spool file on disk as they come, and each listener reads that file from its own
offset in blocks of :data:`READ_BLOCK`. A stream stays readable for ``linger`` seconds
after it ended (a listener that joins late still gets all of it), then its file is removed.

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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

__all__ = ["READ_BLOCK", "AudioSink", "AudioStream", "AudioStreams", "StreamAborted"]

logger = logging.getLogger(__name__)

READ_BLOCK = 64 * 1024
_INSTANCE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class StreamAborted(Exception):
    """The stream ended before its audio was complete (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    loop only; ``first_audio`` is set at the first non-empty write."""

    def __init__(self, stream_id: str, spool: Path, content_type: str) -> None:
        self.id = stream_id
        self.content_type = content_type
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

    async def read(self) -> AsyncIterator[bytes]:
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
    seconds after it ended. Raises ``ValueError`` naming the argument for an instance name
    other than 1..100 of ``[A-Za-z0-9._-]`` or a negative ``linger``."""

    def __init__(self, directory: Path, base_url: str, instance: str,
                 linger: float = 60.0) -> None:
        if not _INSTANCE.match(instance):
            raise ValueError(f"instance must be 1..100 of [A-Za-z0-9._-], got {instance!r}")
        if linger < 0:
            raise ValueError(f"linger must be >= 0 seconds, got {linger}")
        directory = directory / instance  # "." and ".." are names no host has
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.part"):  # this instance's previous run's: unread now
            old.unlink(missing_ok=True)
        self._directory = directory
        self._base_url = base_url.rstrip("/")
        self.instance = instance
        self._linger = linger
        self._streams: dict[str, AudioStream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def open(self, content_type: str) -> AudioStream:
        """A new, empty stream, listed until it has ended and lingered (:meth:`close`)."""
        stream_id = str(uuid.uuid4())
        stream = AudioStream(stream_id, self._directory / f"{stream_id}.part", content_type)
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
