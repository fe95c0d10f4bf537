"""A store that fails on cue: a reverse proxy on 127.0.0.1 in front of the S3-protocol
server that answers the requests a test picks with S3's own ``503 SlowDown`` (what a
throttled or briefly failing store says), either before they reach the store (``refuse``:
nothing happened) or after (``lose``: the write landed, its answer did not), or every
request while ``down``. Tests wait on :meth:`FaultyStore.wait_for` (a request seen), never
on time.

obstore retries a 503 three times, so one failed call of the engine's is four failed
requests (:data:`ONE_CALL`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from aiohttp import web
from aiohttp.test_utils import TestServer

__all__ = ["ONE_CALL", "Faults", "FaultyStore", "Seen"]

ONE_CALL = 4  # requests: obstore's attempt and its 3 retries

_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length",
        "proxy-connection", "upgrade", "te", "trailer", "date", "server"}

Match = Callable[[str, str], bool]  # (method, path) → whether it is the request meant


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    status: int


@dataclass
class Faults:
    """The next ``times`` requests that ``match`` are answered 503: ``landed`` says
    whether they reach the store first."""

    match: Match
    times: int
    landed: bool

    def take(self, method: str, path: str) -> bool:
        if self.times > 0 and self.match(method, path):
            self.times -= 1
            return True
        return False


@dataclass
class FaultyStore:
    """``await start()`` → the endpoint to give the engine (STORAGE_ENDPOINT_URL) …
    ``await stop()``."""

    upstream: str
    down: bool = False
    seen: list[Seen] = field(default_factory=list)
    _faults: list[Faults] = field(default_factory=list)
    _waiters: list[tuple[Callable[[Seen], bool], asyncio.Future[Seen]]] = field(
        default_factory=list)
    _server: TestServer | None = None
    _client: httpx.AsyncClient | None = None

    def refuse(self, match: Match, times: int = ONE_CALL) -> Faults:
        """The next ``times`` requests that ``match`` fail without reaching the store."""
        self._faults.append(faults := Faults(match, times, landed=False))
        return faults

    def lose(self, match: Match, times: int = ONE_CALL) -> Faults:
        """The next ``times`` requests that ``match`` reach the store, and their answers
        are replaced by a 503 (a write that landed unbeknown to its writer)."""
        self._faults.append(faults := Faults(match, times, landed=True))
        return faults

    async def wait_for(self, match: Callable[[Seen], bool], timeout: float = 60) -> Seen:
        """The first request ``match`` accepts, answered already or once answered."""
        for seen in self.seen:
            if match(seen):
                return seen
        future: asyncio.Future[Seen] = asyncio.get_running_loop().create_future()
        self._waiters.append((match, future))
        return await asyncio.wait_for(future, timeout)

    async def start(self) -> str:
        self._client = httpx.AsyncClient(timeout=30)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        return str(self._server.make_url("")).rstrip("/")

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.close()
        if self._client is not None:
            await self._client.aclose()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = next((f for f in self._faults if f.take(request.method, request.path)), None)
        if self.down or (fault is not None and not fault.landed):
            return self._answered(request, web.Response(
                status=503, body=_SLOWDOWN, content_type="application/xml"))
        assert self._client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        upstream = await self._client.request(request.method, self.upstream + request.path_qs,
                                              headers=headers, content=body)
        if fault is not None:  # it landed; its writer hears otherwise
            return self._answered(request, web.Response(
                status=503, body=_SLOWDOWN, content_type="application/xml"))
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
        if request.method == "HEAD":
            head = web.StreamResponse(status=upstream.status_code, headers=out)
            head.content_length = int(upstream.headers.get("content-length", "0"))
            await head.prepare(request)
            return self._answered(request, head)
        return self._answered(request, web.Response(
            status=upstream.status_code, body=upstream.content, headers=out))

    def _answered(self, request: web.Request, response: web.StreamResponse
                  ) -> web.StreamResponse:
        seen = Seen(request.method, request.path, response.status)
        self.seen.append(seen)
        for waiter in list(self._waiters):
            match, future = waiter
            if not future.done() and match(seen):
                future.set_result(seen)
                self._waiters.remove(waiter)
        return response
