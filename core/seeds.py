"""Seeds fixed by a request's identity, shared by every kind of generation.

A request without a seed gets one derived from its ``request_id``, so that a replay of the
same record (the documented way to regenerate) asks for the very same output: the same
pixels from FLUX, the same audio from ElevenLabs (as far as its sampling is deterministic).
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]

_AVRO_LONG_MAX = 2**63 - 1


def derive_seed(request_id: str, maximum: int = _AVRO_LONG_MAX) -> int:
    """A seed within ``0..maximum`` fixed by ``request_id`` (the first 8 bytes of its
    SHA-256, reduced modulo ``maximum + 1``; with the default that is the 63 low bits).

    Raises ``ValueError`` for a ``maximum`` below 0 or beyond ``2**63 - 1``.
    """
    if not 0 <= maximum <= _AVRO_LONG_MAX:
        raise ValueError(f"maximum must be within 0..2**63-1, got {maximum}")
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % (maximum + 1)
