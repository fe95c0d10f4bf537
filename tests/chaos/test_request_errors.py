"""Error answers queued on the broker mid-stream, for the requests the engine's Kafka
clients send: Produce (its answers), Fetch (its input), OffsetCommit and FindCoordinator
(its commits), Heartbeat (a forced rebalance), and connections closed mid-request.

Each test answers a first batch, queues the errors, publishes a second batch, and then
requires: every request answered completed, each conversation in publish order, every
queued error served to some request, and the group's commits caught up with the input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    CoordinatorNotAvailableError,
    NotCoordinatorError,
    NotLeaderForPartitionError,
    RebalanceInProgressError,
    RequestTimedOutError,
    UnknownTopicOrPartitionError,
)

from consumers.broker import RdkafkaMockBroker
from consumers.engine import Engine
from core.settings import Settings
from tests.chaos._checks import (
    answered_twice,
    assert_all_committed,
    assert_in_order,
    assert_nothing_lost,
    eventually,
    voice_requests,
)
from tests.chaos.conftest import PARTITIONS
from tests.support.kafka_client import PersonaPeer

pytestmark = pytest.mark.kafka

NOT_LEADER = NotLeaderForPartitionError.errno  # 6
TIMED_OUT = RequestTimedOutError.errno  # 7
UNKNOWN_PARTITION = UnknownTopicOrPartitionError.errno  # 3
COORDINATOR_LOADING = CoordinatorLoadInProgressError.errno  # 14
NO_COORDINATOR = CoordinatorNotAvailableError.errno  # 15
NOT_COORDINATOR = NotCoordinatorError.errno  # 16
REBALANCING = RebalanceInProgressError.errno  # 27
DISCONNECT = -195  # librdkafka's _TRANSPORT: the mock closes the connection instead

Faults = Sequence[tuple[str, Sequence[int]]]

CASES: dict[str, Faults] = {
    # the engine's answers (and the test's requests) refused, its input fetches failing
    "produce-fetch": [("Produce", [NOT_LEADER, TIMED_OUT, NOT_LEADER, TIMED_OUT, NOT_LEADER]),
                      ("Fetch", [NOT_LEADER, UNKNOWN_PARTITION, TIMED_OUT, NOT_LEADER,
                                 UNKNOWN_PARTITION])],
    # commits refused; the last NOT_COORDINATOR makes the consumer look for its
    # coordinator again, and those lookups fail too
    "commit-coordinator": [("OffsetCommit", [NO_COORDINATOR, COORDINATOR_LOADING, TIMED_OUT,
                                             NOT_COORDINATOR]),
                           ("FindCoordinator", [NO_COORDINATOR, COORDINATOR_LOADING,
                                                NO_COORDINATOR])],
    "heartbeat-rebalance": [("Heartbeat", [REBALANCING])],
    "disconnects": [("Produce", [DISCONNECT, DISCONNECT]), ("Fetch", [DISCONNECT]),
                    ("OffsetCommit", [DISCONNECT])],
}


@pytest.mark.parametrize("faults", list(CASES.values()), ids=list(CASES))
async def test_queued_errors_mid_stream_lose_nothing(
    faults: Faults, mock_broker: RdkafkaMockBroker, settings: Settings, engine: Engine,
    peer: PersonaPeer,
) -> None:
    first, second = voice_requests(20, tag="first"), voice_requests(20, tag="second")
    for request in first:
        await peer.publish("voice", request)
    await peer.wait_for(lambda a: a.kind == "completed", count=5, timeout=30)
    for api, errors in faults:
        await asyncio.to_thread(mock_broker.push_errors, api, errors)
    for request in second:
        await peer.publish("voice", request)

    published = first + second
    answers = await assert_nothing_lost(peer, published)

    async def all_served() -> bool:
        left = [await asyncio.to_thread(mock_broker.errors_left, api) for api, _ in faults]
        return not any(left)

    await eventually(all_served, lambda: f"queued errors not all served: {faults}")
    assert settings.kafka_bootstrap_servers is not None
    await assert_all_committed(settings.kafka_bootstrap_servers, settings.kafka_group_id,
                               settings.topic("generation.requested.voice"), PARTITIONS)
    print(f"{answered_twice(peer, published)} of 40 answered twice")
    assert_in_order(answers, published)
