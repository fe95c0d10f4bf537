"""A TCP forwarder on 127.0.0.1 that a test can shut and open: while shut, it closes the
connections it carries and every new one at once, as a server gone away would look to a
client; open again, it forwards as before. Stands between the engine and a real server
(the S3 store) to take that server away and bring it back."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["TcpGate"]


class TcpGate:
    """``await start()`` → ``address`` … ``shut()`` / ``open()`` … ``await stop()``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._open = True
        self._carried: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def shut(self) -> None:
        self._open = False
        for writer in list(self._carried):
            writer.close()

    def open(self) -> None:
        self._open = True

    async def stop(self) -> None:
        self.shut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._carried.update((writer, upstream_writer))
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer),
                                 self._pipe(upstream_reader, writer))
        finally:
            self._carried.difference_update((writer, upstream_writer))
            for end in (writer, upstream_writer):
                end.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
