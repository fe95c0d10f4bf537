"""The probes of an in-process engine on the tiny model, over HTTP as an orchestrator
calls them: ``/health/live`` and ``/health/ready`` both 200 once started; from a stop
request on, readiness is 503 while the drain finishes the image at work (liveness stays
200); through a broker outage liveness stays 200 while readiness (and ``/health``) is 503,
and readiness comes back with the broker.

The outage is a real one: the librdkafka mock broker of this module (the chaos suite's,
``consumers.broker.RdkafkaMockBroker``) is taken down and brought back on its port."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from consumers.broker import RdkafkaMockBroker
from consumers.engine import Engine
from consumers.serve import prepare_dev_model
from consumers.topics import CONTRACT_TOPICS
from core.health import EngineHealth
from core.settings import Settings
from tests.support.dev_engine import dev_engine
from tests.support.kafka_client import Answer, PersonaPeer
from tests.support.mock_broker import module_mock_broker
from tests.support.settings import engine_settings

pytestmark = pytest.mark.kafka

PROBES = ("/health/live", "/health/ready", "/health")


async def probe(engine: Engine, path: str) -> tuple[int, dict[str, Any]]:
    assert engine.addresses is not None
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(engine.addresses.http_url + path)
    return response.status_code, response.json()


def serving(health: EngineHealth) -> bool:
    return health.started and health.kafka_connected and bool(health.assigned)


async def test_live_and_ready_once_started_then_not_ready_from_the_stop_request_on(
    settings: Settings, dev_model_dir: Path, tmp_path: Path, peer: PersonaPeer
) -> None:
    async with dev_engine(settings, dev_model_dir, tmp_path, progress_interval=0.0,
                          shutdown_grace_seconds=60) as engine:  # the drain ends the image
        await engine.health.wait_until(serving, timeout=30)
        assert await probe(engine, "/health/live") == (
            200, {"status": "live", "gpu_worker": {"state": "idle", "busy_seconds": None}})
        assert await probe(engine, "/health/ready") == (200, {"status": "ready", "reasons": []})

        # an image that keeps the GPU worker busy for seconds (the tiny model at its
        # largest), so that the stop request comes while it is at work
        request = {"request_id": str(uuid.uuid4()), "conversation_id": "c-drain",
                   "prompt": "a lighthouse", "width": 768, "height": 768,
                   "num_inference_steps": 100, "optimize_prompt": False}

        def its(kind: str) -> Any:
            return lambda a: a.kind == kind and a.event.get("request_id") == request["request_id"]

        await peer.publish("image", request)
        await peer.wait_for(its("progress"), timeout=60)
        engine.request_stop()  # what SIGTERM does

        assert await probe(engine, "/health/ready") == (
            503, {"status": "not_ready", "reasons": ["draining"]})
        status, live = await probe(engine, "/health/live")
        assert status == 200 and live["status"] == "live"
        assert live["gpu_worker"]["state"] == "busy"  # the drain is still at work
        status, health = await probe(engine, "/health")  # its meaning unchanged
        assert status == 200 and health["status"] == "ok"

        # the drain finishes the image and publishes it; readiness stays 503 meanwhile
        done: list[Answer] = await peer.wait_for(its("completed"), timeout=60)
        assert done[0].event["width"] == 768
        assert await probe(engine, "/health/ready") == (
            503, {"status": "not_ready", "reasons": ["draining"]})
        assert (await probe(engine, "/health/live"))[0] == 200


# --- a broker outage ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mock_broker() -> Iterator[RdkafkaMockBroker]:
    yield from module_mock_broker()


@pytest.fixture
async def outage_engine(mock_broker: RdkafkaMockBroker, topic_prefix: str, tmp_path: Path,
                        dev_model_dir: Path, monkeypatch: pytest.MonkeyPatch
                        ) -> AsyncIterator[Engine]:
    """The engine with the tiny model on the mock broker; ``/health`` follows the broker
    within about a second (as in the chaos suite)."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    mock_broker.set_up()
    mock_broker.create_topics([f"{topic_prefix}{t}" for t in CONTRACT_TOPICS], 3)
    settings = engine_settings(tmp_path, mock_broker.bootstrap_servers, topic_prefix,
                               shutdown_grace_seconds=5, dev_model_dir=dev_model_dir,
                               lora_output_dir=tmp_path / "loras")
    model_path = await asyncio.to_thread(prepare_dev_model, settings)
    engine = Engine(settings, mock_broker.bootstrap_servers, model_path=model_path,
                    http_host="127.0.0.1", registry=CollectorRegistry(),
                    broker_watch_interval=1.0)
    await engine.start()
    try:
        yield engine
    finally:
        await asyncio.to_thread(mock_broker.set_up)  # a test failed mid-outage: stop quickly
        await asyncio.wait_for(engine.stop(), timeout=60)


@dataclass
class Prober:
    """Calls every probe each ``period`` seconds, as a kubelet does, and keeps what each
    answered while the broker was down and after it came back."""

    engine: Engine
    period: float = 0.5
    during: dict[str, set[int]] = field(default_factory=dict)
    after: dict[str, set[int]] = field(default_factory=dict)
    broker_down: bool = False
    broker_back: bool = False
    ready_again: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while True:
            for path in PROBES:
                # the phase the probe was sent in (a probe is answered at once)
                phase = self.after if self.broker_back else \
                    self.during if self.broker_down else None
                status, _ = await probe(self.engine, path)
                if phase is not None:
                    phase.setdefault(path, set()).add(status)
                if phase is self.after and path == "/health/ready" and status == 200:
                    self.ready_again.set()
            await asyncio.sleep(self.period)  # the probe period, not a wait for an event

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.slow
@pytest.mark.parametrize("outage_s", [
    pytest.param(5.0, id="5s"),
    pytest.param(30.0, id="30s", marks=pytest.mark.timeout(180)),
])
async def test_liveness_holds_through_a_broker_outage_while_readiness_fails(
    outage_engine: Engine, mock_broker: RdkafkaMockBroker, outage_s: float
) -> None:
    engine = outage_engine
    await engine.health.wait_until(serving, timeout=30)
    assert (await probe(engine, "/health/ready"))[0] == 200
    prober = Prober(engine)
    async with prober.running():
        await asyncio.to_thread(mock_broker.set_down)
        down_at = time.monotonic()
        await engine.health.wait_until(lambda h: not h.kafka_connected, timeout=20)
        prober.broker_down = True  # from here on readiness must be 503, liveness 200
        assert await probe(engine, "/health/ready") == (
            503, {"status": "not_ready", "reasons": ["kafka_unreachable"]})
        status, live = await probe(engine, "/health/live")
        assert status == 200 and live["gpu_worker"]["state"] == "idle"
        assert (await probe(engine, "/health"))[0] == 503
        await asyncio.sleep(max(0.0, outage_s - (time.monotonic() - down_at)))  # its length
        prober.broker_down = False
        await asyncio.to_thread(mock_broker.set_up)
        await engine.health.wait_until(lambda h: h.kafka_connected, timeout=30)
        prober.broker_back = True
        await asyncio.wait_for(prober.ready_again.wait(), timeout=30)
    assert prober.during == {"/health/live": {200}, "/health/ready": {503}, "/health": {503}}
    assert prober.after["/health/live"] == {200}
    assert await probe(engine, "/health/ready") == (200, {"status": "ready", "reasons": []})
