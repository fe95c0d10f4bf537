"""Training image URLs are fetched without reaching the engine's own network (SSRF).

A real image server on 127.0.0.1 counts every request it gets, and the client's transport
counts every request that leaves the engine: a refusal must leave both at zero. The
checker is never fooled on purpose: a redirect is tested from an allowed name
(``localhost``) to a literal address that is not allowed (``127.0.0.1``), and the resolver
seam gives made-up names the addresses under test, which are then checked and connected
to as they are.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from core.net import AllowedHosts, FetchLimits, IPAddress, SafeFetcher, is_public_address
from core.settings import ConfigurationError, load_settings
from core.training.fetch import fetch_image
from core.training.intake import Intake
from core.training.spec import TrainingLimits
from schemas.errors import EngineError, InvalidRequestError, UpstreamUnavailableError
from schemas.events import LoraTrainingRequested
from tests.core.test_training_images import photos

FIELD = "image_urls.2"
NOT_ALLOWED = f"{FIELD}: the address is not allowed"
PHOTOS = photos(5)


class ImageServer:
    """A real aiohttp image server on 127.0.0.1 recording ``(path, Host header)`` of every
    request: ``/photo/{n}``, ``/to?location=…`` (302), ``/hops/{n}`` (n redirects, then a
    photo), ``/status/{code}``, ``/big`` (a large Content-Length), ``/stream`` (a large
    body without one), ``/slow`` (answers when the server stops)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.received.append((request.path_qs, request.host))
            return await handler(request)

        app = web.Application(middlewares=[record])
        app.router.add_get("/photo/{n}", self._photo)
        app.router.add_get("/to", self._to)
        app.router.add_get("/hops/{n}", self._hops)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/big", self._big)
        app.router.add_get("/stream", self._stream)
        app.router.add_get("/slow", self._slow)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.received]

    async def _photo(self, request: web.Request) -> web.Response:
        return web.Response(body=PHOTOS[int(request.match_info["n"])], content_type="image/png")

    async def _to(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["location"])

    async def _hops(self, request: web.Request) -> web.Response:
        left = int(request.match_info["n"])
        if left == 0:
            return web.Response(body=PHOTOS[0], content_type="image/png")
        raise web.HTTPFound(f"/hops/{left - 1}")

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="internal detail")

    async def _big(self, _: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000, content_type="image/png")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(5):
            await response.write(b"x" * 1000)
        await response.write_eof()
        return response

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)  # headers now, the body when the server stops
        await self._release.wait()
        return response


class RecordingTransport(httpx.AsyncBaseTransport):
    """The real transport, recording every request that leaves the client."""

    def __init__(self, verify: ssl.SSLContext | bool = True) -> None:
        self.sent: list[httpx.Request] = []
        self._inner = httpx.AsyncHTTPTransport(verify=verify)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class FakeResolver:
    """Names → the addresses given, counting lookups; anything else does not resolve."""

    def __init__(self, **names: Sequence[str]) -> None:
        self.answers = {name.replace("_", "."): [ip_address(a) for a in addresses]
                        for name, addresses in names.items()}
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[IPAddress]:
        self.lookups.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    s = ImageServer()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture
async def http(transport: RecordingTransport) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=transport) as client:
        yield client


async def fetch(http: httpx.AsyncClient, url: str, allowed: str = "", *,
                max_bytes: int = 1_000_000, timeout: float = 10.0) -> bytes:
    return await fetch_image(http, url, field=FIELD, max_bytes=max_bytes, timeout=timeout,
                             allowed_hosts=AllowedHosts.parse(allowed))


async def refused(http: httpx.AsyncClient, url: str, allowed: str = "") -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        await fetch(http, url, allowed)
    error = caught.value
    assert error.field == FIELD and not error.retryable and error.code == "INVALID_REQUEST"
    return error


