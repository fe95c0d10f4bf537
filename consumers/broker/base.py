"""The interface of an embedded Kafka-protocol broker, its capabilities and its errors.

    BrokerError                 anything the launcher cannot do (message says what and why;
     │                          ``.stderr_tail`` holds the end of the broker's log)
     └── BrokerStartError       the broker did not start or did not answer Kafka requests

Implementations (:mod:`.tansu`, :mod:`.rdkafka_mock`) differ in what they can do; each
states it in :class:`BrokerCapabilities`, and the conformance suite
(tests/broker_conformance) checks the claims against the running broker.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

__all__ = ["BrokerCapabilities", "BrokerError", "BrokerStartError", "EmbeddedBroker"]


@dataclass(frozen=True, slots=True)
class BrokerCapabilities:
    """What a broker implementation supports, as measured by the conformance suite.

    ``idempotent_producer``: InitProducerId works, so ``enable_idempotence=True`` producers
    start. ``transactions``: transactional produce, ``send_offsets_to_transaction`` and
    read_committed isolation all work. ``create_topics_api``: the Kafka CreateTopics request
    works (otherwise topics are created through the implementation's own API).
    """

    idempotent_producer: bool
    transactions: bool
    create_topics_api: bool


class BrokerError(Exception):
    """The embedded broker could not do what was asked; the message says what and why.

    ``stderr_tail`` is the end of the broker's log when it helps (else ""); it is also
    part of the message.
    """

    def __init__(self, message: str, stderr_tail: str = "") -> None:
        full = f"{message}; stderr tail:\n{stderr_tail}" if stderr_tail.strip() else message
        super().__init__(full)
        self.stderr_tail = stderr_tail


class BrokerStartError(BrokerError):
    """The broker did not start, or did not answer Kafka requests in time."""


class EmbeddedBroker(abc.ABC):
    """A Kafka-protocol broker in a child process on 127.0.0.1, for development and tests.

    Synchronous on purpose: usable from a CLI, a pytest session fixture or any thread,
    whether or not an event loop runs there. Lifecycle: created by
    :func:`~consumers.broker.launch_broker`, :meth:`start` once, :meth:`stop` any number of
    times; or ``with launch_broker("tansu") as broker: ...``.
    """

    name: str
    capabilities: BrokerCapabilities

    @property
    @abc.abstractmethod
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:PORT"``. Raises :class:`BrokerError` when not started."""

    @property
    @abc.abstractmethod
    def running(self) -> bool:
        """Whether the child process is started and still alive."""

    @abc.abstractmethod
    def start(self, timeout: float = 15.0) -> None:
        """Start the broker on a free port of 127.0.0.1 and return once it answers Kafka
        requests.

        Raises :class:`BrokerStartError` (with the tail of the broker's stderr) when the
        child cannot be started, exits, or does not answer within ``timeout`` seconds; the
        child is stopped before raising. Raises :class:`BrokerError` when already started.
        """

    @abc.abstractmethod
    def create_topics(self, names: Sequence[str], partitions: int) -> None:
        """Create each topic of ``names`` with ``partitions`` partitions (replication 1).

        Topics that already exist are left as they are. Raises :class:`BrokerError` when
        the broker is not running or refuses a topic, and ``ValueError`` for
        ``partitions < 1``.
        """

    @abc.abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child: a polite request, then SIGTERM, then SIGKILL after ``timeout``
        seconds. Idempotent; never raises for a child that is already gone."""

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.bootstrap_servers if self.running else "stopped"
        return f"<{type(self).__name__} {self.name} {where}>"
