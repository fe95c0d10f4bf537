"""Building the Kafka clients from settings, and choosing idempotence honestly.

The group consumer assigns with :class:`~consumers.assignor.BalancedStickyAssignor` (every
topic spread evenly, every partition left where it was within that) and, with
``KAFKA_GROUP_INSTANCE_ID``, is a static member; what each broker makes of that is measured
in docs/brokers.md.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumers.assignor import BalancedStickyAssignor
from consumers.security import KafkaSecurity
from consumers.topics import probe_idempotence
from core.settings import Settings

__all__ = ["build_consumer", "build_control_consumer", "build_producer", "resolve_idempotence",
           "stop_within"]

logger = logging.getLogger(__name__)


def build_consumer(settings: Settings, bootstrap_servers: str, *,
                   security: KafkaSecurity) -> AIOKafkaConsumer:
    """A group consumer with manual commits; the consume loop subscribes it.

    A member that joins takes partitions only from the others' surplus, topic by topic, and
    the others keep the rest (aiokafka's rebalances stay eager: every member is still
    revoked everything and reassigned). Every member of the group must offer
    ``balanced-sticky``: a member offering only another assignor is refused
    (INCONSISTENT_GROUP_PROTOCOL).

    ``KAFKA_GROUP_INSTANCE_ID`` makes it a static member: ``stop()`` sends no LeaveGroup,
    so on Kafka a restart within the session timeout gets its partitions back without a
    rebalance, and a stopped instance's partitions wait the session timeout before they
    move.
    """
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=settings.kafka_group_id,
        group_instance_id=settings.kafka_group_instance_id,
        # one assignor alone: aiokafka 0.14 sends one JoinGroup per assignor listed, each
        # with a longer protocol list (aio-libs/aiokafka#1168), and a member whose
        # protocols change between two JoinGroups makes the group rebalance again; an
        # instance per consumer: its state is this member's
        partition_assignment_strategy=(BalancedStickyAssignor(),),
        client_id=f"{settings.service_name}-consumer",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        max_poll_interval_ms=max(300_000, int(settings.shutdown_grace_seconds * 1000) * 2),
        # records of aborted producer transactions are never answered
        isolation_level="read_committed",
        **security.options(),
    )


def build_control_consumer(settings: Settings, bootstrap_servers: str, *,
                           security: KafkaSecurity,
                           purpose: str = "control") -> AIOKafkaConsumer:
    """A consumer outside any group, for ``generation.control``: every instance reads every
    partition (it assigns them itself) and commits nothing. ``purpose`` names its client
    (``control-offsets``: the read barrier's lookups, on a connection of their own, since
    a broker answers a connection's requests in order and the reader's long-polling fetch
    would hold every lookup back by up to its wait)."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        client_id=f"{settings.service_name}-{purpose}",
        enable_auto_commit=False,
        auto_offset_reset="latest",
        fetch_max_wait_ms=max(settings.kafka_fetch_max_wait_ms, 100),
        isolation_level="read_committed",
        **security.options(),
    )


def build_producer(
    settings: Settings, bootstrap_servers: str, *, idempotent: bool, security: KafkaSecurity,
    max_request_size: int = 16 * 2**20,
) -> AIOKafkaProducer:
    """A producer that waits for all in-sync replicas (acks=all) and refuses records above
    ``max_request_size`` bytes itself (the broker's own limit still applies)."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=f"{settings.service_name}-producer",
        acks="all",
        enable_idempotence=idempotent,
        linger_ms=0,
        max_request_size=max_request_size,
        **security.options(),
    )


async def resolve_idempotence(settings: Settings, bootstrap_servers: str, *,
                              security: KafkaSecurity) -> bool:
    """``KAFKA_IDEMPOTENCE``: on/off as set; auto asks the broker (InitProducerId) and
    says when it has to be off."""
    if settings.kafka_idempotence != "auto":
        return settings.kafka_idempotence == "on"
    supported = await probe_idempotence(bootstrap_servers, security=security)
    if not supported:
        logger.warning(
            "broker at %s has no idempotent producer (InitProducerId failed): publishing "
            "with acks=all and idempotence off; duplicates on producer retries are possible "
            "and harmless (consumers dedupe by request_id)",
            bootstrap_servers,
        )
    return supported


async def stop_within(client: AIOKafkaConsumer | AIOKafkaProducer, timeout: float) -> str | None:
    """Stops ``client`` within ``timeout`` seconds: with the broker gone, leaving the group
    or flushing would wait forever. Returns ``None`` when it stopped cleanly, else why not
    (for a log line). Only a cancellation of the calling task goes on up: aiokafka's
    fetcher re-raises the cancellation of its own pending fetches when the broker is gone
    (one waiting out its retry backoff), which is not the caller's."""
    try:
        await asyncio.wait_for(client.stop(), timeout=timeout)
    except (TimeoutError, KafkaError) as exc:
        return f"not in time ({type(exc).__name__})"
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        return "not cleanly"
    return None
