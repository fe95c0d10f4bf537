"""The read barrier's bound: a request never waits longer than CANCEL_BARRIER_SECONDS for
cancels that cannot be read, and with the barrier off it waits for nothing. (That it
does wait for cancels published before it: tests/integration/test_scheduling.py.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import pytest
from aiokafka import AIOKafkaConsumer

from consumers.control import ControlReader
from core.scheduling import PendingRequests
from schemas.codec import EventCodec

MakeReader = Callable[[float], ControlReader]


@pytest.fixture
async def make_reader() -> AsyncIterator[MakeReader]:
    consumers: list[AIOKafkaConsumer] = []

    def make(timeout: float) -> ControlReader:
        # never started: its partitions are never known, so its cancels are never read
        consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", group_id=None)
        consumers.append(consumer)
        return ControlReader(consumer, "generation.control", EventCodec(), PendingRequests(),
                             lookback=600, barrier_timeout=timeout)

    yield make
    for consumer in consumers:
        await consumer.stop()


async def test_a_mark_that_cannot_be_reached_goes_ahead_after_the_bound_and_says_so(
    make_reader: MakeReader, caplog: pytest.LogCaptureFixture,
) -> None:
    mark = make_reader(0.2).mark()
    loop = asyncio.get_running_loop()
    began = loop.time()
    with caplog.at_level(logging.WARNING, logger="consumers.control"):
        await asyncio.wait_for(mark.reached(), timeout=5)
    assert 0.2 <= loop.time() - began < 2
    assert "not read within" in caplog.text and "going ahead" in caplog.text


async def test_a_barrier_of_zero_waits_for_nothing(make_reader: MakeReader) -> None:
    await asyncio.wait_for(make_reader(0).mark().reached(), timeout=0.05)


async def test_a_negative_bound_is_refused_naming_the_setting(
        make_reader: MakeReader) -> None:
    with pytest.raises(ValueError, match="CANCEL_BARRIER_SECONDS"):
        make_reader(-1)
