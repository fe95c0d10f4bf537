"""The Kafka clients' TLS context, taking up certificates rotated on disk.

Certificates expire: cert-manager, Vault agents and Kubernetes Secret mounts replace the
files of KAFKA_SSL_CERT_FILE, KAFKA_SSL_KEY_FILE and KAFKA_SSL_CA_FILE in place (a Secret
mount swaps a symbolic link). An engine that read them once at start-up would present its
old certificate until restarted, and every reconnection after the old one expired would
be refused.

:class:`RotatingContext` is the one ``ssl.SSLContext`` every client gets. Before each new
TLS connection (``wrap_bio``, which asyncio calls once per connection) it compares the
files' identity (inode, size, modification time) with those it loaded, and loads what
changed into itself: the next connections present the new certificate, those already open
keep theirs. A certificate and key that do not match yet (one file written, the other not)
or a half-written file are a warning, and the previous ones stay in use until the pair
loads. A new CA file adds its authorities; those loaded before stay trusted until restart
(OpenSSL cannot unload them).
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any, Self

__all__ = ["RotatingContext"]

logger = logging.getLogger(__name__)

_Identity = tuple[int, int, int] | None


class RotatingContext(ssl.SSLContext):
    """A client context over the authorities of ``ca`` (None: the system's); for mutual
    TLS, :meth:`present` a certificate. Raises what ``ssl`` raises when a file cannot be
    used."""

    _ca: Path | None
    _pair: tuple[Path, Path] | None
    _seen: dict[str, _Identity]

    def __new__(cls, ca: Path | None) -> Self:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(self, ca: Path | None) -> None:
        self._ca = ca
        self._pair = None
        self._seen = {}
        if ca is None:
            self.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            self._load_ca()

    def present(self, cert: Path, key: Path) -> None:
        """Mutual TLS: present ``cert`` (its private ``key``), and its replacements."""
        self._pair = (cert, key)
        self._load_pair()

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self.reload_if_changed()
        return super().wrap_bio(*args, **kwargs)

    def reload_if_changed(self) -> None:
        """Loads the files that changed since they were loaded (see the module)."""
        if self._ca is not None and _identity(self._ca) != self._seen.get("ca"):
            try:
                self._load_ca()
                logger.info("Kafka TLS: %s changed; its authorities are trusted from the next "
                            "connection", self._ca)
            except (ssl.SSLError, OSError, ValueError) as exc:
                logger.warning("Kafka TLS: %s changed but cannot be loaded (%s); trusting "
                               "what was loaded before", self._ca, _reason(exc))
        if self._pair is not None and (_identity(self._pair[0]), _identity(self._pair[1])) \
                != (self._seen.get("cert"), self._seen.get("key")):
            try:
                self._load_pair()
                logger.info("Kafka TLS: %s changed; presented from the next connection",
                            self._pair[0])
            except (ssl.SSLError, OSError, ValueError) as exc:
                logger.warning("Kafka TLS: %s or %s changed but cannot be loaded (%s); the "
                               "previous certificate is presented until they can",
                               *self._pair, _reason(exc))

    def _load_ca(self) -> None:
        assert self._ca is not None
        seen = _identity(self._ca)
        self.load_verify_locations(cafile=str(self._ca))
        self._seen["ca"] = seen

    def _load_pair(self) -> None:
        """The pair as it is now, tried first in a context of its own: OpenSSL takes the
        certificate before it checks the key, so a failed load into this context would
        leave it with a certificate its key does not match."""
        assert self._pair is not None
        cert, key = self._pair
        seen = (_identity(cert), _identity(key))
        with tempfile.TemporaryDirectory(prefix="kafka-tls-") as scratch:
            # one reading of each file, used for the trial and the load alike
            pair = Path(scratch) / "cert.pem", Path(scratch) / "key.pem"
            pair[0].write_bytes(cert.read_bytes())
            pair[1].touch(mode=0o600)
            pair[1].write_bytes(key.read_bytes())
            # an encrypted key fails here (no passphrase setting) instead of OpenSSL asking
            # for one on a terminal nobody watches
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(*pair, password=lambda: b"")
            self.load_cert_chain(*pair, password=lambda: b"")
        self._seen["cert"], self._seen["key"] = seen


def _identity(path: Path) -> _Identity:
    """What changes when a file is replaced or rewritten (None: it is not there)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
