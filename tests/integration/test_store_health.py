"""The shared store going away and coming back, as `/health` tells it: degraded (503)
while the store fails, ok again at its next answer; the engine keeps serving meanwhile."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from yarl import URL

from consumers.engine import Engine
from core.settings import Settings
from tests.support.dev_engine import dev_engine
from tests.support.s3_server import StoreLocation
from tests.support.tcp_gate import TcpGate

pytestmark = pytest.mark.kafka


@pytest.fixture
async def gate(s3_store: StoreLocation) -> AsyncIterator[TcpGate]:
    endpoint = URL(s3_store.endpoint)
    assert endpoint.host is not None and endpoint.port is not None
    gate = TcpGate(endpoint.host, endpoint.port)
    await gate.start()
    try:
        yield gate
    finally:
        await gate.stop()


@pytest.fixture
async def engine(settings: Settings, dev_model_dir: Path, tmp_path: Path,
                 s3_store: StoreLocation, gate: TcpGate) -> AsyncIterator[Engine]:
    async with dev_engine(settings, dev_model_dir, tmp_path,
                          output_dir=tmp_path / "outputs", temp_dir=tmp_path / "temp",
                          storage_url=s3_store.url, storage_endpoint_url=gate.url,
                          storage_timeout=3.0) as engine:
        yield engine


async def health(engine: Engine, client: httpx.AsyncClient) -> tuple[int, dict[str, object]]:
    assert engine.addresses is not None
    response = await client.get(f"{engine.addresses.http_url}/health")
    return response.status_code, response.json()


async def test_health_is_degraded_while_the_store_fails_and_ok_once_it_answers(
        engine: Engine, gate: TcpGate, s3_store: StoreLocation) -> None:
    assert engine.addresses is not None
    absent = f"{engine.addresses.http_url}/outputs/{uuid.uuid4()}.png"  # asks the store
    async with httpx.AsyncClient(timeout=30) as client:
        await engine.health.wait_until(lambda h: h.kafka_connected, 30)
        status, body = await health(engine, client)
        assert (status, body["status"]) == (200, "ok")  # the start-up probe answered
        assert body["store"] == {"url": s3_store.url, "reachable": True}

        gate.shut()
        failing = await client.get(absent)
        assert failing.status_code >= 500 and "127.0.0.1" not in failing.text
        await engine.health.wait_until(lambda h: h.store_reachable is False, 10)
        status, body = await health(engine, client)
        assert (status, body["status"]) == (503, "degraded")
        assert body["store"] == {"url": s3_store.url, "reachable": False}

        gate.open()
        assert (await client.get(absent)).status_code == 404  # answered: not an output
        await engine.health.wait_until(lambda h: h.store_reachable is True, 10)
        status, body = await health(engine, client)
        assert (status, body["status"]) == (200, "ok")