def leaks(error: EngineError, port: int) -> list[str]:
    return [word for word in ("127.0.0.1", str(port), "localhost", "Error", "::1")
            if word in error.message]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("url", [
    "http://localhost:{port}/photo/0",
    "http://LOCALHOST:{port}/photo/0",
    "http://127.0.0.1:{port}/photo/0",
    "http://127.1:{port}/photo/0",
    "http://2130706433:{port}/photo/0",  # decimal 127.0.0.1
    "http://0x7f.1:{port}/photo/0",  # hex
    "http://017700000001:{port}/photo/0",  # octal
    "http://[::1]:{port}/photo/0",
    "http://[::ffff:127.0.0.1]:{port}/photo/0",
    "http://0.0.0.0:{port}/photo/0",
    "http://10.0.0.1:{port}/photo/0",  # nothing listens there: refused, not "unreachable"
    "http://192.168.1.1/photo/0",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "https://[fd00::1]/photo/0",
])
async def test_internal_addresses_are_refused_before_any_request(
    url: str, server: ImageServer, transport: RecordingTransport, http: httpx.AsyncClient
) -> None:
    error = await refused(http, url.format(port=server.port))
    assert error.message == NOT_ALLOWED
    assert transport.sent == [] and server.received == []


@pytest.mark.parametrize(("url", "reason"), [
    ("file:///etc/passwd", "only http and https URLs are fetched"),
    ("ftp://example.com/photo.png", "only http and https URLs are fetched"),
    ("gopher://127.0.0.1:70/_", "only http and https URLs are fetched"),
    ("http://", "not a valid URL"),
    ("http://exa mple.com/", "not a valid URL"),
    ("http://%31%32%37.0.0.1/", "not a valid URL"),
])
async def test_other_schemes_and_broken_urls_are_refused(
    url: str, reason: str, transport: RecordingTransport, http: httpx.AsyncClient
) -> None:
    error = await refused(http, url)
    assert error.message == f"{FIELD}: {reason}"
    assert transport.sent == []


async def test_a_name_is_refused_when_any_of_its_addresses_is_internal(
    transport: RecordingTransport, http: httpx.AsyncClient
) -> None:
    resolver = FakeResolver(mixed_example=["93.184.215.14", "10.1.2.3"],
                            rebound_example=["127.0.0.1"], nat64_example=["64:ff9b::a01:203"])
    fetcher = SafeFetcher(http, FetchLimits(1000, 5.0), resolver=resolver)
    for name in resolver.answers:
        with pytest.raises(InvalidRequestError) as caught:
            await fetcher.fetch(f"http://{name}/photo.png", field=FIELD)
        assert caught.value.message == NOT_ALLOWED
    assert transport.sent == []


async def test_a_redirect_to_an_internal_address_is_refused(
    server: ImageServer, transport: RecordingTransport, http: httpx.AsyncClient
) -> None:
    port = server.port
    inside = f"http://127.0.0.1:{port}/photo/0"  # localhost is allowed, 127.0.0.1 is not
    error = await refused(http, f"http://localhost:{port}/to?location={inside}", "localhost")
    assert error.message == NOT_ALLOWED and leaks(error, port) == []
    assert server.paths == [f"/to?location={inside}"] and len(transport.sent) == 1

    error = await refused(http, f"http://localhost:{port}/to?location=file:///etc/passwd",
                          "localhost")
    assert error.message == f"{FIELD}: only http and https URLs are fetched"


