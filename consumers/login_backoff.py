"""A refused Kafka login is retried with a growing pause, not at every client's retry tick.

aiokafka 0.14 has no reconnect backoff: each of its clients reconnects every
``retry_backoff_ms`` (100 ms), and with refused credentials every reconnect is one more
failed login. Measured with the engine's four clients on a SASL broker: about 60 failed
logins a second, which brokers count as an attack and operators read as one (Java clients
back off exponentially: ``reconnect.backoff.max.ms``).

:class:`LoginBackoff` wraps the one function aiokafka's clients open connections with
(``aiokafka.client.create_conn``). After a login to an address with some credentials is
refused, the next attempts with them fail at once with :class:`LoginBackingOff` (no
connection is made) until a pause has passed: 1 s, doubling up to 30 s, one trial login at
a time; a successful login ends it. Other credentials are not held back.

While a refusal stands, aiokafka's own log (each client logs every failed connection,
metadata update, fetch and heartbeat: about 55 ERROR lines a second, measured) passes one
record per message every ``quiet_seconds``; the engine's broker watch says why in the log
and ``/health``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiokafka.client
from aiokafka.errors import AuthenticationFailedError, SaslAuthenticationFailed

__all__ = ["LoginBackingOff", "LoginBackoff", "install_login_backoff"]

_REFUSED = (SaslAuthenticationFailed, AuthenticationFailedError)


class LoginBackingOff(AuthenticationFailedError):  # type: ignore[misc]  # aiokafka is untyped
    """A connection not attempted: the last login to this address was refused moments ago."""


@dataclass
class _Refusal:
    until: float
    pause: float
    reason: str
    trying: bool = False


class LoginBackoff:
    """Per broker address: after a refused login, instant failures until ``pause`` has
    passed (``first`` doubling to ``longest`` seconds), then one trial login."""

    def __init__(self, create: Callable[..., Awaitable[Any]], *, first: float = 1.0,
                 longest: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._create = create
        self._first, self._longest, self._clock = first, longest, clock
        self._refused: dict[tuple[object, ...], _Refusal] = {}

    @property
    def refusing(self) -> bool:
        """Whether some login is being held back now."""
        return bool(self._refused)

    def reset(self) -> None:
        self._refused.clear()

    async def __call__(self, host: str, port: int, **options: Any) -> Any:
        key = _identity(host, port, options)
        refusal = self._refused.get(key)
        if refusal is not None:
            if refusal.trying or self._clock() < refusal.until:
                raise LoginBackingOff(f"the last login to {host}:{port} was refused "
                                      f"({refusal.reason}); next try within "
                                      f"{refusal.pause:.0f} s")
            refusal.trying = True
        try:
            connection = await self._create(host, port, **options)
        except _REFUSED as exc:
            pause = self._first if refusal is None else min(self._longest, refusal.pause * 2)
            self._refused[key] = _Refusal(self._clock() + pause, pause, type(exc).__name__)
            raise
        except BaseException:
            if refusal is not None:
                refusal.trying = False  # unreachable now: the refusal still stands
            raise
        self._refused.pop(key, None)
        return connection


def _identity(host: str, port: int, options: dict[str, Any]) -> tuple[object, ...]:
    """Whom a login is for: the address and the credentials (the password as its hash,
    in this process's memory only)."""
    return (host, int(port), options.get("security_protocol"), options.get("sasl_mechanism"),
            options.get("sasl_plain_username"), hash(options.get("sasl_plain_password")),
            id(options.get("sasl_oauth_token_provider")))


class _QuietWhileRefused(logging.Filter):
    """While ``backoff`` holds a login back: aiokafka's "Unable connect" line for a
    connection it did not make is dropped, and every other message passes once per
    ``quiet_seconds``."""

    def __init__(self, backoff: LoginBackoff, quiet_seconds: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._backoff, self._quiet, self._clock = backoff, quiet_seconds, clock
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if any(isinstance(arg, LoginBackingOff) for arg in args):
            return False
        if not self._backoff.refusing:
            self._last.clear()
            return True
        key, now = (record.name, record.msg), self._clock()
        if now - self._last.get(key, -self._quiet) < self._quiet:
            return False
        self._last[key] = now
        return True


def install_login_backoff() -> LoginBackoff:
    """Puts :class:`LoginBackoff` in front of aiokafka's connections, once per process
    (brokers are the process's, whichever client reaches them); returns it."""
    current = aiokafka.client.create_conn
    if isinstance(current, LoginBackoff):
        return current
    backoff = LoginBackoff(current)
    aiokafka.client.create_conn = backoff
    quiet = _QuietWhileRefused(backoff)
    # a logger's filters see only its own records: every aiokafka module's logger (all
    # are made at import, which the engine's imports of aiokafka have done)
    names = [name for name in logging.root.manager.loggerDict
             if name == "aiokafka" or name.startswith("aiokafka.")]
    for name in names:
        logging.getLogger(name).addFilter(quiet)
    return backoff  # aiokafka.client logs there
