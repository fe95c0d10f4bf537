"""A request completed on an instance that died before committing it comes again, maybe
past its deadline or cancelled since its completion: it is completed again, the same URL,
from the remembered results (no GPU, no upstream call), never answered failed after its
consumer may have seen it completed. A request with nothing remembered is still answered
EXPIRED / CANCELLED, and so is a new request (another request_id) with the same content as
one completed before (the same explicit seed): its answer was never given, only another's.

A redelivery is the same record again: here the same value published once more (with the
original's timestamp where it matters); "past its deadline" is the same request with a
deadline that has passed."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from consumers.engine import Engine
from core.settings import Settings
from tests.integration.test_replay_command import Original, publish
from tests.integration.test_voice_elevenlabs import (  # noqa: F401 (fixture)
    eleven_engine,
    eleven_labs_engine,
)
from tests.support.dev_engine import dev_engine
from tests.support.elevenlabs_server import ElevenLabsServer
from tests.support.kafka_client import Answer, PersonaPeer
from tests.support.s3_server import StoreLocation

pytestmark = pytest.mark.kafka


def image(conversation: str, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation,
            "prompt": prompt, "width": 64, "height": 64, "num_inference_steps": 2,
            "optimize_prompt": False, **extra}


def passed() -> str:
    return (datetime.now(UTC) - timedelta(seconds=5)).isoformat()


def record(request: dict[str, Any], timestamp: int) -> Original:
    return Original(0, request["conversation_id"].encode(), json.dumps(request).encode(),
                    timestamp, (("content-type", b"application/json"),))


async def answers(peer: PersonaPeer, request: dict[str, Any], count: int) -> list[Answer]:
    return await peer.wait_for(
        lambda a: a.kind in ("completed", "failed")
        and a.event.get("request_id") == request["request_id"], count=count, timeout=60)


async def cancel(peer: PersonaPeer, conversation: str, request_id: str | None = None) -> None:
    await peer.publish("control", {"action": "cancel", "conversation_id": conversation,
                                   "request_id": request_id,
                                   "created_at": datetime.now(UTC).isoformat()},
                       key=conversation)


async def test_a_redelivered_image_is_completed_again_though_cancelled_or_expired_since(
    settings: Settings, peer: PersonaPeer, dev_model_dir: Path, tmp_path: Path
) -> None:
    published = int(time.time() * 1000)
    named = image("conv-named", "a portrait of a woman in a cafe", seed=7)
    whole = image("conv-whole", "a cat on a windowsill")
    dated = image("conv-dated", "a boat on a lake",
                  deadline=(datetime.now(UTC) + timedelta(minutes=5)).isoformat())
    async with dev_engine(settings, dev_model_dir, tmp_path):
        await publish(settings, [record(r, published) for r in (named, whole, dated)])
        (first_named,) = await answers(peer, named, 1)
        (first_whole,) = await answers(peer, whole, 1)
        (first_dated,) = await answers(peer, dated, 1)
        assert first_named.kind == first_whole.kind == first_dated.kind == "completed"
        # cancels that come after the completion (a race any caller can lose)
        await cancel(peer, "conv-named", named["request_id"])
        await cancel(peer, "conv-whole")

        # the records again, as another instance gets them: published before the cancels
        await publish(settings, [record(named, published), record(whole, published),
                                 record(dict(dated, deadline=passed()), published)])
        *_, by_id = await answers(peer, named, 2)
        *_, by_conversation = await answers(peer, whole, 2)
        *_, expired = await answers(peer, dated, 2)
        for again, first in ((by_id, first_named), (by_conversation, first_whole),
                             (expired, first_dated)):
            assert again.kind == "completed", again.event
            assert again.event["url"] == first.event["url"]

        # nothing remembered: cancelled and expired as ever
        stopped = image("conv-whole", "a lighthouse at dusk")
        late = image("conv-late", "a red bicycle", deadline=passed())
        # new requests with the content of one completed before: never answered either
        twin = dict(named, request_id=str(uuid.uuid4()), conversation_id="conv-twin")
        late_twin = dict(named, request_id=str(uuid.uuid4()), deadline=passed())
        await cancel(peer, "conv-twin", twin["request_id"])  # before it is published
        await publish(settings, [record(r, published) for r in (stopped, late, twin, late_twin)])
        replies = [(await answers(peer, r, 1))[0] for r in (stopped, late, twin, late_twin)]
    for reply, code in zip(replies, ("CANCELLED", "EXPIRED", "CANCELLED", "EXPIRED"),
                           strict=True):
        assert reply.kind == "failed" and reply.event.get("error_code") == code, reply.event


async def test_a_redelivered_voice_is_completed_again_without_asking_elevenlabs(
    eleven_engine: Engine, peer: PersonaPeer, upstream: ElevenLabsServer,  # noqa: F811
) -> None:
    request = {"request_id": str(uuid.uuid4()), "conversation_id": "conv-voice",
               "text": "I kept the last slice of cake for you."}
    await peer.publish("voice", request)
    (first,) = await answers(peer, request, 1)
    assert first.kind == "completed", first.event
    await peer.publish("voice", dict(request, deadline=passed()))
    (_, expired) = await answers(peer, request, 2)
    await cancel(peer, "conv-voice", request["request_id"])  # after it completed
    await peer.publish("voice", request)
    (*_, cancelled) = await answers(peer, request, 3)
    for again in (expired, cancelled):
        assert again.kind == "completed", again.event
        assert again.event["url"] == first.event["url"]
    assert upstream.tts_calls == 1

    fresh = dict(request, request_id=str(uuid.uuid4()), deadline=passed())
    await peer.publish("voice", fresh)
    (late,) = await answers(peer, fresh, 1)
    assert late.event.get("error_code") == "EXPIRED", late.event


async def test_a_new_voice_request_with_the_content_of_a_completed_one_is_not_answered_by_it(
    eleven_engine: Engine, peer: PersonaPeer, upstream: ElevenLabsServer,  # noqa: F811
) -> None:
    first = {"request_id": str(uuid.uuid4()), "conversation_id": "conv-first",
             "text": "See you tomorrow at the lake.", "seed": 42}
    await peer.publish("voice", first)
    (done,) = await answers(peer, first, 1)
    assert done.kind == "completed", done.event

    twin = dict(first, request_id=str(uuid.uuid4()), conversation_id="conv-twin")
    await cancel(peer, "conv-twin", twin["request_id"])  # before it is published
    await peer.publish("voice", twin)
    (cancelled,) = await answers(peer, twin, 1)
    late = dict(first, request_id=str(uuid.uuid4()), deadline=passed())
    await peer.publish("voice", late)
    (expired,) = await answers(peer, late, 1)
    assert cancelled.kind == "failed" and cancelled.event.get("error_code") == "CANCELLED", \
        cancelled.event
    assert expired.kind == "failed" and expired.event.get("error_code") == "EXPIRED", \
        expired.event

    await peer.publish("voice", dict(first, deadline=passed()))  # the first itself, again
    (_, again) = await answers(peer, first, 2)
    assert again.kind == "completed" and again.event["url"] == done.event["url"], again.event
    assert upstream.tts_calls == 1


async def test_another_instance_finds_which_requests_were_answered_in_the_store(
    settings: Settings, peer: PersonaPeer, upstream: ElevenLabsServer,
    s3_store: StoreLocation, tmp_path: Path,
) -> None:
    """The instance that completed a request is gone, its disk too; the one that gets the
    request again past its deadline finds its answer through the shared store."""
    def instance(name: str) -> dict[str, Any]:
        return {"output_dir": tmp_path / name / "outputs", "temp_dir": tmp_path / name / "temp",
                "storage_url": s3_store.url, "storage_endpoint_url": s3_store.endpoint}

    first = {"request_id": str(uuid.uuid4()), "conversation_id": "conv-fleet",
             "text": "The kettle is on, come in.", "seed": 9}
    async with eleven_labs_engine(settings, upstream, **instance("a")):
        await peer.publish("voice", first)
        (done,) = await answers(peer, first, 1)
    assert done.kind == "completed", done.event
    twin = dict(first, request_id=str(uuid.uuid4()), deadline=passed())
    async with eleven_labs_engine(settings, upstream, **instance("b")):
        await peer.publish("voice", dict(first, deadline=passed()))
        (_, again) = await answers(peer, first, 2)
        await peer.publish("voice", twin)
        (expired,) = await answers(peer, twin, 1)
    assert again.kind == "completed", again.event
    assert again.event["audio_id"] == done.event["audio_id"]
    assert expired.kind == "failed" and expired.event.get("error_code") == "EXPIRED", \
        expired.event
    assert upstream.tts_calls == 1
