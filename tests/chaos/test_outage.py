"""Broker outages mid-stream: the broker is taken down while requests are being answered
and published, stays down for 8 s or 30 s, and comes back on the same port.

The engine must answer every request (the ones it held when the broker went, the ones
published during and after the outage), each conversation in order, and ``/health`` must
say 503 while the broker is gone and 200 once it is back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from aiokafka.errors import KafkaTimeoutError

from consumers.broker import RdkafkaMockBroker
from consumers.engine import Engine
from tests.chaos._checks import (
    answered_twice,
    assert_in_order,
    assert_nothing_lost,
    voice_requests,
)
from tests.support.kafka_client import PersonaPeer

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def health_status(engine: Engine) -> int:
    assert engine.addresses is not None
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{engine.addresses.http_url}/health")).status_code


async def publish_all(peer: PersonaPeer, requests: list[dict[str, Any]]) -> None:
    """One after the other, so each conversation's requests are in order on the topic.
    During an outage the producer holds a send until the broker is back; one that waited
    longer than its request timeout (40 s) expired unsent and is sent again."""
    for request in requests:
        while True:
            try:
                await peer.publish("voice", request)
                break
            except KafkaTimeoutError:
                continue


@pytest.mark.parametrize("outage_s", [
    pytest.param(8.0, id="8s"),
    pytest.param(30.0, id="30s", marks=pytest.mark.timeout(180)),
])
async def test_broker_outage_mid_stream_loses_nothing(
    outage_s: float, mock_broker: RdkafkaMockBroker, engine: Engine, peer: PersonaPeer
) -> None:
    before, during, after = (voice_requests(30, tag=tag) for tag in ("before", "during", "after"))
    await publish_all(peer, before)
    await peer.wait_for(lambda a: a.kind == "completed", count=10, timeout=30)
    await asyncio.to_thread(mock_broker.set_down)
    down_at = time.monotonic()
    answered_before_outage = sum(1 for a in peer.answers if a.kind == "completed")
    await engine.health.wait_until(lambda h: not h.kafka_connected, timeout=10)
    assert await health_status(engine) == 503

    publishing = asyncio.create_task(publish_all(peer, during))  # held by the producer
    await asyncio.sleep(outage_s - (time.monotonic() - down_at))  # the outage's length
    assert not publishing.done()
    await asyncio.to_thread(mock_broker.set_up)
    up_at = time.monotonic()
    await engine.health.wait_until(lambda h: h.kafka_connected, timeout=30)
    assert await health_status(engine) == 200
    await asyncio.wait_for(publishing, timeout=60)
    await publish_all(peer, after)

    published = before + during + after
    answers = await assert_nothing_lost(peer, published)
    print(f"outage {outage_s:.0f} s: {answered_before_outage} of 30 answered before it; "
          f"all 90 answered {time.monotonic() - up_at:.1f} s after the broker came back; "
          f"{answered_twice(peer, published)} answered twice")
    # the member's session expired during the outage: it was revoked and rejoined
    assert_in_order(answers, published)
