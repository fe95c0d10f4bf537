"""Downloads under a write deadline, on the real app served on 127.0.0.1 with a 1 s write
timeout: a client that asks for an output (whole or a range; from this instance's folder
or from the shared store) and stops reading has its connection reset once it has taken
nothing for the timeout, and the file or store stream it held is let go; one that reads
gets the whole body, headers as before, however slowly it reads."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry

from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.outputs import OutputStore, StoredFile
from core.scheduling import build_scheduling
from core.settings import load_settings
from core.storage import SharedOutputs, build_object_store
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from http_files import AppServices, create_app
from http_files.serving import app_runner
from http_files.uploads import UploadLimits
from schemas.codec import EventCodec
from tests.http.raw import more_than_a_socket_holds, until
from tests.support.s3_server import StoreLocation

WRITE_TIMEOUT = 1.0


@dataclass
class Served:
    """The app on ``port``; ``ended`` gets the path of each request whose handler has
    returned."""

    store: OutputStore
    port: int
    ended: asyncio.Queue[str]

    async def handled(self, path: str) -> None:
        while await asyncio.wait_for(self.ended.get(), timeout=10) != path:
            pass


Serve = Callable[..., Awaitable[Served]]


def services_over(store: OutputStore) -> AppServices:
    metrics = EngineMetrics(CollectorRegistry())
    return AppServices(
        health=EngineHealth(voice_backend="local"), metrics=metrics, store=store,
        codec=EventCodec(), scheduling=build_scheduling(load_settings(), metrics),
        voice=VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store,
                           "21m00Tcm4TlvDq8ikWAM"))


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """``await serve(shared=None, send_buffer=None)``: the app over an output store (with
    ``shared`` outputs, or none), on the engine's own runner, with a 1 s write timeout;
    ``send_buffer`` sets the server's socket send buffer for each request's connection
    (as small as on a slow link: less of an answer waits in the kernel)."""
    runners: list[web.AppRunner] = []

    async def start(shared: SharedOutputs | None = None,
                    send_buffer: int | None = None) -> Served:
        store = OutputStore(tmp_path / "outputs", cleanup_delay=3600, shared=shared)
        app = create_app(services_over(store), UploadLimits(tmp_path / "temp" / "uploads"),
                         write_timeout=WRITE_TIMEOUT)
        ended: asyncio.Queue[str] = asyncio.Queue()

        @web.middleware
        async def observed(request: web.Request, handler: Handler) -> web.StreamResponse:
            sock = request.transport.get_extra_info("socket") if request.transport else None
            if send_buffer is not None and sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            try:
                return await handler(request)
            finally:
                ended.put_nowait(request.path)

        app.middlewares.append(observed)
        runner = app_runner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return Served(store, runner.addresses[0][1], ended)

    yield start
    for runner in runners:
        await runner.cleanup()


def held_open(path: Path) -> bool:
    """Whether this process (the server's) has ``path`` open."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                return True
        except OSError:  # closed meanwhile
            continue
    return False


@dataclass
class Stalled:
    """A client that read a response's head and then stopped reading."""

    sock: socket.socket
    status: int
    headers: dict[str, str]

    async def reset_by_server(self, timeout: float = 10) -> bool:
        """Waits (without reading: that would take bytes) until the server resets the
        connection; False if it has not within ``timeout`` seconds."""
        poller = select.poll()
        poller.register(self.sock, select.POLLERR | select.POLLHUP | select.POLLRDHUP)
        if not await asyncio.to_thread(poller.poll, int(timeout * 1000)):
            return False
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET


async def stall(port: int, path: str, headers: dict[str, str] | None = None, *,
                receive_buffer: int = 4096) -> Stalled:
    """GET ``path``, read the response's head, then read nothing more."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # fills soon
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1",
             *(f"{k}: {v}" for k, v in (headers or {}).items()), "", ""]
    await loop.sock_sendall(sock, "\r\n".join(lines).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.wait_for(loop.sock_recv(sock, 1), timeout=10)
    status_line, *fields = head.decode().split("\r\n\r\n")[0].split("\r\n")
    return Stalled(sock, int(status_line.split()[1]),
                   {k.strip().lower(): v.strip() for k, _, v in
                    (f.partition(":") for f in fields)})


@pytest.fixture
def big() -> bytes:
    return os.urandom(more_than_a_socket_holds())


async def test_downloads_that_stop_reading_are_reset_and_their_file_closed(
    serve: Serve, big: bytes, caplog: pytest.LogCaptureFixture,
) -> None:
    served = await serve()
    output = served.store.write(big, "mp3")
    with caplog.at_level(logging.WARNING, logger="http_files.sending"):
        whole = await stall(served.port, output.url)
        part = await stall(served.port, output.url, {"Range": "bytes=1000-"})
        try:
            # headers as aiohttp's FileResponse sends them
            assert whole.status == 200 and part.status == 206
            assert whole.headers["content-length"] == str(len(big))
            assert part.headers["content-length"] == str(len(big) - 1000)
            assert part.headers["content-range"] == f"bytes 1000-{len(big) - 1}/{len(big)}"
            assert whole.headers["accept-ranges"] == part.headers["accept-ranges"] == "bytes"
            assert await whole.reset_by_server() and await part.reset_by_server()
            await until(lambda: not held_open(output.path), timeout=10)
        finally:
            whole.sock.close()
            part.sock.close()
    said = [r.getMessage() for r in caplog.records if "took nothing" in r.getMessage()]
    assert len(said) == 2 and all(output.filename in s and "connection is reset" in s
                                  for s in said)

    async with aiohttp.ClientSession() as session:  # those that read get what they ask
        url = f"http://127.0.0.1:{served.port}{output.url}"
        async with session.get(url) as read:
            assert read.status == 200 and await read.read() == big
        async with session.get(url, headers={"Range": "bytes=-10"}) as tail:
            assert tail.status == 206 and await tail.read() == big[-10:]
        async with session.head(url) as head:
            assert head.status == 200 and head.headers["Content-Length"] == str(len(big))
            etag = head.headers["ETag"]
        async with session.get(url, headers={"If-None-Match": etag}) as same:
            assert same.status == 304 and await same.read() == b""
    assert not held_open(output.path)


async def test_a_download_that_stops_reading_just_before_its_end_is_reset(
    serve: Serve, big: bytes,
) -> None:
    """All of it written, the last bytes waiting on this side for the client to read: the
    connection would stay open with them for as long as the client stays connected."""
    served = await serve(send_buffer=4096)
    output = served.store.write(big, "mp3")
    tail = 60_000  # less than the connection buffers before its writer waits
    client = await stall(served.port, output.url, {"Range": f"bytes=-{tail}"})
    try:
        assert client.status == 206 and client.headers["content-length"] == str(tail)
        assert await client.reset_by_server()
        await until(lambda: not held_open(output.path), timeout=10)
    finally:
        client.sock.close()


async def read_slowly(client: Stalled, upto: int) -> bytes:
    """Reads the body a little at a time (8 KiB, then a pause of 50 ms: about 160 KiB/s,
    never idle for long) until ``upto`` bytes or its end; a reset raises."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < upto:
        piece = await asyncio.wait_for(loop.sock_recv(client.sock, 8192), timeout=10)
        if not piece:
            break
        got += piece
        await asyncio.sleep(0.05)  # the reader's pace, not a wait for the server
    return bytes(got)


async def test_a_download_read_slowly_but_steadily_is_sent_whole(serve: Serve) -> None:
    """A slow link: the client takes something every 50 ms, far within the 1 s timeout,
    but a block of the file takes it longer than that."""
    served = await serve(send_buffer=4096)
    data = os.urandom(400 * 1024)
    output = served.store.write(data, "mp3")
    client = await stall(served.port, output.url, receive_buffer=16384)
    try:
        assert client.status == 200
        assert await read_slowly(client, len(data)) == data  # kept alive: no end
    finally:
        client.sock.close()
    await served.handled(output.url)
    assert not held_open(output.path)


async def test_a_download_that_stops_reading_midway_is_logged_with_what_it_took(
    serve: Serve, caplog: pytest.LogCaptureFixture,
) -> None:
    served = await serve(send_buffer=4096)
    data = os.urandom(400 * 1024)
    output = served.store.write(data, "mp3")
    with caplog.at_level(logging.WARNING, logger="http_files.sending"):
        client = await stall(served.port, output.url, receive_buffer=16384)
        try:
            taken = len(await read_slowly(client, 64 * 1024))  # then it stops
            assert await client.reset_by_server()
        finally:
            client.sock.close()
        await served.handled(output.url)
    said = [r.getMessage() for r in caplog.records if "took nothing" in r.getMessage()]
    assert len(said) == 1, said
    counted = int(said[0].split(" after ")[1].split(" bytes")[0])
    assert taken <= counted < len(data), said[0]  # what it read, and what its buffer holds


async def shared_output(s3_store: StoreLocation, serve: Serve, data: bytes
                        ) -> tuple[Served, StoredFile]:
    """An output in the store, not in this instance's folder (as another one made it)."""
    objects = build_object_store(load_settings(storage_url=s3_store.url,
                                               storage_endpoint_url=s3_store.endpoint))
    assert objects is not None
    served = await serve(SharedOutputs(objects))
    output = await asyncio.to_thread(served.store.write, data, "mp3")
    output.path.unlink()
    return served, output


async def test_a_download_from_the_store_that_stops_reading_is_reset_and_ends(
    s3_store: StoreLocation, serve: Serve, big: bytes,
) -> None:
    served, output = await shared_output(s3_store, serve, big)
    client = await stall(served.port, output.url, {"Range": "bytes=10-"})
    try:
        assert client.status == 206
        assert client.headers["content-length"] == str(len(big) - 10)
        assert client.headers["content-range"] == f"bytes 10-{len(big) - 1}/{len(big)}"
        assert await client.reset_by_server()
        await served.handled(output.url)  # its store stream closed with it
    finally:
        client.sock.close()

    url = f"http://127.0.0.1:{served.port}{output.url}"
    async with aiohttp.ClientSession() as session, session.get(url) as whole:
        assert whole.status == 200 and await whole.read() == big  # one that reads gets it


def test_a_write_timeout_not_above_zero_is_refused(tmp_path: Path) -> None:
    services = services_over(OutputStore(tmp_path / "outputs"))
    with pytest.raises(ValueError, match="write_timeout must be > 0 seconds, got 0"):
        create_app(services, write_timeout=0)
