"""Replaying the voice topic costs nothing twice and sounds the same: through the real broker
against the local ElevenLabs, which counts the upstream calls and records the seeds."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from consumers.engine import Engine
from core.seeds import derive_seed
from core.settings import Settings
from core.voice import SEED_MAX
from tests.integration.test_voice_elevenlabs import eleven_labs_engine
from tests.support.elevenlabs_server import ElevenLabsServer
from tests.support.kafka_client import Answer, PersonaPeer

pytestmark = pytest.mark.kafka


@pytest.fixture
async def upstream() -> AsyncIterator[ElevenLabsServer]:
    server = ElevenLabsServer(seconds_per_char=0.004)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def eleven_engine(settings: Settings, upstream: ElevenLabsServer) -> AsyncIterator[Engine]:
    async with eleven_labs_engine(settings, upstream) as engine:
        yield engine


def voice_request(**extra: Any) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": f"c-{uuid.uuid4().hex[:6]}",
            "text": "I kept the last slice of cake for you.", **extra}


async def answers(peer: PersonaPeer, request: dict[str, Any], count: int) -> list[Answer]:
    """The first ``count`` completed/failed answers to ``request``, in arrival order."""
    return await peer.wait_for(
        lambda a: a.kind in ("completed", "failed")
        and a.event.get("request_id") == request["request_id"], count=count)


async def test_a_replay_is_answered_from_the_cache_and_after_cleanup_asks_the_same_seed(
    eleven_engine: Engine, peer: PersonaPeer, upstream: ElevenLabsServer,
) -> None:
    request = voice_request()
    await peer.publish("voice", request)
    (first,) = await answers(peer, request, 1)
    assert first.kind == "completed", first.event
    assert upstream.tts_calls == 1
    seed = upstream.tts_requests()[0].json["seed"]
    assert seed == derive_seed(request["request_id"], SEED_MAX) == first.event["seed"]

    await peer.publish("voice", request)  # the documented way to regenerate: a replay
    replayed = (await answers(peer, request, 2))[1]
    assert replayed.kind == "completed", replayed.event
    assert upstream.tts_calls == 1  # no new upstream call
    for field in ("audio_id", "filename", "url", "enhanced_text", "duration_seconds", "seed"):
        assert replayed.event[field] == first.event[field], field

    path = eleven_engine.store.resolve(first.event["filename"])
    assert path is not None
    path.unlink()  # what cleanup does once CLEANUP_DELAY passed
    await peer.publish("voice", request)
    again = (await answers(peer, request, 3))[2]
    assert again.kind == "completed", again.event
    assert upstream.tts_calls == 2
    first_body, second_body = (r.json for r in upstream.tts_requests())
    assert second_body == first_body  # the same seed, text and settings: the same audio
    assert again.event["filename"] != first.event["filename"]
    assert eleven_engine.store.exists(again.event["filename"])
    assert again.event["enhanced_text"] == first.event["enhanced_text"]


async def test_an_explicit_seed_is_passed_through_and_a_bad_one_is_refused_naming_it(
    eleven_engine: Engine, peer: PersonaPeer, upstream: ElevenLabsServer,
) -> None:
    chosen = voice_request(seed=SEED_MAX)
    too_big = voice_request(seed=SEED_MAX + 1)
    negative = voice_request(seed=-1)
    for request in (chosen, too_big, negative):
        await peer.publish("voice", request)
    got = await peer.answers_for([r["request_id"] for r in (chosen, too_big, negative)])

    assert got[chosen["request_id"]].kind == "completed"
    assert got[chosen["request_id"]].event["seed"] == SEED_MAX
    (sent,) = upstream.tts_requests()  # the refused ones never reached upstream
    assert sent.json["seed"] == SEED_MAX
    for bad in (too_big, negative):
        failed = got[bad["request_id"]]
        assert failed.kind == "failed"
        assert failed.event["error_code"] == "INVALID_REQUEST"
        assert "seed" in failed.event["message"]

    assert eleven_engine.addresses is not None
    async with aiohttp.ClientSession(eleven_engine.addresses.http_url) as session:
        for seed in (SEED_MAX + 1, -1, "7", 1.5):
            async with session.post("/generate/voice", json={"text": "Hi.", "seed": seed}
                                    ) as response:
                body = await response.json()
                assert response.status == 422, body
                assert body["detail"][0]["loc"] == ["body", "seed"], body
        async with session.post("/generate/voice", json={"text": "Hi.", "seed": 7}
                                ) as response:
            assert response.status == 200 and (await response.json())["seed"] == 7
    assert upstream.tts_calls == 2