async def test_at_most_three_redirects_are_followed(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    assert await fetch(http, f"http://127.0.0.1:{server.port}/hops/3", "127.0.0.1") == PHOTOS[0]
    assert server.paths == ["/hops/3", "/hops/2", "/hops/1", "/hops/0"]
    server.received.clear()

    error = await refused(http, f"http://127.0.0.1:{server.port}/hops/4", "127.0.0.1")
    assert error.message == f"{FIELD}: more than 3 redirects"
    assert server.paths == ["/hops/4", "/hops/3", "/hops/2", "/hops/1"]  # never /hops/0


# --------------------------------------------------------------------------- allowed hosts


async def test_allowed_hosts_are_fetched_by_name_or_address(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    port = server.port
    assert await fetch(http, f"http://127.0.0.1:{port}/photo/1", "127.0.0.1") == PHOTOS[1]
    assert await fetch(http, f"http://LOCALHOST:{port}/photo/2", " LocalHost ,") == PHOTOS[2]
    assert server.received == [("/photo/1", f"127.0.0.1:{port}"),
                               ("/photo/2", f"localhost:{port}")]
    # Allowing a name does not allow what it stands for, nor the reverse.
    await refused(http, f"http://127.0.0.1:{port}/photo/0", "localhost")
    await refused(http, f"http://localhost:{port}/photo/0", "127.0.0.1")


async def test_the_checked_address_is_the_one_connected_to(
    server: ImageServer, transport: RecordingTransport, http: httpx.AsyncClient
) -> None:
    """One lookup per hop; the request goes to its answer with the name in ``Host``, so
    a second lookup answering otherwise (DNS rebinding) cannot happen."""
    resolver = FakeResolver(images_internal=["127.0.0.1"])
    fetcher = SafeFetcher(http, FetchLimits(100_000, 5.0), resolver=resolver,
                          allowed_hosts=AllowedHosts.parse("images.internal"))
    body = await fetcher.fetch(f"http://images.internal:{server.port}/photo/3", field=FIELD)
    assert body == PHOTOS[3] and resolver.lookups == ["images.internal"]
    assert server.received == [("/photo/3", f"images.internal:{server.port}")]
    assert transport.sent[0].url.host == "127.0.0.1"


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[ssl.SSLContext, ssl.SSLContext]]:
    """(server context, client context trusting it) for the name ``images.test``."""
    cert, key = _self_signed(tmp_path, "images.test")
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert, key)
    yield serving, ssl.create_default_context(cafile=str(cert))


