"""A forward HTTP proxy on 127.0.0.1, as HTTP_PROXY/HTTPS_PROXY name one: ``CONNECT
host:port`` is tunnelled to the address :attr:`HttpProxy.routes` gives the host (502 for a
host it does not know); a plain request (``GET http://host/…``) is answered by the proxy
itself, 200 with :data:`PROXY_BODY`. Every request line it receives goes to
:attr:`HttpProxy.seen`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

__all__ = ["PROXY_BODY", "HttpProxy"]

PROXY_BODY = b"answered by the proxy"


class HttpProxy:
    def __init__(self, routes: Mapping[str, str] | None = None) -> None:
        self.routes = dict(routes or {})
        self.seen: list[str] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode("latin-1").strip()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        self.seen.append(line)
        method, target, _ = (line.split() + ["", "", ""])[:3]
        host, _, port = target.rpartition(":")
        address = self.routes.get(host.strip("[]"))
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(PROXY_BODY) + PROXY_BODY)
        elif address is None:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        else:
            upstream_reader, upstream_writer = await asyncio.open_connection(address, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
            return
        await writer.drain()
        writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.close()
