"""Raw HTTP/1.1 over a socket, for bodies no client library would send (a wrong
``Content-Length``, broken chunking, a body cut short) and clients that go away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

Client = TestClient[web.Request, web.Application]


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def open_raw(client: Client) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert client.server.port is not None
    return await asyncio.open_connection("127.0.0.1", client.server.port)


def head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in
                                                           headers.items()), "", ""]
    return "\r\n".join(lines).encode()


async def read_response(reader: asyncio.StreamReader, timeout: float = 30) -> RawResponse:
    """One response (with a ``Content-Length``, as the app's all are)."""
    async with asyncio.timeout(timeout):
        status_line = await reader.readline()
        assert status_line.startswith(b"HTTP/1."), status_line
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawResponse(int(status_line.split()[1]), headers, body)


async def raw_post(client: Client, path: str, headers: dict[str, str], body: bytes
                   ) -> RawResponse:
    """Send exactly ``body`` after ``headers`` and read the response."""
    reader, writer = await open_raw(client)
    try:
        writer.write(head(path, headers) + body)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Returns once ``condition()`` holds (checked every 10 ms), or fails after ``timeout``:
    for state the server shows only on disk (a file being received)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def more_than_a_socket_holds() -> int:
    """Bytes more than a loopback connection to a reader that reads nothing takes: the
    sender's buffer grows to tcp_wmem's maximum at most; 4 MiB more is ample."""
    try:
        most = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        most = 4 * 1024 * 1024
    return most + 4 * 1024 * 1024