async def test_https_verifies_the_certificate_against_the_name_not_the_address(
    tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    serving, trusting = tls
    server = ImageServer()
    await server.start(ssl_context=serving)
    resolver = FakeResolver(images_test=["127.0.0.1"], other_test=["127.0.0.1"])
    transport = RecordingTransport(verify=trusting)
    try:
        async with httpx.AsyncClient(transport=transport) as http:
            fetcher = SafeFetcher(http, FetchLimits(100_000, 5.0), resolver=resolver,
                                  allowed_hosts=AllowedHosts.parse("images.test,other.test"))
            body = await fetcher.fetch(f"https://images.test:{server.port}/photo/4", field=FIELD)
            assert body == PHOTOS[4]
            assert server.received == [("/photo/4", f"images.test:{server.port}")]
            assert transport.sent[0].extensions["sni_hostname"] == "images.test"
            # The certificate names images.test only: another name at the same address fails.
            with pytest.raises(UpstreamUnavailableError) as caught:
                await fetcher.fetch(f"https://other.test:{server.port}/photo/4", field=FIELD)
            assert caught.value.message == f"{FIELD}: the image server could not be reached"
            assert isinstance(caught.value.__cause__, httpx.ConnectError)
            assert len(server.received) == 1
    finally:
        await server.stop()


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(("code", "kind", "retryable"), [
    (404, InvalidRequestError, False), (403, InvalidRequestError, False),
    (429, UpstreamUnavailableError, True), (503, UpstreamUnavailableError, True),
])
async def test_http_errors_say_the_status_only(
    code: int, kind: type[EngineError], retryable: bool, server: ImageServer,
    http: httpx.AsyncClient
) -> None:
    with pytest.raises(kind) as caught:
        await fetch(http, f"http://127.0.0.1:{server.port}/status/{code}", "127.0.0.1")
    assert caught.value.retryable is retryable
    assert f"(HTTP {code})" in caught.value.message and caught.value.message.startswith(FIELD)
    assert leaks(caught.value, server.port) == [] and "internal detail" not in caught.value.message


async def test_an_unreachable_server_is_retryable_and_named_by_nothing_but_the_field(
    http: httpx.AsyncClient
) -> None:
    with socket.socket() as closed:  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with pytest.raises(UpstreamUnavailableError) as caught:
            await fetch(http, f"http://127.0.0.1:{port}/photo/0", "127.0.0.1")
    assert caught.value.message == f"{FIELD}: the image server could not be reached"
    assert caught.value.retryable and leaks(caught.value, port) == []
    assert isinstance(caught.value.__cause__, httpx.ConnectError)  # kept for the log

    fetcher = SafeFetcher(http, FetchLimits(1000, 5.0), resolver=FakeResolver())
    with pytest.raises(UpstreamUnavailableError) as caught:
        await fetcher.fetch("http://nowhere.example/photo.png", field=FIELD)
    assert caught.value.message == f"{FIELD}: the image server could not be reached"


async def test_images_over_the_byte_limit_are_refused(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    for path in ("/big", "/stream"):  # Content-Length known, then a chunked body
        with pytest.raises(InvalidRequestError) as caught:
            await fetch(http, f"http://127.0.0.1:{server.port}{path}", "127.0.0.1",
                        max_bytes=2000)
        assert caught.value.message == (
            f"{FIELD}: the image is larger than LORA_MAX_IMAGE_BYTES (2000 bytes)")


async def test_the_timeout_covers_the_whole_download(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    with pytest.raises(UpstreamUnavailableError) as caught:
        await fetch(http, f"http://127.0.0.1:{server.port}/slow", "127.0.0.1", timeout=0.3)
    assert caught.value.message == (
        f"{FIELD}: the image server did not answer within LORA_FETCH_TIMEOUT (0.3 s)")


# --------------------------------------------------------------------------- intake, settings


def _request(urls: list[str]) -> LoraTrainingRequested:
    return LoraTrainingRequested(request_id=str(uuid.uuid4()), character_id="mia",
                                 trigger_word="zqx", image_urls=urls)


async def test_the_training_intake_refuses_internal_urls_unless_allowed(
    server: ImageServer, transport: RecordingTransport, http: httpx.AsyncClient
) -> None:
    urls = [f"http://127.0.0.1:{server.port}/photo/{n}" for n in range(5)]
    with pytest.raises(InvalidRequestError) as caught:
        await Intake(TrainingLimits(), http, 5.0).take(_request(urls), "kafka")
    assert caught.value.field == "image_urls.0"
    assert caught.value.message == "image_urls.0: the address is not allowed"
    assert transport.sent == [] and server.received == []

    allowed = Intake(TrainingLimits(), http, 5.0,
                     fetch_allowed_hosts=AllowedHosts.parse("127.0.0.1"))
    spec, images = await allowed.take(_request(urls), "kafka")
    assert len(images) == 5 and len(spec.image_sha256) == 5 and len(server.received) == 5


@pytest.mark.parametrize("value", ["http://images.internal", "images.internal:8080",
                                   "images.internal/photos", "a b"])
def test_allowed_hosts_setting_rejects_anything_but_hosts(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    with pytest.raises(ConfigurationError, match="LORA_FETCH_ALLOWED_HOSTS"):
        load_settings(lora_fetch_allowed_hosts=value)


def test_allowed_hosts_setting_defaults_to_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORA_FETCH_ALLOWED_HOSTS", raising=False)
    assert AllowedHosts.parse(load_settings().lora_fetch_allowed_hosts) == AllowedHosts()
    parsed = AllowedHosts.parse(load_settings(
        lora_fetch_allowed_hosts="Images.Internal., 10.0.0.5, [fd00::5]").lora_fetch_allowed_hosts)
    assert parsed.names == {"images.internal"}
    assert parsed.addresses == {ip_address("10.0.0.5"), ip_address("fd00::5")}


@pytest.mark.parametrize(("address", "public"), [
    ("93.184.215.14", True), ("2606:4700::1111", True), ("::ffff:93.184.215.14", True),
    ("64:ff9b::5db8:d70e", True),  # NAT64 of a public address
    ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.0.1", False), ("192.168.0.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False),
    ("224.0.1.1", False), ("255.255.255.255", False), ("192.0.2.1", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fd00::1", False), ("fec0::1", False),
    ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
    ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
    ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
    ("2001:db8::1", False),
])
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(ip_address(address)) is public
