"""A hostile upstream: a real aiohttp server on 127.0.0.1 that answers every POST with
:attr:`HostileServer.status` and :attr:`HostileServer.start`, then misbehaves as
:attr:`HostileServer.mode` says:

- ``drip``: one more byte every :attr:`HostileServer.drip_interval` seconds, never ending
  (a server that stays just inside every per-read timeout);
- ``flood``: :attr:`HostileServer.flood_bytes` more bytes (``a``, no line end) as fast as
  the client takes them, then :attr:`HostileServer.end`.

:attr:`HostileServer.outcomes` gets ``"complete"`` for each answer sent whole and ``"cut"``
for each the client stopped reading (it went away before the end).
"""

from __future__ import annotations

import asyncio
from typing import Literal, Self

from aiohttp import web

__all__ = ["HostileServer"]

_BLOCK = 64 * 1024


class HostileServer:
    def __init__(self, mode: Literal["drip", "flood"], *, status: int = 200,
                 start: bytes = b"", end: bytes = b"", flood_bytes: int = 0,
                 drip_interval: float = 0.1) -> None:
        self.mode = mode
        self.status = status
        self.start_bytes = start
        self.end = end
        self.flood_bytes = flood_bytes
        self.drip_interval = drip_interval
        self.outcomes: asyncio.Queue[str] = asyncio.Queue()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=self.status,
                                      headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            await response.write(self.start_bytes)
            if self.mode == "drip":
                while not self._stopping.is_set():
                    await asyncio.sleep(self.drip_interval)
                    await response.write(b"a")
                return response
            left = self.flood_bytes
            while left > 0:
                await response.write(b"a" * min(_BLOCK, left))
                left -= _BLOCK
            await response.write(self.end)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):  # the client went away
            self.outcomes.put_nowait("cut")
            raise
        self.outcomes.put_nowait("complete")
        return response

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
