"""Requests' URLs (LoRA ``image_urls``, ``init_image_url``) are fetched straight from the
address :class:`SafeFetcher` checked, never through HTTP_PROXY/HTTPS_PROXY, while the
shared client (ElevenLabs, the Persona Engine) still follows them. The clients as the
engine builds them, a real forward proxy and a real http + https image server named
``images.test``, its certificate trusted through SSL_CERT_FILE."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator, Sequence
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from consumers.engine import Engine
from core.net import AllowedHosts, FetchLimits, SafeFetcher
from core.net.policy import IPAddress
from core.settings import Settings, load_settings
from tests.support.http_proxy import PROXY_BODY, HttpProxy

IMAGE = b"\x89PNG image bytes"
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


async def _images_test(host: str, port: int) -> Sequence[IPAddress]:
    assert host == "images.test"
    return [ip_address("127.0.0.1")]


def _settings() -> Settings:
    return load_settings(kafka_bootstrap_servers="127.0.0.1:9", voice_backend="local",
                         persona_engine_url="http://persona.test:8000", _env_file=None)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``images.test`` and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.test")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "images.pem", tmp_path / "images.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
async def images(certificate: tuple[Path, Path]) -> AsyncIterator[tuple[int, int]]:
    """The image server's http and https ports on 127.0.0.1."""
    app = web.Application()
    async def photo(_: web.Request) -> web.Response:
        return web.Response(body=IMAGE)

    app.router.add_get("/photo.png", photo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(*certificate)
    plain = web.TCPSite(runner, "127.0.0.1", 0)
    secure = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=serving)
    await plain.start()
    await secure.start()
    ports = [address[1] for address in runner.addresses]
    yield ports[0], ports[1]
    await runner.cleanup()


@pytest.fixture
async def proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HttpProxy]:
    """A proxy in HTTP_PROXY and HTTPS_PROXY (no NO_PROXY). It tunnels to 127.0.0.1 (the
    fetcher's URLs name the checked IP): through it, an https fetch fails on the
    certificate, which names ``images.test``; an http one gets the proxy's answer."""
    proxy = HttpProxy(routes={"127.0.0.1": "127.0.0.1"})
    await proxy.start()
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    yield proxy
    await proxy.close()


@pytest.fixture
async def engine(proxy: HttpProxy, certificate: tuple[Path, Path],
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Engine]:
    """An engine built (not started) with the proxy in its environment and the image
    server's certificate as its CA bundle."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    engine = Engine(_settings(), "127.0.0.1:9", registry=CollectorRegistry())
    yield engine
    await engine.http.aclose()
    await engine.fetch_http.aclose()


async def test_url_fetches_go_direct_whatever_the_proxy_variables(
        engine: Engine, proxy: HttpProxy, images: tuple[int, int]) -> None:
    http_port, https_port = images
    fetcher = SafeFetcher(engine.fetch_http, FetchLimits(max_bytes=1000, timeout=5.0),
                          allowed_hosts=AllowedHosts.parse("images.test"),
                          resolver=_images_test)
    assert await fetcher.fetch(f"https://images.test:{https_port}/photo.png",
                               field="init_image_url") == IMAGE
    assert await fetcher.fetch(f"http://images.test:{http_port}/photo.png",
                               field="image_urls[0]") == IMAGE
    assert proxy.seen == []
    # still timed as an upstream
    assert engine.metrics.registry.get_sample_value(
        "engine_upstream_request_seconds_count",
        {"upstream": "image_fetch", "outcome": "2xx"}) == 2


async def test_elevenlabs_and_the_persona_engine_still_go_through_the_proxy(
        engine: Engine, proxy: HttpProxy) -> None:
    settings = _settings()
    assert engine.http.trust_env
    with pytest.raises(httpx.ProxyError):  # the proxy refuses to tunnel to the internet
        await engine.http.get(f"{settings.elevenlabs_api_url}/models")
    answer = await engine.http.get(f"{settings.persona_engine_url}/v1/models")
    assert answer.content == PROXY_BODY
    assert proxy.seen == ["CONNECT api.elevenlabs.io:443 HTTP/1.1",
                          "GET http://persona.test:8000/v1/models HTTP/1.1"]
