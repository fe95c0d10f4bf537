"""A hostile image server cannot exhaust the engine's memory or crash a fetch, nor can a
malformed URL from the caller.

A real aiohttp server on 127.0.0.1 (allowed through ``AllowedHosts``, as an operator
would) answers with compression bombs, codings sent though identity was asked for, and
broken redirects; URLs the socket calls cannot take (a port over 65535, a host name
label over 63 characters) are refused before anything is sent, and internationalised
host names are fetched by their IDNA form, through the same address checks. Memory is measured with :mod:`tracemalloc`, which sees every ``bytes``
and zlib buffer: a bomb expands to 64 MiB, the limit is 200 kB, the bound 16 MiB.
"""

from __future__ import annotations

import gzip
import random
import ssl
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Sequence
from functools import cache
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from core.net import AllowedHosts, FetchLimits, IPAddress, SafeFetcher
from schemas.errors import InvalidRequestError
from tests.core.test_training_fetch import _self_signed
from tests.core.test_training_images import photos

FIELD = "init_image_url"
LIMIT = 200_000
PHOTO = photos(1)[0]
TOO_LARGE = f"{FIELD}: the image is larger than LORA_MAX_IMAGE_BYTES ({LIMIT} bytes)"
NOT_SUPPORTED = (f"{FIELD}: the image server sent the image in a content encoding that is "
                 "not supported")
BROKEN_REDIRECT = f"{FIELD}: the image server redirected to an invalid URL"
BOMB_BYTES = 64 * 2**20
MEMORY_BOUND = 16 * 2**20


