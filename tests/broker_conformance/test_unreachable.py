"""``ensure_topics`` and ``probe_idempotence`` against an address where no broker listens."""

from __future__ import annotations

import logging
import socket

import pytest
from aiokafka.errors import KafkaConnectionError

from consumers.topics import ensure_topics, probe_idempotence


@pytest.fixture
def nowhere() -> str:
    """``127.0.0.1:PORT`` of a port that was free a moment ago: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_ensure_topics_warns_once_and_returns_nothing(
    nowhere: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="consumers.topics"):
        assert await ensure_topics(nowhere, ["x.a", "x.b"], 3) == []
    (warning,) = [r for r in caplog.records if r.name == "consumers.topics"]
    assert "x.a, x.b" in warning.getMessage()
    assert "KafkaConnectionError" in warning.getMessage()


async def test_ensure_topics_rejects_a_partition_count_below_one(nowhere: str) -> None:
    with pytest.raises(ValueError, match="partitions"):
        await ensure_topics(nowhere, ["x.a"], 0)


async def test_probe_idempotence_says_the_broker_is_unreachable(nowhere: str) -> None:
    with pytest.raises(KafkaConnectionError):
        await probe_idempotence(nowhere, timeout=5.0)
