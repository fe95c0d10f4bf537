"""Is something on this address answering Kafka requests? One raw ApiVersions v0 exchange.

A raw socket, not a Kafka client, so that the probe works from any thread, with or without
a running event loop, and costs a few milliseconds.
"""

from __future__ import annotations

import socket
import struct

__all__ = ["ProbeError", "api_versions"]

_API_VERSIONS_KEY = 18
_CLIENT_ID = b"multimodal-engine-probe"
_MAX_RESPONSE_BYTES = 1 << 20


class ProbeError(OSError):
    """The address is not (yet) a Kafka broker: refused, closed, timed out or garbled."""


def _request(correlation_id: int) -> bytes:
    # Request header v1 (api_key, api_version, correlation_id, client_id); ApiVersions v0
    # has an empty body.
    body = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(_CLIENT_ID)) + _CLIENT_ID
    return struct.pack(">i", len(body)) + body


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise ProbeError("connection closed before the response was complete")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def api_versions(host: str, port: int, timeout: float = 1.0) -> dict[int, tuple[int, int]]:
    """Ask ``host:port`` for its ApiVersions and return ``{api_key: (min, max)}``.

    Raises :class:`ProbeError` when nothing accepts the connection, the peer closes it,
    does not answer within ``timeout`` seconds, or answers with an error or garbage.
    """
    correlation_id = 0x5EED
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_request(correlation_id))
            (size,) = struct.unpack(">i", _read_exactly(sock, 4))
            if not 6 <= size <= _MAX_RESPONSE_BYTES:
                raise ProbeError(f"implausible response size {size}")
            payload = _read_exactly(sock, size)
    except ProbeError:
        raise
    except OSError as exc:  # refused, reset, timeout
        raise ProbeError(f"{host}:{port}: {exc}") from exc
    got_id, error_code = struct.unpack_from(">ih", payload, 0)
    if got_id != correlation_id:
        raise ProbeError(f"correlation id {got_id} does not match the request's")
    if error_code != 0:
        raise ProbeError(f"ApiVersions answered with error code {error_code}")
    try:
        (count,) = struct.unpack_from(">i", payload, 6)
        entries = struct.iter_unpack(">hhh", payload[10 : 10 + 6 * count])
        return {key: (low, high) for key, low, high in entries}
    except struct.error as exc:
        raise ProbeError(f"garbled ApiVersions response: {exc}") from exc
