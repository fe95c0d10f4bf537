"""How the topics the engine creates are replicated (KAFKA_REPLICATION_FACTOR,
KAFKA_MIN_INSYNC_REPLICAS), and the warning when that loses data with one broker down."""

from __future__ import annotations

import logging
import uuid

import pytest

from consumers.topics import Replication, ensure_topics
from tests.support.kafka_security import security_for


@pytest.mark.parametrize(("replication", "brokers", "expected"), [
    (Replication(), 1, (1, None)),      # one broker: one copy, the broker's default
    (Replication(), 2, (2, None)),
    (Replication(), 3, (3, 2)),         # a broker may go without losing an acked record
    (Replication(), 9, (3, 2)),         # at most 3 unless configured
    (Replication(5), 9, (5, 4)),
    (Replication(2, 2), 3, (2, 2)),
    (Replication(None, 2), 1, (1, 1)),  # never more in sync than there are copies
])
def test_the_factor_follows_the_cluster_unless_configured(
    replication: Replication, brokers: int, expected: tuple[int, int | None]
) -> None:
    assert replication.resolve(brokers) == expected


def test_a_factor_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="replication_factor"):
        Replication(0).resolve(3)


@pytest.mark.kafka
async def test_more_replicas_than_brokers_is_a_warning_naming_the_setting(
    broker_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "consumers.topics")
    name = f"t{uuid.uuid4().hex[:8]}.replicated"
    await ensure_topics(broker_bootstrap, [name], 1, replication=Replication(3),
                        security=security_for(broker_bootstrap))
    assert "KAFKA_REPLICATION_FACTOR=3 is more than the cluster's 1 brokers" in caplog.text
