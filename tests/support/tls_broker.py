"""A Kafka-protocol broker reachable only over TLS: Tansu behind Debian's stunnel4.

Tansu listens in plaintext on one port of 127.0.0.1 and *advertises* the TLS port, which
stunnel serves; so every client request after the first also goes through TLS, and a
client that skips TLS cannot use the broker at all. With ``mutual=True`` stunnel also
demands a client certificate signed by the test CA.

The certificates are made per instance (:class:`CertificateSet`): a CA, the broker's
certificate for ``127.0.0.1``/``localhost``, and a client certificate.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from consumers.broker import EmbeddedBroker
from consumers.broker._process import ChildProcess
from consumers.broker.base import BrokerError, BrokerStartError
from consumers.broker.tansu import TansuBroker
from consumers.topics import create_missing_topics
from core.settings import load_settings

__all__ = ["STUNNEL", "CertificateSet", "TlsBroker", "security_settings"]

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
_HOST = "127.0.0.1"


@dataclass(frozen=True)
class CertificateSet:
    """PEM files in ``folder``: ``ca.pem``, ``broker.pem``/``broker.key``,
    ``client.pem``/``client.key`` (signed by the CA) and ``stranger.pem``/``stranger.key``
    (a client certificate signed by another CA, which mutual TLS must refuse)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    @classmethod
    def make(cls, folder: Path) -> CertificateSet:
        folder.mkdir(parents=True, exist_ok=True)
        ca_key, ca_cert = _authority("engine test CA")
        _write(folder / "ca.pem", folder / "ca.key", ca_cert, ca_key)
        for name, server in (("broker", True), ("client", False)):
            key, cert = _signed(name, ca_key, ca_cert, server=server)
            _write(folder / f"{name}.pem", folder / f"{name}.key", cert, key)
        other_key, other_cert = _authority("someone else's CA")
        key, cert = _signed("stranger", other_key, other_cert, server=False)
        _write(folder / "stranger.pem", folder / "stranger.key", cert, key)
        return cls(folder)


