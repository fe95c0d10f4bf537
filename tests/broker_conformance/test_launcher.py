"""The launcher's promises: names, lifecycle, errors that say what went wrong."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from consumers.broker import (
    KNOWN_BROKERS,
    BrokerError,
    BrokerStartError,
    TansuBroker,
    launch_broker,
)
from consumers.broker._probe import api_versions


def test_unknown_kind_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="'tansu', 'rdkafka-mock'"):
        launch_broker("kafka")
    assert KNOWN_BROKERS == ("tansu", "rdkafka-mock")


def test_not_started_broker_has_no_address_and_stops_quietly() -> None:
    broker = launch_broker("tansu")
    with pytest.raises(BrokerError, match="not started"):
        _ = broker.bootstrap_servers
    broker.stop()
    assert not broker.running


def test_a_binary_that_exits_is_reported_with_its_stderr(tmp_path: Path) -> None:
    script = tmp_path / "fake-tansu"
    script.write_text("#!/bin/sh\necho 'boom: no such storage' >&2\nexit 3\n")
    script.chmod(0o755)
    broker = TansuBroker(binary=str(script))
    with pytest.raises(BrokerStartError, match="status 3") as caught:
        broker.start(timeout=5.0)
    assert "boom: no such storage" in caught.value.stderr_tail
    assert not broker.running


def test_a_binary_that_never_answers_times_out_and_is_stopped(tmp_path: Path) -> None:
    script = tmp_path / "silent-tansu"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    broker = TansuBroker(binary=str(script))
    with pytest.raises(BrokerStartError, match="did not answer Kafka requests"):
        broker.start(timeout=0.3)
    assert not broker.running


@pytest.mark.kafka
@pytest.mark.parametrize("kind", KNOWN_BROKERS)
async def test_lifecycle_from_inside_a_running_event_loop(kind: str) -> None:
    # Sync API called from a coroutine: must neither need nor disturb the running loop.
    with launch_broker(kind) as broker:
        assert broker.running
        with pytest.raises(BrokerError, match="already started"):
            broker.start()
        broker.create_topics(["a.b", "a.b", "c"], partitions=2)
        broker.create_topics(["a.b"], partitions=5)  # exists: left as it is
        with pytest.raises(ValueError, match="partitions"):
            broker.create_topics(["d"], partitions=0)
        host, _, port = broker.bootstrap_servers.partition(":")
        assert host == "127.0.0.1"
        assert 3 in await asyncio.to_thread(api_versions, host, int(port))  # Metadata
    assert not broker.running
    broker.stop()  # idempotent
