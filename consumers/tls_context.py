"""The Kafka clients' TLS context, taking up certificates rotated on disk.

Certificates expire: cert-manager, Vault agents and Kubernetes Secret mounts replace the
files of KAFKA_SSL_CERT_FILE, KAFKA_SSL_KEY_FILE and KAFKA_SSL_CA_FILE in place (a Secret
mount swaps a symbolic link). An engine that read them once at start-up would present its
old certificate until restarted, and every reconnection after the old one expired would
be refused.

:class:`RotatingContext` is the one ``ssl.SSLContext`` every client gets. Before each new
TLS connection (``wrap_bio``, which asyncio calls once per connection) it compares the
files' identity (inode, size, modification time) with those its current context was built
from, and when one changed builds a new context from them: the next connections present
the new certificate and trust the new authorities, those already open keep theirs. A
certificate and key that do not match yet (one file written, the other not), a
half-written or missing file are a warning (once per change), and the previous context
stays in use until the files load.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Any, Self

__all__ = ["RotatingContext"]

logger = logging.getLogger(__name__)

_Identity = tuple[int, int, int] | None


class RotatingContext(ssl.SSLContext):
    """A client context over the authorities of ``ca`` (None: the system's); for mutual
    TLS, :meth:`present` a certificate. Raises what ``ssl`` raises when a file cannot be
    used.

    Each connection is made by the current inner context, one built afresh from the files
    whenever they change (a context loaded twice would keep what it had: the authorities
    of the old CA file, and the old certificate of another key type, which TLS 1.3 may
    still pick). ``check_hostname`` set on this context applies to every inner one."""

    _ca: Path | None
    _pair: tuple[Path, Path] | None
    _seen: tuple[_Identity, ...]
    _failed: tuple[_Identity, ...] | None
    _current: ssl.SSLContext

    def __new__(cls, ca: Path | None) -> Self:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(self, ca: Path | None) -> None:
        self._ca = ca
        self._pair = None
        self._failed = None
        self._seen, self._current = self._build()

    def present(self, cert: Path, key: Path) -> None:
        """Mutual TLS: present ``cert`` (its private ``key``), and its replacements."""
        self._pair = (cert, key)
        self._seen, self._current = self._build()

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        return self._context().wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        return self._context().wrap_socket(*args, **kwargs)

    def reload_if_changed(self) -> None:
        """Builds a new inner context when a file changed since the current one was built
        (see the module); a change that cannot be loaded yet is warned about once."""
        files = self._files()
        seen = tuple(_identity(path) for path in files)
        if seen == self._seen or seen == self._failed:
            return
        try:
            built_from, context = self._build()
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._failed = seen
            logger.warning("Kafka TLS: %s changed but cannot be loaded (%s); the previous "
                           "files stay in use until they can",
                           " or ".join(str(path) for path in files), _reason(exc))
            return
        self._seen, self._current, self._failed = built_from, context, None
        logger.info("Kafka TLS: %s changed; presented and trusted from the next connection",
                    " or ".join(str(path) for path in files))

    def _context(self) -> ssl.SSLContext:
        self.reload_if_changed()
        self._current.check_hostname = self.check_hostname
        return self._current

    def _files(self) -> tuple[Path, ...]:
        return tuple(path for path in (self._ca, *(self._pair or ())) if path is not None)

    def _build(self) -> tuple[tuple[_Identity, ...], ssl.SSLContext]:
        """A context from the files as they are, and their identities; the files read
        while they changed are not taken (the identities before and after must agree)."""
        files = self._files()
        before = tuple(_identity(path) for path in files)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # certificates and hostnames checked
        if self._ca is None:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            context.load_verify_locations(cafile=str(self._ca))
        if self._pair is not None:
            # an encrypted key fails here (no passphrase setting) instead of OpenSSL asking
            # for one on a terminal nobody watches
            context.load_cert_chain(*self._pair, password=lambda: b"")
        keylog = os.environ.get("SSLKEYLOGFILE")  # as ssl.create_default_context does
        if keylog and not sys.flags.ignore_environment:
            context.keylog_filename = keylog
        if tuple(_identity(path) for path in files) != before:
            raise ValueError("the files changed while being read")
        return before, context


def _identity(path: Path) -> _Identity:
    """What changes when a file is replaced or rewritten (None: it is not there)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
