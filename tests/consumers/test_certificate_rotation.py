"""Certificates rotated on disk are presented from the next connection, without a restart.

A real TLS server on 127.0.0.1 that requires a client certificate from the test CA, and
the very context every Kafka client of the engine gets (``KafkaSecurity.from_settings``
with mutual TLS). An engine started with a certificate that has expired is refused; once
the files are replaced (as cert-manager or a Secret mount does), the next connection
presents the new certificate and is let in, and a later rotation again. A rotation
caught half-way (a certificate that does not match
its key yet) keeps the previous certificate in use, with one warning, until the pair
loads."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from consumers.security import KafkaSecurity
from core.settings import load_settings
from tests.support.tls_broker import CertificateSet, reissue, security_settings


class MutualTlsServer:
    """Answers ``ok`` to each client whose certificate the CA signed and that is valid;
    ``serials`` holds the certificate serial of each client let in."""

    def __init__(self, certificates: CertificateSet) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                             cafile=str(certificates.ca))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(certificates.cert("broker"), certificates.key("broker"))
        self._context = context
        self.serials: asyncio.Queue[int] = asyncio.Queue()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0,
                                                  ssl=self._context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer: dict[str, Any] = writer.get_extra_info("ssl_object").getpeercert()
        await self.serials.put(int(peer["serialNumber"], 16))
        while line := await reader.readline():
            writer.write(b"ok " + line)
            await writer.drain()
        writer.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[MutualTlsServer, CertificateSet]]:
    certificates = CertificateSet.make(tmp_path / "tls")
    tls = MutualTlsServer(certificates)
    await tls.start()
    yield tls, certificates
    await tls.stop()


async def ask(port: int, context: ssl.SSLContext
              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=context), timeout=10)
    writer.write(b"hello\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.readline(), timeout=10)
    if not answer:  # TLS 1.3: the server checks the client's certificate after the
        writer.close()  # handshake, and closes the connection when it refuses it
        raise ConnectionResetError("the server refused the client certificate")
    assert answer == b"ok hello\n"
    return reader, writer


async def test_a_rotated_certificate_is_presented_from_the_next_connection(
    server: tuple[MutualTlsServer, CertificateSet], caplog: pytest.LogCaptureFixture,
) -> None:
    tls, certificates = server
    reissue(certificates, "client", expired=True)
    settings = load_settings(_env_file=None, **{
        name.lower(): value for name, value in security_settings(certificates,
                                                                 mutual=True).items()})
    context = KafkaSecurity.from_settings(settings).options()["ssl_context"]

    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await ask(tls.port, context)  # the server refuses the expired certificate

    renewed = reissue(certificates, "client")  # the rotation, in place
    with caplog.at_level(logging.INFO, logger="consumers.tls_context"):
        kept = await ask(tls.port, context)  # no restart, no new context
    assert await asyncio.wait_for(tls.serials.get(), 10) == renewed
    assert "presented and trusted from the next connection" in caplog.text

    kept[1].close()
    again = reissue(certificates, "client")
    _, writer = await ask(tls.port, context)
    assert await asyncio.wait_for(tls.serials.get(), 10) == again
    writer.close()


async def test_a_rotation_caught_half_way_keeps_the_previous_certificate(
    server: tuple[MutualTlsServer, CertificateSet], caplog: pytest.LogCaptureFixture,
) -> None:
    tls, certificates = server
    first = reissue(certificates, "client")
    settings = load_settings(_env_file=None, **{
        name.lower(): value for name, value in security_settings(certificates,
                                                                 mutual=True).items()})
    context = KafkaSecurity.from_settings(settings).options()["ssl_context"]
    old_key = certificates.key("client").read_bytes()
    reissue(certificates, "client")
    certificates.key("client").write_bytes(old_key)  # the new certificate, the old key
    with caplog.at_level(logging.WARNING, logger="consumers.tls_context"):
        for _ in range(3):  # reconnections meanwhile: the previous pair, one warning
            _, writer = await ask(tls.port, context)
            writer.close()
            assert await asyncio.wait_for(tls.serials.get(), 10) == first
    (warning,) = [r.getMessage() for r in caplog.records if "cannot be loaded" in r.getMessage()]
    assert "previous files stay in use" in warning

    second = reissue(certificates, "client")  # the rotation completes
    _, writer = await ask(tls.port, context)
    writer.close()
    assert await asyncio.wait_for(tls.serials.get(), 10) == second
