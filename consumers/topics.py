"""Topics on a broker: create the engine's topics, and ask whether idempotence works.

``ensure_topics`` is best effort, for brokers the engine does not own (an external
cluster may forbid topic creation; then operators create topics and the engine uses them).
``create_missing_topics`` is the strict form, for brokers the engine does own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    IncompatibleBrokerVersion,
    KafkaConnectionError,
    KafkaError,
    NoError,
    TopicAlreadyExistsError,
    for_code,
)

from consumers.security import PLAINTEXT, KafkaSecurity

__all__ = [
    "CONTRACT_TOPICS",
    "Replication",
    "create_missing_topics",
    "ensure_topics",
    "probe_idempotence",
]

logger = logging.getLogger(__name__)

#: The contract's topic names, without any configured prefix.
CONTRACT_TOPICS: tuple[str, ...] = (
    "generation.requested.image",
    "generation.requested.voice",
    "generation.requested.lora",
    "generation.control",
    "generation.completed",
    "generation.failed",
    "generation.progress",
)


@dataclass(frozen=True)
class Replication:
    """How the engine's topics are replicated: ``factor`` copies of each partition, and
    ``min_insync`` of them written before an ``acks=all`` send succeeds. ``None`` for either
    (the default): as many copies as the cluster has brokers, up to 3, and one fewer in
    sync (at least 1), so a three-broker cluster survives one broker's loss without losing
    an acknowledged record."""

    factor: int | None = None
    min_insync: int | None = None

    def resolve(self, brokers: int) -> tuple[int, int | None]:
        """``(factor, min.insync.replicas or None to leave the broker's default)``."""
        factor = self.factor if self.factor is not None else max(1, min(3, brokers))
        if self.factor is not None and self.factor < 1:
            raise ValueError(f"replication_factor must be at least 1, got {self.factor}")
        if self.min_insync is not None:  # never more than there are copies to be in sync
            return factor, min(self.min_insync, factor)
        return factor, (factor - 1 if factor >= 3 else None)


async def create_missing_topics(
    bootstrap_servers: str,
    names: Sequence[str],
    partitions: int,
    *,
    replication: Replication = Replication(),
    timeout: float = 15.0,
    security: KafkaSecurity = PLAINTEXT,
) -> list[str]:
    """Create those of ``names`` that do not exist yet; return the ones created, in order.

    Existing topics are left as they are, whatever their partition count or replication
    (also when another client creates one concurrently). Creating with one replica on a
    cluster of several brokers, or with more replicas than brokers, is a warning naming
    ``KAFKA_REPLICATION_FACTOR``. Raises ``ValueError`` for ``partitions`` or a replication
    factor below 1, aiokafka's ``KafkaError`` (the broker's per-topic error, or
    ``IncompatibleBrokerVersion`` when it has no CreateTopics API) and ``TimeoutError``
    after ``timeout`` seconds. Every connection it opens is closed before it returns.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    replication.resolve(1)  # a factor below 1 is refused before any connection
    wanted = list(dict.fromkeys(names))
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout * 1000),
        **security.options(),
    )
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [name for name in wanted if name not in existing]
            if not missing:
                return []
            # CreateTopics goes to the controller; a broker that names none (librdkafka's
            # mock cluster) has no CreateTopics either, and aiokafka would fail obscurely.
            cluster = await admin.describe_cluster()
            brokers = {b["node_id"] for b in cluster["brokers"]}
            if cluster.get("controller_id") not in brokers:
                raise IncompatibleBrokerVersion("the broker names no controller for CreateTopics")
            factor, min_insync = replication.resolve(len(brokers))
            _warn_about_replication(factor, len(brokers), missing)
            configs = {"min.insync.replicas": str(min_insync)} if min_insync else None
            response = await admin.create_topics(
                [NewTopic(name, partitions, factor, topic_configs=configs) for name in missing]
            )
    finally:
        await admin.close()
    created: set[str] = set()
    for entry in response.topic_errors:
        topic, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 and entry[2] else ""
        error = for_code(code)
        if error is NoError:
            created.add(topic)
        elif error is not TopicAlreadyExistsError:
            raise error(f"cannot create topic {topic!r}: {message or error.description}")
    return [name for name in missing if name in created]


def _warn_about_replication(factor: int, brokers: int, topics: Sequence[str]) -> None:
    if factor == 1 and brokers > 1:
        logger.warning(
            "creating topics %s with one replica on a cluster of %d brokers: losing one "
            "broker loses their records; set KAFKA_REPLICATION_FACTOR (3 is usual)",
            ", ".join(topics), brokers)
    elif factor > brokers:
        logger.warning(
            "KAFKA_REPLICATION_FACTOR=%d is more than the cluster's %d brokers: the broker "
            "will refuse to create %s", factor, brokers, ", ".join(topics))


async def ensure_topics(
    bootstrap_servers: str,
    names: Sequence[str],
    partitions: int,
    *,
    replication: Replication = Replication(),
    timeout: float = 15.0,
    security: KafkaSecurity = PLAINTEXT,
) -> list[str]:
    """Best effort: create those of ``names`` that are missing; return the ones created.

    Existing topics are used as they are. A broker that refuses (authorization, no
    CreateTopics API, any Kafka error, unreachable, ``timeout`` seconds passed) gets one
    warning naming the topics and the reason, and ``[]`` is returned: this never raises for
    the broker's sake. ``ValueError`` for ``partitions`` or a replication factor below 1.
    """
    try:
        created = await create_missing_topics(
            bootstrap_servers,
            names,
            partitions,
            replication=replication,
            timeout=timeout,
            security=security,
        )
    except (KafkaError, OSError, TimeoutError) as exc:
        reason = str(exc)
        if type(exc).__name__ not in reason:  # aiokafka's errors name themselves
            reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        logger.warning(
            "could not create topics %s on %s (%s); using them as the broker has them",
            ", ".join(names),
            bootstrap_servers,
            reason,
        )
        return []
    if created:
        logger.info(
            "created topics %s with %d partitions on %s",
            ", ".join(created),
            partitions,
            bootstrap_servers,
        )
    return created


async def probe_idempotence(bootstrap_servers: str, timeout: float = 5.0, *,
                            security: KafkaSecurity = PLAINTEXT) -> bool:
    """Whether the broker grants producer ids (InitProducerId), i.e. whether a producer
    with ``enable_idempotence=True`` can start there.

    Returns ``False`` when the broker answers InitProducerId with an error or does not
    answer within ``timeout`` seconds. Raises aiokafka's ``KafkaConnectionError`` when
    the broker cannot be reached at all (that is not an answer about idempotence). The
    producer it starts is stopped before it returns.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        enable_idempotence=True,
        request_timeout_ms=max(1000, int(timeout * 1000)),
        **security.options(),
    )
    sender_log = logging.getLogger("aiokafka.producer.sender")
    sender_log.addFilter(_quiet_probe)  # the refusal is the answer, not an error to show
    try:
        async with asyncio.timeout(timeout):
            await producer.start()
    except KafkaConnectionError:
        raise
    except (KafkaError, TimeoutError) as exc:
        logger.info(
            "broker %s grants no producer id (%s): idempotent producing is unavailable",
            bootstrap_servers,
            type(exc).__name__,
        )
        return False
    finally:
        sender_log.removeFilter(_quiet_probe)
        await producer.stop()
    return True


def _quiet_probe(record: logging.LogRecord) -> bool:
    return "InitProducerId" not in record.getMessage()
