"""How every Kafka client of the engine connects: TLS, mutual TLS and SASL, from settings.

One :class:`KafkaSecurity` is built at the entry point and handed to everything that makes
a client (the group consumer, the control readers, the producer, topic creation, the
idempotence probe, ``send``), so no client can connect differently from the others.
Passwords and tokens stay inside it: :meth:`KafkaSecurity.describe` names the protocol,
mechanism and user only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import AIOKafkaConnection
from aiokafka.errors import (
    AuthenticationFailedError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from consumers.tls_context import RotatingContext
from core.settings import ConfigurationError, Settings

__all__ = ["PLAINTEXT", "KafkaSecurity", "TokenFile", "diagnose", "without_security"]


class TokenFile(AbstractTokenProvider):  # type: ignore[misc]  # aiokafka is untyped
    """OAUTHBEARER: the token in a file, read at every (re)authentication, so whatever
    refreshes the file (a sidecar, a projected service-account token) is picked up."""

    def __init__(self, path: Path) -> None:
        self._path = path

    async def token(self) -> str:
        text = await asyncio.to_thread(self._path.read_text, encoding="utf-8")
        token = text.strip()
        if not token:
            raise AuthenticationFailedError(
                f"the OAUTHBEARER token file KAFKA_SASL_OAUTH_TOKEN_FILE={self._path} is empty")
        return token


@dataclass(frozen=True)
class KafkaSecurity:
    """The security options of every Kafka client; :data:`PLAINTEXT` when none are set."""

    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    _password: str | None = field(default=None, repr=False)
    _token: TokenFile | None = field(default=None, repr=False)
    _ssl: ssl.SSLContext | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaSecurity:
        """Raises :class:`ConfigurationError` naming the setting when a certificate or key
        cannot be used (the combinations and readability are checked by ``load_settings``)."""
        protocol = settings.kafka_security_protocol
        context = _ssl_context(settings) if protocol.endswith("SSL") else None
        token = settings.kafka_sasl_oauth_token_file
        password = settings.kafka_sasl_password
        return cls(
            protocol=protocol, mechanism=settings.kafka_sasl_mechanism,
            username=settings.kafka_sasl_username,
            _password=password.get_secret_value() if password is not None else None,
            _token=TokenFile(token) if token is not None else None, _ssl=context)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (consumer, producer, admin)."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self._ssl is not None:
            options["ssl_context"] = self._ssl
        if self.mechanism is not None:
            options["sasl_mechanism"] = self.mechanism
            if self.mechanism == "OAUTHBEARER":
                options["sasl_oauth_token_provider"] = self._token
            else:
                options["sasl_plain_username"] = self.username
                options["sasl_plain_password"] = self._password
        return options

    def describe(self, *, user: bool = True) -> str:
        """``SASL_SSL (SCRAM-SHA-512 as engine)``, no secrets; ``user=False`` leaves the
        user name out (for ``/health``, which answers without a key)."""
        if self.mechanism is None:
            return self.protocol
        who = f" as {self.username}" if self.username and user else ""
        return f"{self.protocol} ({self.mechanism}{who})"


#: No TLS, no SASL: Kafka's default, and the embedded broker's.
PLAINTEXT = KafkaSecurity()


def without_security(settings: Settings) -> Settings:
    """``settings`` for a plaintext broker (the embedded one): no TLS, no SASL."""
    return settings.model_copy(update={
        "kafka_security_protocol": "PLAINTEXT", "kafka_sasl_mechanism": None,
        "kafka_sasl_username": None, "kafka_sasl_password": None,
        "kafka_sasl_oauth_token_file": None, "kafka_ssl_ca_file": None,
        "kafka_ssl_cert_file": None, "kafka_ssl_key_file": None})


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    name = "KAFKA_SSL_CA_FILE"
    try:
        context = RotatingContext(settings.kafka_ssl_ca_file)  # rotated files taken up
        context.check_hostname = settings.kafka_ssl_check_hostname
        if settings.kafka_ssl_cert_file is not None and settings.kafka_ssl_key_file is not None:
            name = "KAFKA_SSL_CERT_FILE"
            context.present(settings.kafka_ssl_cert_file, settings.kafka_ssl_key_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        path = settings.kafka_ssl_ca_file if name == "KAFKA_SSL_CA_FILE" \
            else settings.kafka_ssl_cert_file
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        also = " and KAFKA_SSL_KEY_FILE" if name == "KAFKA_SSL_CERT_FILE" else ""
        raise ConfigurationError(
            f"invalid configuration: {name}={str(path)!r}{also} (allowed: PEM that TLS "
            f"can use; {reason})") from None
    return context


async def diagnose(bootstrap_servers: str, security: KafkaSecurity,
                   timeout: float = 10.0) -> str | None:
    """Why the first reachable broker of ``bootstrap_servers`` refuses a connection made with
    ``security``, in one line naming the setting to look at; ``None`` when one connects.

    aiokafka reports every refusal at bootstrap as "Unable to bootstrap": this tells a
    failed authentication and a failed TLS handshake apart from an unreachable address.
    """
    reasons: list[str] = []
    for entry in bootstrap_servers.split(","):
        host, _, port = entry.strip().rpartition(":")
        conn = AIOKafkaConnection(host, int(port), client_id="engine-diagnose",
                                  request_timeout_ms=int(timeout * 1000), **security.options())
        try:
            async with asyncio.timeout(timeout):
                await conn.connect()
        except (SaslAuthenticationFailed, AuthenticationFailedError) as exc:
            return (f"Kafka at {entry.strip()} refused the credentials "
                    f"({security.describe()}): authentication failed"
                    f"{_detail(exc)}; check KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD "
                    "(or the token file)")
        except UnsupportedSaslMechanismError:
            return (f"Kafka at {entry.strip()} does not offer KAFKA_SASL_MECHANISM="
                    f"{security.mechanism}")
        except ssl.SSLError as exc:
            return (f"TLS with Kafka at {entry.strip()} failed ({exc.reason or exc}); check "
                    "KAFKA_SSL_CA_FILE, KAFKA_SSL_CERT_FILE/KAFKA_SSL_KEY_FILE and that the "
                    "listener speaks TLS")
        except (OSError, KafkaError, TimeoutError) as exc:
            if await _listening(host, int(port), timeout):
                return (f"Kafka at {entry.strip()} accepts connections but not ours "
                        f"({type(exc).__name__} during the handshake, as "
                        f"{security.describe()}): check that KAFKA_SECURITY_PROTOCOL "
                        "matches the listener (TLS needs SSL or SASL_SSL), and with mutual "
                        "TLS KAFKA_SSL_CERT_FILE/KAFKA_SSL_KEY_FILE")
            reasons.append(f"{entry.strip()}: {type(exc).__name__}")
            continue
        finally:
            await _close(conn)
        return None
    return f"Kafka unreachable ({'; '.join(reasons)})"


async def _close(conn: AIOKafkaConnection) -> None:
    """Closes and waits until closed: a TLS connection's socket closes only after TLS's own
    goodbye, and one left to that would outlive a short-lived event loop."""
    closed = getattr(conn, "_closed_fut", None)  # aiokafka sets it when the socket is gone
    conn.close()
    if isinstance(closed, asyncio.Future):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(closed), 2)


async def _listening(host: str, port: int, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _detail(exc: Exception) -> str:
    text = str(exc).strip()
    return f" ({text})" if text and len(text) < 200 else ""
