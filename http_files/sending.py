"""Response bodies sent under a write deadline: aiohttp has no write timeout of its own.

A client that stops reading would hold its connection, the handler's task and whatever
the answer reads from (an output file, even one since expired; a store stream; an audio
stream's place) for as long as it stays connected. Here the deadline is about progress,
not speed: while a step of a body (a block written, the end, what is left buffered
handed to the socket) waits on the client, the client must take something (what waits
for it, in this side's buffer and the kernel's, shrinks) every ``timeout`` seconds, so a
slow reader gets the whole body however long it takes. A client that takes nothing for
that long has its connection reset (a TCP reset, so the buffers go too) and
:class:`ClientStalled` is raised, so everything it held is freed.

The app's timeout is ``app[WRITE_TIMEOUT]`` (``create_app(write_timeout=…)``,
:data:`DEFAULT_WRITE_TIMEOUT` by default: the same as a voice stream's listeners get).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import logging
import os
import socket
import struct
import termios
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Mapping
from pathlib import Path
from typing import IO, Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from core.voice.streams import WRITE_TIMEOUT as DEFAULT_WRITE_TIMEOUT

__all__ = ["DEFAULT_WRITE_TIMEOUT", "WRITE_TIMEOUT", "ClientStalled", "TimedFileResponse",
           "close", "reset", "send"]

logger = logging.getLogger(__name__)

WRITE_TIMEOUT: web.AppKey[float] = web.AppKey("write_timeout", float)
"""Seconds a client may take nothing of a body for (see the module docstring)."""

_FILE_BLOCK = 256 * 1024  # aiohttp's own chunk for files
_LOOKS = 10  # looks per timeout at what waits for the client: a stall is seen within 1/10
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets, dropping the buffers


class ClientStalled(ConnectionResetError):
    """The client took nothing for ``timeout`` seconds, having taken about ``sent`` bytes
    of the body; its connection has been reset."""

    def __init__(self, timeout: float, sent: int) -> None:
        super().__init__(f"the client took nothing for {timeout:g} s after {sent} bytes; "
                         "its connection is reset")
        self.timeout = timeout
        self.sent = sent


async def send(request: web.BaseRequest, response: web.StreamResponse,
               blocks: AsyncIterable[bytes] | None, timeout: float) -> int:
    """Sends ``response`` (prepared here, unless it is already) with ``blocks`` as its
    body (None: none, as for HEAD), then its end; returns the body's bytes. While a write
    waits on the client, the client must take something every ``timeout`` seconds
    (waiting for the next block does not count): past them the connection is reset and
    :class:`ClientStalled` raised. What ``blocks`` raises goes through as it is, the
    connection left open (closing ``blocks`` is the caller's)."""
    written = 0
    if not response.prepared:
        await _within(request, timeout, written, response.prepare(request))
    if blocks is not None:
        async for block in blocks:
            written += len(block)
            await _within(request, timeout, written, response.write(block))
    await _within(request, timeout, written, response.write_eof())
    await _within(request, timeout, written, _flushed(request))
    return written


async def _within(request: web.BaseRequest, timeout: float, written: int,
                  step: Awaitable[Any]) -> None:
    """Awaits ``step`` (``written`` bytes of the body handed over once it has run) while
    the client keeps taking something every ``timeout`` seconds; resets the connection
    and raises :class:`ClientStalled` once it has taken nothing for that long."""
    deadline = asyncio.timeout(timeout)
    loop = asyncio.get_running_loop()
    left = _unsent(request)  # looked at again once the step has handed its bytes over
    look: asyncio.Handle

    def watch() -> None:  # the deadline moves on each time the client took something
        nonlocal left, look
        now = _unsent(request)
        if now < left:
            deadline.reschedule(loop.time() + timeout)
        left = now
        look = loop.call_later(timeout / _LOOKS, watch)

    try:
        async with deadline:
            look = loop.call_soon(watch)
            try:
                await step
            finally:
                look.cancel()
    except TimeoutError:
        if not deadline.expired():  # the step's own error, not the deadline
            raise
        delivered = max(0, written - _unsent(request))
        reset(request)
        raise ClientStalled(timeout, delivered) from None


def _unsent(request: web.BaseRequest) -> int:
    """Bytes written to the connection that its client has not taken yet: in the
    transport's buffer and in the kernel's send queue (unsent or unacknowledged; Linux's
    ``SIOCOUTQ``, counted as none where it is not known)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return 0
    queued = 0
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):  # not a TCP socket, or closed
            queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                    b"\0" * 4))[0]
    return transport.get_write_buffer_size() + queued


async def _flushed(request: web.BaseRequest) -> None:
    """Returns once what was written to the connection has gone to its socket: closing a
    connection waits for that, so a client that stopped reading just before the end
    would hold its connection (and those bytes) for ever."""
    transport = request.transport
    if transport is None or transport.is_closing() or not transport.get_write_buffer_size():
        return
    low, high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0)  # the writer waits until the buffer is empty
    try:
        await request.writer.drain()
    finally:
        transport.set_write_buffer_limits(high=high, low=low)


def close(request: web.BaseRequest, timeout: float) -> None:
    """End the connection once what is buffered has gone; reset it if that takes longer
    than ``timeout`` (a client that stopped reading would hold it for ever)."""
    transport = request.transport
    if transport is not None:
        transport.close()
        asyncio.get_running_loop().call_later(timeout, _reset_transport, transport)


def reset(request: web.BaseRequest) -> None:
    """Close the connection at once, dropping what is buffered (a TCP reset)."""
    if request.transport is not None:
        _reset_transport(request.transport)


def _reset_transport(transport: asyncio.Transport) -> None:
    """A transport already closed stays so."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # closed already: nothing to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    transport.abort()


class TimedFileResponse(web.FileResponse):
    """``path`` answered as :class:`aiohttp.web.FileResponse` answers it (``Range`` and
    206/416, ``HEAD``, ``ETag`` and the conditional requests' 304/412,
    ``Content-Length``), its body sent by :func:`send` in blocks, ``timeout`` seconds
    for each: a client that stops reading has its connection reset, and the file is
    closed."""

    def __init__(self, path: Path, timeout: float, *,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(path, headers=headers)
        self._write_timeout = timeout

    async def _sendfile(self, request: web.BaseRequest, fobj: IO[Any], offset: int,
                        count: int) -> AbstractStreamWriter:
        # aiohttp's hook for the body, once status and headers are settled (checked below)
        writer = await web.StreamResponse.prepare(self, request)  # not FileResponse's again
        assert writer is not None  # a fresh response: prepare starts it
        try:
            await send(request, self, _file_blocks(fobj, offset, count), self._write_timeout)
        except ClientStalled as exc:  # aiohttp drops the connection quietly
            logger.warning("%s %s: %s", request.method, request.path, exc)
            raise
        return writer


async def _file_blocks(fobj: IO[Any], offset: int, count: int) -> AsyncIterator[bytes]:
    while count > 0:
        block = await asyncio.to_thread(os.pread, fobj.fileno(), min(_FILE_BLOCK, count),
                                        offset)
        if not block:  # shorter than it was: the body ends short, as aiohttp's does
            return
        offset += len(block)
        count -= len(block)
        yield block


def _check_file_hook() -> None:
    """:class:`TimedFileResponse` overrides a hook of aiohttp's that is not public API: a
    version without it would send files with no deadline, so it is an error at import."""
    hook = getattr(web.FileResponse, "_sendfile", None)
    names = list(inspect.signature(hook).parameters) if callable(hook) else []
    if names != ["self", "request", "fobj", "offset", "count"]:
        raise ImportError(f"aiohttp {aiohttp.__version__} has no FileResponse._sendfile("
                          "request, fobj, offset, count), through which http_files.sending "
                          "sends files under a write deadline: install an aiohttp that has it")


_check_file_hook()
