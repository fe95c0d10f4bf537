"""The launcher's promises: names, lifecycle, errors that say what went wrong."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from consumers.broker import (
    KNOWN_BROKERS,
    BrokerError,
    BrokerStartError,
    RdkafkaMockBroker,
    TansuBroker,
    launch_broker,
)
from consumers.broker._probe import ProbeError, api_versions


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


@pytest.mark.kafka
def test_rdkafka_mock_injects_outages_errors_and_delays() -> None:
    # A raw ApiVersions exchange shows each fault without a client's own retries.
    with RdkafkaMockBroker() as broker:
        host, _, port_text = broker.bootstrap_servers.partition(":")
        port = int(port_text)

        broker.push_errors("ApiVersions", [7, 0, 35])  # REQUEST_TIMED_OUT, ok, UNSUPPORTED
        assert broker.errors_left("ApiVersions") == 3
        with pytest.raises(ProbeError, match="error code 7"):
            api_versions(host, port)
        assert api_versions(host, port)  # the 0: answered normally
        with pytest.raises(ProbeError, match="error code 35"):
            api_versions(host, port)
        assert broker.errors_left(18) == 0 and api_versions(host, port)

        broker.push_errors("ApiVersions", [0], rtt_ms=300)
        started = time.monotonic()
        api_versions(host, port)
        assert time.monotonic() - started >= 0.29
        broker.set_rtt(200)  # every answer
        started = time.monotonic()
        api_versions(host, port)
        assert time.monotonic() - started >= 0.19
        broker.set_rtt(0)

        broker.push_errors("DescribeGroups", [15] * 40)  # more than one C call's worth
        broker.push_errors(15, [16])
        assert broker.errors_left("DescribeGroups") == 41

        broker.set_down()
        with pytest.raises(ProbeError, match="refused"):
            api_versions(host, port)
        broker.set_down()  # already down: no-op
        broker.set_up()
        assert api_versions(host, port)  # same port again

        with pytest.raises(ValueError, match="unknown Kafka API 'Nope'"):
            broker.push_errors("Nope", [6])
        with pytest.raises(ValueError, match="at least one"):
            broker.push_errors("Produce", [])
        with pytest.raises(ValueError, match="rtt_ms"):
            broker.push_errors("Produce", [6], rtt_ms=-1)
        with pytest.raises(ValueError, match="rtt_ms"):
            broker.set_rtt(-5)
    with pytest.raises(BrokerError, match="not running"):
        broker.set_down()
