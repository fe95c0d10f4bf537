"""A refused login is retried after a growing pause, one trial at a time, per address."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from consumers.login_backoff import LoginBackingOff, LoginBackoff


class Broker:
    """What ``create_conn`` meets: refusals, an outage or a login, as the test sets."""

    def __init__(self) -> None:
        self.answer: str = "refuse"
        self.attempts = 0
        self.gate: asyncio.Event | None = None
        self.called = asyncio.Event()

    async def create(self, host: str, port: int, **options: Any) -> str:
        self.attempts += 1
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if host != "b":  # other brokers always let us in
            return f"connection to {host}:{port}"
        if self.answer == "refuse":
            raise SaslAuthenticationFailed("invalid credentials")
        if self.answer == "down":
            raise KafkaConnectionError("connection refused")
        return f"connection to {host}:{port}"


async def test_refusals_pause_longer_each_time_and_a_login_ends_it() -> None:
    broker, now = Broker(), [0.0]
    backoff = LoginBackoff(broker.create, first=1.0, longest=4.0, clock=lambda: now[0])
    with pytest.raises(SaslAuthenticationFailed):
        await backoff("b", 9092)
    for trials, pause in enumerate((1.0, 2.0, 4.0, 4.0)):  # doubling, up to the longest
        with pytest.raises(LoginBackingOff):  # no connection made meanwhile
            await backoff("b", 9092)
        assert broker.attempts == 1 + trials
        now[0] += pause - 0.01
        with pytest.raises(LoginBackingOff):
            await backoff("b", 9092)
        now[0] += 0.01
        with pytest.raises(SaslAuthenticationFailed):  # the trial login, refused again
            await backoff("b", 9092)
    assert await backoff("other", 9092) == "connection to other:9092"  # per address
    broker.attempts -= 1
    broker.answer = "ok"
    now[0] += 4.0
    assert await backoff("b", 9092) == "connection to b:9092"
    assert await backoff("b", 9092) == "connection to b:9092"  # no pause left


async def test_one_trial_login_at_a_time_and_an_outage_is_no_refusal() -> None:
    broker, now = Broker(), [0.0]
    backoff = LoginBackoff(broker.create, clock=lambda: now[0])
    with pytest.raises(SaslAuthenticationFailed):
        await backoff("b", 9092)
    now[0] += 1.0
    broker.gate = asyncio.Event()
    broker.called.clear()
    trial = asyncio.create_task(backoff("b", 9092))
    await asyncio.wait_for(broker.called.wait(), 5)  # the trial is connecting
    with pytest.raises(LoginBackingOff):  # every other client fails at once meanwhile
        await backoff("b", 9092)
    broker.answer = "down"
    broker.gate.set()
    with pytest.raises(KafkaConnectionError):
        await trial
    broker.gate = None
    with pytest.raises(KafkaConnectionError):  # unreachable is not refused: tried again
        await backoff("b", 9092)
    assert broker.attempts == 3


async def test_other_credentials_are_not_held_back() -> None:
    broker, now = Broker(), [0.0]
    backoff = LoginBackoff(broker.create, clock=lambda: now[0])
    wrong = {"sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "engine",
             "sasl_plain_password": "wrong"}
    with pytest.raises(SaslAuthenticationFailed):
        await backoff("b", 9092, **wrong)
    assert backoff.refusing
    with pytest.raises(LoginBackingOff):
        await backoff("b", 9092, **wrong)
    broker.answer = "ok"  # the right password is tried at once, and works
    assert await backoff("b", 9092, **{**wrong, "sasl_plain_password": "right"})
    with pytest.raises(LoginBackingOff):  # the wrong one is still held back
        await backoff("b", 9092, **wrong)
    backoff.reset()
    assert not backoff.refusing
