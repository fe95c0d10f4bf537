"""Pick an embedded broker implementation by name."""

from __future__ import annotations

from collections.abc import Callable

from .base import EmbeddedBroker
from .rdkafka_mock import RdkafkaMockBroker
from .tansu import TansuBroker

__all__ = ["KNOWN_BROKERS", "launch_broker"]

_FACTORIES: dict[str, Callable[[], EmbeddedBroker]] = {
    "tansu": TansuBroker,
    "rdkafka-mock": RdkafkaMockBroker,
}

#: The names :func:`launch_broker` accepts; the first is the default.
KNOWN_BROKERS: tuple[str, ...] = tuple(_FACTORIES)


def launch_broker(kind: str = "tansu") -> EmbeddedBroker:
    """A new, not yet started, embedded broker of ``kind`` (see :data:`KNOWN_BROKERS`).

    Raises ``ValueError`` naming the allowed kinds for any other ``kind``.
    """
    try:
        factory = _FACTORIES[kind]
    except KeyError:
        allowed = ", ".join(repr(name) for name in KNOWN_BROKERS)
        raise ValueError(f"unknown embedded broker {kind!r}; allowed: {allowed}") from None
    return factory()