def reissue(certificates: CertificateSet, name: str, *, expired: bool = False) -> int:
    """A new client certificate and key for ``name`` from the set's CA, written over the
    old files (as a rotation does); ``expired``: valid until yesterday. Its serial."""
    ca_key = serialization.load_pem_private_key(
        (certificates.folder / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(certificates.ca.read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    window = (now - datetime.timedelta(days=3), now - datetime.timedelta(days=1)) if expired \
        else (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))
    key, cert = _signed(name, ca_key, ca_cert, server=False, window=window)
    _write(certificates.cert(name), certificates.key(name), cert, key)
    return cert.serial_number


def security_settings(certificates: CertificateSet, *, mutual: bool,
                      client: str = "client") -> dict[str, str]:
    """The engine's settings (environment names) for a broker behind :class:`TlsBroker`."""
    settings = {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_FILE": str(certificates.ca)}
    if mutual:
        settings["KAFKA_SSL_CERT_FILE"] = str(certificates.cert(client))
        settings["KAFKA_SSL_KEY_FILE"] = str(certificates.key(client))
    return settings


class TlsBroker(EmbeddedBroker):
    """Tansu behind stunnel: ``bootstrap_servers`` is the TLS address, the only one the
    broker advertises. Raises :class:`BrokerStartError` when stunnel is not installed."""

    name = "tansu+stunnel"
    capabilities = TansuBroker.capabilities

    def __init__(self, certificates: CertificateSet, *, mutual: bool = False) -> None:
        self.certificates = certificates
        self.mutual = mutual
        self._tls_port: int | None = None
        self._tansu: TansuBroker | None = None
        self._stunnel: ChildProcess | None = None
        self._folder = Path(tempfile.mkdtemp(prefix="stunnel-"))

    @property
    def bootstrap_servers(self) -> str:
        if self._tls_port is None:
            raise BrokerError("the TLS broker is not started")
        return f"{_HOST}:{self._tls_port}"

    @property
    def plaintext_servers(self) -> str:
        """Tansu's own plaintext port: it answers, but names only the TLS address."""
        if self._tansu is None:
            raise BrokerError("the TLS broker is not started")
        return self._tansu.bootstrap_servers

    @property
    def running(self) -> bool:
        return (self._tansu is not None and self._tansu.running
                and self._stunnel is not None and self._stunnel.alive())

    def start(self, timeout: float = 15.0) -> None:
        if STUNNEL is None:
            raise BrokerStartError("stunnel4 is not installed (apt-get install stunnel4)")
        try:
            self._start(time.monotonic() + timeout)
        except BaseException:
            self.stop()  # Tansu (its own session) must not outlive a failed start
            raise

    def _start(self, deadline: float) -> None:
        self._tls_port = _free_port()
        self._tansu = TansuBroker(advertised=f"{_HOST}:{self._tls_port}")
        self._tansu.start(max(0.1, deadline - time.monotonic()))
        config = self._folder / "stunnel.conf"
        config.write_text(self._config(self._tansu.bootstrap_servers))
        self._stunnel = ChildProcess([STUNNEL, str(config)], name="stunnel")
        while True:  # stunnel listens once its configuration is loaded
            if not self._stunnel.alive():
                raise BrokerStartError("stunnel exited at start", self._stunnel.stderr_tail())
            try:
                with socket.create_connection((_HOST, self._tls_port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise BrokerStartError(f"stunnel did not listen on {_HOST}:"
                                           f"{self._tls_port}", self._stunnel.stderr_tail())
                time.sleep(0.02)  # a child process's port: nothing to wait on but the port

    def _config(self, backend: str) -> str:
        c = self.certificates
        lines = [
            "foreground = yes", "pid =", "debug = 4", "syslog = no",
            "[kafka]",
            f"accept = {_HOST}:{self._tls_port}",
            f"connect = {backend}",
            f"cert = {c.cert('broker')}",
            f"key = {c.key('broker')}",
        ]
        if self.mutual:
            lines += [f"CAfile = {c.ca}", "verifyChain = yes", "requireCert = yes"]
        return "\n".join(lines) + "\n"

    def client_settings(self, client: str = "client") -> dict[str, str]:
        return security_settings(self.certificates, mutual=self.mutual, client=client)

    def create_topics(self, names: Sequence[str], partitions: int) -> None:
        from consumers.security import KafkaSecurity

        security = KafkaSecurity.from_settings(load_settings(_env_file=None, **{
            key.lower(): value for key, value in self.client_settings().items()}))
        with ThreadPoolExecutor(1, thread_name_prefix="tls-create-topics") as pool:
            pool.submit(asyncio.run, create_missing_topics(
                self.bootstrap_servers, names, partitions, security=security)).result()

    def stop(self, timeout: float = 10.0) -> None:
        stunnel, self._stunnel = self._stunnel, None
        if stunnel is not None:
            stunnel.stop(timeout)
        tansu, self._tansu = self._tansu, None
        if tansu is not None:
            tansu.stop(timeout)
        self._tls_port = None
        shutil.rmtree(self._folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


_Window = tuple[datetime.datetime, datetime.datetime]


def _validity(builder: x509.CertificateBuilder, window: _Window | None = None
              ) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    start, end = window or (now - datetime.timedelta(minutes=5),
                            now + datetime.timedelta(days=2))
    return builder.not_valid_before(start).not_valid_after(end).serial_number(
        x509.random_serial_number())


def _authority(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _validity(x509.CertificateBuilder().subject_name(_name(common)).issuer_name(
        _name(common)).public_key(key.public_key())).add_extension(
        x509.BasicConstraints(ca=True, path_length=0), critical=True).add_extension(
        x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                      content_commitment=False, key_encipherment=False,
                      data_encipherment=False, key_agreement=False, encipher_only=False,
                      decipher_only=False), critical=True).add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False).sign(
        key, hashes.SHA256())
    return key, cert


def _signed(common: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *,
            server: bool, window: _Window | None = None
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _validity(x509.CertificateBuilder().subject_name(_name(common)).issuer_name(
        ca_cert.subject).public_key(key.public_key()), window).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True).add_extension(
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server
                               else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
        critical=False).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
        critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(_HOST))]),
            critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write(cert_path: Path, key_path: Path, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> None:
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
