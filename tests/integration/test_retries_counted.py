"""``engine_retries_total`` counts every retry a request's budget grants, once, whichever
layer retries: the ElevenLabs backend's own retries of a Kafka request (it spends the
request's budget) and of an HTTP request (a budget of its own) alike."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumers.engine import Engine
from core.settings import Settings
from tests.integration.test_voice_elevenlabs import eleven_labs_engine, voice_request
from tests.support.elevenlabs_server import ElevenLabsServer, Fault
from tests.support.kafka_client import PersonaPeer

pytestmark = pytest.mark.kafka


async def _retries(engine: Engine) -> dict[tuple[str, str], float]:
    assert engine.addresses is not None
    async with aiohttp.ClientSession() as session, \
            session.get(engine.addresses.http_url + "/metrics") as response:
        text = await response.text()
    return {(sample.labels["kind"], sample.labels["error_code"]): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "engine_retries_total"}


async def test_upstream_retries_of_kafka_and_http_requests_are_counted_once(
    settings: Settings, peer: PersonaPeer, upstream: ElevenLabsServer
) -> None:
    async with eleven_labs_engine(settings, upstream) as engine:
        upstream.faults = [Fault("server_error"), Fault("server_error_detail")]
        asked = voice_request("conv-flaky")
        await peer.publish("voice", asked)
        answer = (await peer.answers_for([asked["request_id"]]))[asked["request_id"]]
        assert answer.kind == "completed", answer.event
        assert (await _retries(engine)).get(("voice", "UPSTREAM_UNAVAILABLE")) == 2.0

        upstream.faults = [Fault("server_error")]
        assert engine.addresses is not None
        async with aiohttp.ClientSession() as session, session.post(
                engine.addresses.http_url + "/generate/voice",
                json={"text": "Still there?"}) as response:
            assert response.status == 200, await response.text()
        assert (await _retries(engine)).get(("voice", "UPSTREAM_UNAVAILABLE")) == 3.0
