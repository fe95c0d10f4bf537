"""The ElevenLabs quota: GET /v1/user/subscription, cached, into /health's snapshot; the key
never shows."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from core.health import EngineHealth, VoiceQuota
from core.voice import ElevenLabsBackend, QuotaMonitor
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer


@pytest.fixture
async def server() -> AsyncIterator[ElevenLabsServer]:
    s = ElevenLabsServer(character_limit=10_000, tier="starter")
    await s.start()
    yield s
    await s.stop()


def subscription_calls(server: ElevenLabsServer) -> int:
    return sum(r.path == "/v1/user/subscription" for r in server.received)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_quota_is_read_once_per_ttl(
    server: ElevenLabsServer, http: httpx.AsyncClient
) -> None:
    clock = Clock()
    backend = ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY))
    monitor = QuotaMonitor(backend, ttl=60, clock=clock)
    server.character_count = 1234

    first = await monitor.current()
    assert first == VoiceQuota(used=1234, limit=10_000, tier="starter",
                               resets_at="2026-01-01T00:00:00Z")
    server.character_count = 2000
    clock.now += 59
    assert await monitor.current() == first and subscription_calls(server) == 1
    clock.now += 2
    assert (await monitor.current()).used == 2000 and subscription_calls(server) == 2
    assert (await monitor.current(force=True)).used == 2000 and subscription_calls(server) == 3
    await asyncio.gather(*(monitor.current(force=True) for _ in range(3)))
    assert subscription_calls(server) == 6  # forced: each one asks, one after the other
    assert server.received[0].key == "ok"


async def test_a_failed_check_keeps_the_figures_and_names_the_error(
    server: ElevenLabsServer, http: httpx.AsyncClient
) -> None:
    backend = ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY))
    monitor = QuotaMonitor(backend, ttl=0)
    known = await monitor.current()
    server.api_key = "rotated"
    failed = await monitor.current()
    assert failed.error == "UPSTREAM_REJECTED"
    assert (failed.used, failed.limit, failed.tier) == (known.used, known.limit, known.tier)

    unreachable = ElevenLabsBackend(http, "http://127.0.0.1:9/v1", SecretStr(DEFAULT_KEY))
    assert await QuotaMonitor(unreachable).current() == VoiceQuota(error="UPSTREAM_UNAVAILABLE")


async def test_run_puts_the_quota_into_health_without_the_key(
    server: ElevenLabsServer, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk_health_secret_777"
    caplog.set_level(logging.DEBUG)
    server.api_key = secret
    backend = ElevenLabsBackend(http, server.api_url, SecretStr(secret))
    health = EngineHealth(voice_backend=backend.name)
    assert health.snapshot()["voice"] == {"backend": "elevenlabs"}

    stop = asyncio.Event()
    task = asyncio.create_task(QuotaMonitor(backend).run(health, stop, interval=30))
    await health.wait_until(lambda h: h.voice_quota is not None, timeout=5)
    stop.set()
    await asyncio.wait_for(task, 5)

    snapshot = health.snapshot()
    assert snapshot["voice"] == {
        "backend": "elevenlabs",
        "quota": {"used": 0, "limit": 10_000, "tier": "starter",
                  "resets_at": "2026-01-01T00:00:00Z", "error": None},
    }
    assert secret not in json.dumps(snapshot) and secret not in caplog.text


def test_the_local_voice_has_no_quota_in_health() -> None:
    assert EngineHealth(voice_backend="local").snapshot()["voice"] == {"backend": "local"}