def _compress(data: bytes, wbits: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return compressor.compress(data) + compressor.flush()


GZIP, ZLIB, RAW_DEFLATE = 31, 15, -15


@cache
def bomb(wbits: int) -> bytes:
    """BOMB_BYTES of zeros in ``wbits``' format: about 1000 times smaller."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    zeros = bytes(2**20)
    return b"".join([compressor.compress(zeros) for _ in range(BOMB_BYTES // len(zeros))]
                    + [compressor.flush()])


class HostileServer:
    """Answers ``GET /body`` with ``self.body`` under ``self.headers``, ``GET /to`` with
    a 302 to ``self.location``; records the Accept-Encoding and Host of each ``/body``
    request."""

    def __init__(self) -> None:
        self.body = b""
        self.headers: dict[str, str] = {}
        self.location = ""
        self.accept_encodings: list[str | None] = []
        self.hosts: list[str] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_get("/body", self._body)
        app.router.add_get("/to", self._to)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _body(self, request: web.Request) -> web.Response:
        self.accept_encodings.append(request.headers.get("Accept-Encoding"))
        self.hosts.append(request.host)
        return web.Response(body=self.body, headers={"Content-Type": "image/png",
                                                     **self.headers})

    async def _to(self, _: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": self.location})


@pytest.fixture
async def server() -> AsyncIterator[HostileServer]:
    s = HostileServer()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def fetcher() -> AsyncIterator[SafeFetcher]:
    limits = FetchLimits(LIMIT, 10.0, max_bytes_setting="LORA_MAX_IMAGE_BYTES")
    async with httpx.AsyncClient() as client:  # its default Accept-Encoding is gzip, …
        yield SafeFetcher(client, limits, allowed_hosts=AllowedHosts.parse("127.0.0.1"))


async def refusal(fetcher: SafeFetcher, url: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        await fetcher.fetch(url, field=FIELD)
    error = caught.value
    assert error.field == FIELD and not error.retryable and error.code == "INVALID_REQUEST"
    assert "127.0.0.1" not in error.message and "Error" not in error.message
    return error


async def peak_memory_of_refusal(fetcher: SafeFetcher, url: str) -> tuple[str, int]:
    tracemalloc.start()
    try:
        message = (await refusal(fetcher, url)).message
        return message, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------------- bombs


@pytest.mark.parametrize(("coding", "inner", "outer"), [  # codings in the order applied
    ("gzip, gzip", GZIP, GZIP), ("deflate, gzip", ZLIB, GZIP), ("gzip, deflate", GZIP, ZLIB),
])
async def test_a_nested_compression_bomb_is_refused_without_being_expanded(
    coding: str, inner: int, outer: int, server: HostileServer, fetcher: SafeFetcher
) -> None:
    server.headers = {"Content-Encoding": coding}
    server.body = _compress(bomb(inner), outer)
    assert len(server.body) < 2000  # a 64 MiB body in under 2 kB
    message, peak = await peak_memory_of_refusal(fetcher, server.url("/body"))
    assert peak < MEMORY_BOUND, f"{peak / 2**20:.0f} MiB held for a refused image"
    assert message == NOT_SUPPORTED


@pytest.mark.parametrize(("coding", "wbits"), [
    ("gzip", GZIP), ("x-gzip", GZIP), ("deflate", ZLIB), ("deflate", RAW_DEFLATE),
])
async def test_a_single_compression_bomb_is_cut_off_at_the_limit(
    coding: str, wbits: int, server: HostileServer, fetcher: SafeFetcher
) -> None:
    server.headers = {"Content-Encoding": coding}
    server.body = bomb(wbits)
    assert len(server.body) < LIMIT  # under the limit as sent, far over it decoded
    message, peak = await peak_memory_of_refusal(fetcher, server.url("/body"))
    assert peak < MEMORY_BOUND, f"{peak / 2**20:.0f} MiB held for a refused image"
    assert message == TOO_LARGE


# --------------------------------------------------------------------------- codings


@pytest.mark.parametrize(("coding", "wbits"), [
    ("gzip", GZIP), ("x-gzip", GZIP), ("deflate", ZLIB), ("deflate", RAW_DEFLATE),
    ("GZIP, identity", GZIP), ("none", None),  # an unknown coding is ignored, as by httpx
])
async def test_identity_is_asked_for_and_one_coding_sent_anyway_is_undone(
    coding: str, wbits: int | None, server: HostileServer, fetcher: SafeFetcher
) -> None:
    server.headers = {"Content-Encoding": coding}
    server.body = PHOTO if wbits is None else _compress(PHOTO, wbits)
    assert await fetcher.fetch(server.url("/body"), field=FIELD) == PHOTO
    assert server.accept_encodings == ["identity"]


async def test_the_limit_holds_exactly_for_decoded_bodies_of_many_chunks(
    server: HostileServer, fetcher: SafeFetcher
) -> None:
    image = random.Random(7).randbytes(LIMIT - 50_000) + bytes(50_000)  # ~150 kB as sent
    server.headers = {"Content-Encoding": "gzip"}
    server.body = gzip.compress(image)
    assert await fetcher.fetch(server.url("/body"), field=FIELD) == image

    server.body = gzip.compress(image + b"\0")
    assert (await refusal(fetcher, server.url("/body"))).message == TOO_LARGE


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip"])
async def test_codings_that_are_not_undone_here_are_refused(
    coding: str, server: HostileServer, fetcher: SafeFetcher
) -> None:
    server.headers = {"Content-Encoding": coding}
    server.body = PHOTO
    assert (await refusal(fetcher, server.url("/body"))).message == NOT_SUPPORTED


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_body_not_in_its_coding_is_refused(
    coding: str, server: HostileServer, fetcher: SafeFetcher
) -> None:
    server.headers = {"Content-Encoding": coding}
    server.body = PHOTO
    error = await refusal(fetcher, server.url("/body"))
    assert error.message == f"{FIELD}: the image server sent a body that could not be decompressed"


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("location", [
    "http:evil",  # httpx.InvalidURL while httpx builds the redirect it will not follow
    "https:evil/x.png",
    "mailto:x",
    "http://[::1",  # httpx.RemoteProtocolError for the same reason
    "http://example.com:abc/",
    "http://xn--/x.png",  # idna.IDNAError
    "http://xn--zz--.example/",
    "http://127.0.0.1:99999/x.png",  # OverflowError from the socket call
    "http://127.0.0.1:0/x.png",
    f"http://a{'b' * 70}.example/x.png",  # UnicodeError from the system resolver
    "http://www.xn--zz--.example/",
    f"http://127.0.0.1/{'a' * 9000}",
])
async def test_a_broken_redirect_is_a_clear_refusal(
    location: str, server: HostileServer, fetcher: SafeFetcher
) -> None:
    server.location = location
    assert (await refusal(fetcher, server.url("/to"))).message == BROKEN_REDIRECT
    # and the next fetch goes on as ever
    server.body = PHOTO
    assert await fetcher.fetch(server.url("/body"), field=FIELD) == PHOTO


# --------------------------------------------------------------------------- the caller's URL

NOT_A_URL = f"{FIELD}: not a valid URL"


@pytest.mark.parametrize(("url", "detail"), [
    ("http://127.0.0.1:99999/body", " (the port must be 1 to 65535)"),  # was OverflowError
    ("http://127.0.0.1:0/body", " (the port must be 1 to 65535)"),
    (f"http://a{'b' * 70}.com/x.png",  # was UnicodeError, from getaddrinfo's IDNA codec
     " (a label of the host name is longer than 63 characters)"),
    (f"http://{'.'.join(['a' * 60] * 5)}/x.png",
     " (the host name is longer than 253 characters)"),
    ("http://xn--zz--.example/x.png", " (the host name is not valid IDNA)"),  # was IDNAError
    ("http://www.xn--zz--.example/x.png", " (the host name is not valid IDNA)"),
    ("http://ä..example/x.png", ""),
    ("http://\u2488.example/x.png", ""),  # no IDNA form at all
    (f"http://127.0.0.1/{'a' * 9000}", " (longer than 8192 characters)"),
])
async def test_a_malformed_url_is_refused_before_anything_is_sent(
    url: str, detail: str, server: HostileServer, fetcher: SafeFetcher
) -> None:
    url = url.replace("127.0.0.1/", f"127.0.0.1:{server.port}/body/")
    assert (await refusal(fetcher, url)).message == NOT_A_URL + detail
    assert server.accept_encodings == []


class Resolver:
    """Every name → 127.0.0.1, recording the names asked for."""

    def __init__(self) -> None:
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[IPAddress]:
        self.lookups.append(host)
        return [ip_address("127.0.0.1")]


@pytest.mark.parametrize("host", ["bücher.example", "BÜCHER.example", "xn--bcher-kva.example"])
async def test_an_internationalised_host_name_is_fetched_by_its_idna_form(
    host: str, server: HostileServer
) -> None:
    server.body = PHOTO
    resolver = Resolver()
    async with httpx.AsyncClient() as client:
        fetcher = SafeFetcher(client, FetchLimits(LIMIT, 10.0), resolver=resolver,
                              allowed_hosts=AllowedHosts.parse("xn--bcher-kva.example"))
        assert await fetcher.fetch(f"http://{host}:{server.port}/body", field=FIELD) == PHOTO
    assert resolver.lookups == ["xn--bcher-kva.example"]
    assert server.hosts == [f"xn--bcher-kva.example:{server.port}"]


async def test_an_internationalised_host_name_goes_through_the_address_checks(
    server: HostileServer
) -> None:
    resolver = Resolver()
    async with httpx.AsyncClient() as client:
        fetcher = SafeFetcher(client, FetchLimits(LIMIT, 10.0), resolver=resolver)
        error = await refusal(fetcher, f"http://bücher.example:{server.port}/body")
    assert error.message == f"{FIELD}: the address is not allowed"
    assert resolver.lookups == ["xn--bcher-kva.example"] and server.hosts == []


async def test_https_to_an_internationalised_name_verifies_its_idna_form(
    tmp_path: Path
) -> None:
    """ß is ``xn--zca`` in IDNA 2008 (httpx's) but ``ss`` in Python's own IDNA 2003 codec:
    the name passed for SNI and certificate checks must be httpx's ASCII form."""
    cert, key = _self_signed(tmp_path, "xn--zca.test")
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert, key)
    server = HostileServer()
    await server.start(ssl_context=serving)
    server.body = PHOTO
    try:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert))
                                     ) as client:
            fetcher = SafeFetcher(client, FetchLimits(LIMIT, 10.0), resolver=Resolver(),
                                  allowed_hosts=AllowedHosts.parse("xn--zca.test"))
            body = await fetcher.fetch(f"https://ß.test:{server.port}/body", field=FIELD)
        assert body == PHOTO and server.hosts == [f"xn--zca.test:{server.port}"]
    finally:
        await server.stop()
