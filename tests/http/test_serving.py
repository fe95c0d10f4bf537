"""Connections that send part of a request header and stop, on the real app served by the
engine's runner on 127.0.0.1 with a 1 s idle timeout: closed by the server, on a fresh
connection and on one that has had its answer; a whole request gets its answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.scheduling import build_scheduling
from core.settings import load_settings
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from http_files import AppServices, create_app
from http_files.serving import app_runner
from http_files.uploads import UploadLimits
from schemas.codec import EventCodec
from tests.http.raw import read_response

IDLE_TIMEOUT = 1.0


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[int]:
    store = OutputStore(tmp_path / "outputs", cleanup_delay=3600)
    metrics = EngineMetrics(CollectorRegistry())
    services = AppServices(
        health=EngineHealth(voice_backend="local"), metrics=metrics, store=store,
        codec=EventCodec(), scheduling=build_scheduling(load_settings(), metrics),
        voice=VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store,
                           "21m00Tcm4TlvDq8ikWAM"))
    runner = app_runner(create_app(services, UploadLimits(tmp_path / "temp" / "uploads")),
                        idle_timeout=IDLE_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 10) -> float:
    """Seconds until the server closes the connection (nothing more may come before)."""
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), timeout) == b""
    return time.monotonic() - started


async def test_a_connection_that_stops_within_its_request_header_is_closed(port: int) -> None:
    fresh = await asyncio.open_connection("127.0.0.1", port)
    answered = await asyncio.open_connection("127.0.0.1", port)
    try:
        fresh[1].write(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line
        answered[1].write(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        live = await read_response(answered[0], timeout=10)
        assert live.status == 200 and live.json()["status"] == "live"
        answered[1].write(b"GET /health/live HTTP/1.1\r\nHost: 1")  # the next one, cut

        waited = await asyncio.gather(closed_by_server(fresh[0]),
                                      closed_by_server(answered[0]))
        assert all(w >= IDLE_TIMEOUT * 0.5 for w in waited)  # its timeout, not an error
    finally:
        fresh[1].close()
        answered[1].close()


def test_an_idle_timeout_not_above_zero_is_refused() -> None:
    app = web.Application()
    with pytest.raises(ValueError, match="idle_timeout must be > 0 seconds, got 0"):
        app_runner(app, idle_timeout=0)
