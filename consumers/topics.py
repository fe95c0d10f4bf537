"""Topics on a broker: create the engine's topics, and ask whether idempotence works.

``ensure_topics`` is best effort, for brokers the engine does not own (an external
cluster may forbid topic creation; then operators create topics and the engine uses them).
``create_missing_topics`` is the strict form, for brokers the engine does own. Both create
each contract topic with its :data:`TOPIC_CONFIGS`, as deploy/create-topics.sh does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
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
    "TOPIC_CONFIGS",
    "Replication",
    "create_missing_topics",
    "ensure_topics",
    "probe_idempotence",
    "topic_configs",
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

_DAY_MS = str(24 * 3600 * 1000)

#: Topic configs beyond the broker's defaults, by contract topic (deploy/create-topics.sh
#: sets the same; tests/deploy compares them). LoRA requests may carry inline images:
#: records up to the engine producer's 16 MiB (consumers/kafka.py), where Apache Kafka's
#: default is about 1 MiB. Cancels and progress are transient: kept a day, not seven.
TOPIC_CONFIGS: Mapping[str, Mapping[str, str]] = {
    "generation.requested.lora": {"max.message.bytes": str(16 * 2**20)},
    "generation.control": {"retention.ms": _DAY_MS},
    "generation.progress": {"retention.ms": _DAY_MS},
}


def topic_configs(name: str) -> dict[str, str]:
    """:data:`TOPIC_CONFIGS` of ``name``, a contract topic with any prefix (``prod.`` +
    ``generation.control``); ``{}`` for any other topic."""
    for topic, configs in TOPIC_CONFIGS.items():
        if name.endswith(topic):
            return dict(configs)
    return {}


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

    Each topic is created with its :func:`topic_configs`. Existing topics are left as they
    are, whatever their partition count, replication or configs (also when another client
    creates one concurrently); one whose ``max.message.bytes`` is below what its
    :data:`TOPIC_CONFIGS` ask for is a warning, where the broker says (DescribeConfigs).
    Creating with one replica on a
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
            await _warn_about_small_records(admin, [n for n in wanted if n in existing])
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
            replicas = {"min.insync.replicas": str(min_insync)} if min_insync else {}
            response = await admin.create_topics([
                NewTopic(name, partitions, factor,
                         topic_configs={**replicas, **topic_configs(name)} or None)
                for name in missing])
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


async def _warn_about_small_records(admin: AIOKafkaAdminClient, names: Sequence[str]) -> None:
    """A warning for each of ``names`` (existing topics) whose ``max.message.bytes`` the
    broker reports below what :data:`TOPIC_CONFIGS` asks for. A broker that does not say
    (no DescribeConfigs, not authorized, no value reported) gets no warning."""
    needed = {name: int(limit) for name in names
              if (limit := topic_configs(name).get("max.message.bytes")) is not None}
    if not needed:
        return
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in needed])
    except KafkaError as exc:
        logger.debug("cannot read the configs of %s (%s)", ", ".join(needed), exc)
        return
    for response in responses:
        for resource in response.resources:
            error_code, name, entries = resource[0], resource[3], resource[4]
            values = {entry[0]: entry[1] for entry in entries}
            limit = values.get("max.message.bytes")
            if error_code or name not in needed or limit is None or int(limit) >= needed[name]:
                continue
            logger.warning(
                "topic %s exists with max.message.bytes=%s, below the %d its records may "
                "need (inline images): the broker refuses larger ones; raise it with "
                "kafka-configs.sh --alter --entity-type topics --entity-name %s "
                "--add-config max.message.bytes=%d", name, limit, needed[name], name,
                needed[name])


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
