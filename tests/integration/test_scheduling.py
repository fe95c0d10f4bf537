"""Fair scheduling and request control on the real broker and the tiny development model:
voice never waits behind images, quiet conversations never wait behind a flood, live
images go before a replay and lift their own conversation's background work ahead of them,
cancels and deadlines, and HTTP under the same admission."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from consumers.engine import Engine
from consumers.serve import prepare_dev_model
from core.settings import Settings
from tests.support.kafka_client import Answer, PersonaPeer

pytestmark = pytest.mark.kafka

MakeEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def make_engine(settings: Settings, dev_model_dir: Path, tmp_path: Path
                      ) -> AsyncIterator[MakeEngine]:
    engines: list[Engine] = []

    async def make(**overrides: Any) -> Engine:
        configured = settings.model_copy(update={
            "dev_model_dir": dev_model_dir, "lora_output_dir": tmp_path / "loras",
            "progress_interval": 0.0, "batch_window_ms": 0, **overrides})
        model_path = await asyncio.to_thread(prepare_dev_model, configured)
        assert configured.kafka_bootstrap_servers is not None
        engine = Engine(configured, configured.kafka_bootstrap_servers, model_path=model_path,
                        http_host="127.0.0.1", registry=CollectorRegistry())
        engines.append(engine)
        await engine.start()
        await engine.health.wait_until(lambda h: len(h.assigned) >= 9, timeout=30)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


def image(conversation: str | None = None, *, size: int = 256, steps: int = 16,
          **fields: Any) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()),
            "conversation_id": conversation or f"c-{uuid.uuid4().hex[:6]}",
            "prompt": "a portrait of a woman in a cafe", "width": size, "height": size,
            "num_inference_steps": steps, "optimize_prompt": False, **fields}


def voice(conversation: str, **fields: Any) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation,
            "text": "Hello, I'm Sarah!", "inject_emotion": False, **fields}


def answered(peer: PersonaPeer, ids: set[str]) -> int:
    return len({a.event.get("request_id") for a in peer.answers
                if a.kind in ("completed", "failed") and a.event.get("request_id") in ids})


def progress_of(peer: PersonaPeer, request_id: str) -> list[Answer]:
    return [a for a in peer.answers
            if a.kind == "progress" and a.event["request_id"] == request_id]


def sample(engine: Engine, name: str, **labels: str) -> float | None:
    return engine.metrics.registry.get_sample_value(name, labels)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def test_voice_is_answered_while_images_fill_the_gpu(make_engine: MakeEngine,
                                                           peer: PersonaPeer) -> None:
    await make_engine()
    images = [image(size=512, steps=12) for _ in range(24)]
    for request in images:
        await peer.publish("image", request)
    image_ids = {r["request_id"] for r in images}
    await peer.wait_for(lambda a: a.kind == "progress", timeout=30)  # the GPU is busy
    for i in range(4):
        request = voice(f"voice-only-{i}")
        sent = time.perf_counter()
        await peer.publish("voice", request)
        reply = (await peer.answers_for([request["request_id"]], timeout=30))[
            request["request_id"]]
        assert reply.kind == "completed", reply.event
        # answered in its own time, not after the image backlog
        assert answered(peer, image_ids) < len(images) - 4, (i, reply.received_at - sent)
    await peer.answers_for(list(image_ids), timeout=120)


async def test_a_flooding_conversation_does_not_hold_quiet_ones(make_engine: MakeEngine,
                                                                peer: PersonaPeer) -> None:
    await make_engine()
    flood = [voice("flood") for _ in range(150)]
    for request in flood:
        await peer.publish("voice", request)
    flood_ids = {r["request_id"] for r in flood}
    await peer.wait_for(lambda a: a.event.get("request_id") in flood_ids, timeout=30)
    for i in range(3):
        quiet = voice(f"quiet-{i}")
        await peer.publish("voice", quiet)
        await peer.answers_for([quiet["request_id"]], timeout=30)
        assert answered(peer, flood_ids) < 120  # the flood's backlog is still there
    answers = await peer.answers_for(list(flood_ids), timeout=120)
    offsets = [answers[r["request_id"]].offset for r in flood]
    assert offsets == sorted(offsets)  # the flood itself keeps its order


async def test_an_interactive_image_overtakes_a_background_backlog(make_engine: MakeEngine,
                                                                   peer: PersonaPeer) -> None:
    engine = await make_engine(max_batch_size=1)
    backlog = [image(size=512, steps=12, priority="background") for _ in range(40)]
    for request in backlog:
        await peer.publish("image", request)
    backlog_ids = {r["request_id"] for r in backlog}
    await peer.wait_for(lambda a: a.kind == "progress", timeout=30)
    live = image(size=512, steps=12)
    await peer.publish("image", live)
    done_before = answered(peer, backlog_ids)
    reply = (await peer.answers_for([live["request_id"]], timeout=60))[live["request_id"]]
    assert reply.kind == "completed"
    first_step = progress_of(peer, live["request_id"])[0].received_at
    started_meanwhile = sum(
        1 for rid in backlog_ids
        if (steps := progress_of(peer, rid)) and steps[0].received_at < first_step
    ) - done_before
    # the job running when it arrived, and at most one more that began while the record
    # travelled from the broker to the engine
    assert started_meanwhile <= 2, started_meanwhile
    # background waits are measured apart from interactive ones
    assert sample(engine, "engine_queue_wait_seconds_count", kind="image",
                  priority="interactive") == 1
    assert (sample(engine, "engine_queue_wait_seconds_sum", kind="image",
                   priority="background") or 0) > 0
    for request in backlog:  # end the backlog quickly: cancel it
        await peer.publish("control", {"action": "cancel",
                                        "conversation_id": request["conversation_id"]})
    await peer.answers_for(list(backlog_ids), timeout=60)



async def test_a_live_image_lifts_its_conversations_background_one_ahead_of_it(
        make_engine: MakeEngine, peer: PersonaPeer) -> None:
    # the live image waits in its conversation's line behind a background one; that one
    # runs at the live one's priority (taking its turn among the busy chats) instead of
    # waiting until no chat has interactive work left
    await make_engine(max_batch_size=1)
    busy = [image(f"busy-{chat}", size=64, steps=2) for _ in range(6) for chat in range(4)]
    for request in busy:
        await peer.publish("image", request)
    busy_ids = {r["request_id"] for r in busy}
    await peer.wait_for(lambda a: a.kind == "completed" and a.event["request_id"] in busy_ids,
                        timeout=120)
    replay = image("victim", size=64, steps=2, priority="background")
    live = image("victim", size=64, steps=2)
    await peer.publish("image", replay)
    await peer.publish("image", live)
    replies = await peer.answers_for([replay["request_id"], live["request_id"]], timeout=300)
    assert {reply.kind for reply in replies.values()} == {"completed"}
    # both went within about two rounds of the four busy chats, not after all their work
    assert len(busy_ids) - answered(peer, busy_ids) >= 4, answered(peer, busy_ids)
    await peer.answers_for(list(busy_ids), timeout=300)

async def test_cancelling_a_conversation_drops_its_queue_and_stops_the_running_image(
    make_engine: MakeEngine, peer: PersonaPeer
) -> None:
    engine = await make_engine()
    conversation = "leaving-user"
    queued = [image(conversation, size=512, steps=40) for _ in range(20)]
    for request in queued:
        await peer.publish("image", request)
    ids = {r["request_id"] for r in queued}
    running = queued[0]["request_id"]
    await peer.wait_for(lambda a: a.kind == "progress" and a.event["request_id"] == running,
                        timeout=30)
    sent = time.perf_counter()
    await peer.publish("control", {"action": "cancel", "conversation_id": conversation})
    answers = await peer.answers_for(list(ids), timeout=30)
    assert {a.kind for a in answers.values()} == {"failed"}
    assert {a.event["error_code"] for a in answers.values()} == {"CANCELLED"}
    assert all(a.event["retryable"] is False for a in answers.values())
    assert max(a.received_at for a in answers.values()) - sent < 10
    steps = [a.event["step"] for a in progress_of(peer, running)]
    assert max(steps) < 40  # the running diffusion was stopped, not finished
    # later work runs normally, and nothing of the cancelled conversation ever completes
    after = image()
    await peer.publish("image", after)
    assert (await peer.answers_for([after["request_id"]], timeout=60))[
        after["request_id"]].kind == "completed"
    assert not [a for a in peer.answers
                if a.kind == "completed" and a.event.get("request_id") in ids]
    assert sample(engine, "engine_requests_cancelled_total", kind="image") == 20


async def test_a_cancel_that_arrives_before_its_request_still_applies(
    make_engine: MakeEngine, peer: PersonaPeer
) -> None:
    await make_engine()
    request = voice("early-cancel")
    await peer.publish("control", {"action": "cancel", "conversation_id": "early-cancel",
                                   "request_id": request["request_id"]}, encoding="avro")
    marker = voice("early-cancel-marker")  # the control record has been read by then ...
    await peer.publish("control", {"action": "cancel", "conversation_id": "nobody"})
    await peer.publish("voice", marker)
    await peer.answers_for([marker["request_id"]])
    await peer.publish("voice", request)  # ... and the request comes after it
    reply = (await peer.answers_for([request["request_id"]]))[request["request_id"]]
    assert reply.kind == "failed" and reply.event["error_code"] == "CANCELLED"


async def test_a_cancel_published_right_before_its_request_always_applies(
    make_engine: MakeEngine, peer: PersonaPeer
) -> None:
    """Back to back, no marker between: the read barrier alone orders the cancel first,
    for voice and image, whichever partitions the two records land on."""
    engine = await make_engine()
    requests = [voice(f"back-to-back-{n}") for n in range(8)] + [
        image(f"back-to-back-image-{n}", size=64, steps=2) for n in range(2)]
    for request in requests:
        await peer.publish("control", {"action": "cancel",
                                       "conversation_id": request["conversation_id"],
                                       "request_id": request["request_id"]})
        await peer.publish("image" if "prompt" in request else "voice", request)
    replies = await peer.answers_for([r["request_id"] for r in requests])
    assert {r.event.get("error_code") for r in replies.values()} == {"CANCELLED"}
    assert sample(engine, "engine_image_batch_size_sum") == 0  # the GPU never ran
    assert sample(engine, "engine_requests_cancelled_total", kind="voice") == 8


async def test_a_cancel_published_right_before_an_http_request_applies(
    make_engine: MakeEngine, peer: PersonaPeer
) -> None:
    engine = await make_engine()
    assert engine.addresses is not None
    request = voice("http-early-cancel")
    await peer.publish("control", {"action": "cancel", "conversation_id": "http-early-cancel",
                                   "request_id": request["request_id"]})
    status, body, _ = await _post(f"{engine.addresses.http_url}/generate/voice", request)
    assert status == 409 and body["error_code"] == "CANCELLED"


async def test_requests_past_their_deadline_expire_without_work(make_engine: MakeEngine,
                                                                peer: PersonaPeer) -> None:
    engine = await make_engine()
    past = iso(datetime.now(UTC) - timedelta(seconds=1))
    late_image = image(deadline=past)
    late_voice = voice("late", deadline=past)
    in_time = voice("in-time", deadline=iso(datetime.now(UTC) + timedelta(minutes=5)))
    await peer.publish("image", late_image)
    await peer.publish("voice", late_voice, encoding="avro")
    await peer.publish("voice", in_time)
    answers = await peer.answers_for(
        [late_image["request_id"], late_voice["request_id"], in_time["request_id"]])
    for request in (late_image, late_voice):
        event = answers[request["request_id"]].event
        assert event["error_code"] == "EXPIRED" and event["retryable"] is False
    assert answers[in_time["request_id"]].kind == "completed"
    assert sample(engine, "engine_image_batch_size_sum") == 0  # the GPU never ran
    assert not progress_of(peer, late_image["request_id"])
    assert sample(engine, "engine_requests_expired_total", kind="image") == 1


async def test_a_deadline_that_passes_in_the_queue_expires_the_request(
    make_engine: MakeEngine, peer: PersonaPeer
) -> None:
    await make_engine(max_batch_size=1)
    blocker = image("busy", size=512, steps=40)
    await peer.publish("image", blocker)
    await peer.wait_for(lambda a: a.kind == "progress", timeout=30)
    soon = image("impatient", size=256, steps=4,
                 deadline=iso(datetime.now(UTC) + timedelta(milliseconds=300)))
    await peer.publish("image", soon)
    ids = [blocker["request_id"], soon["request_id"]]
    answers = await peer.answers_for(ids, timeout=60)
    assert answers[soon["request_id"]].event["error_code"] == "EXPIRED"
    assert answers[blocker["request_id"]].kind == "completed"
    assert not progress_of(peer, soon["request_id"])


async def _post(url: str, body: dict[str, Any], timeout: float = 60
                ) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session, \
            session.post(url, json=body) as response:
        return response.status, await response.json(), response.headers


async def test_http_answers_503_with_retry_after_when_its_kind_is_full(
    make_engine: MakeEngine, peer: PersonaPeer
) -> None:
    engine = await make_engine(max_in_flight_image=1)
    assert engine.addresses is not None
    busy = image(size=512, steps=40)
    await peer.publish("image", busy)
    await peer.wait_for(lambda a: a.kind == "progress", timeout=30)  # holds the one slot
    status, body, headers = await _post(f"{engine.addresses.http_url}/generate/image",
                                        image(size=64, steps=2))
    assert status == 503 and int(headers["Retry-After"]) >= 1 and body["retryable"] is True
    status, body, _ = await _post(f"{engine.addresses.http_url}/generate/voice",
                                  voice("http-voice"))
    assert status == 200 and body["filename"].endswith(".mp3")  # voice is not held back
    await peer.answers_for([busy["request_id"]], timeout=60)
    status, _, _ = await _post(f"{engine.addresses.http_url}/generate/image",
                               image(size=64, steps=2))
    assert status == 200


async def test_http_delete_cancels_a_request_and_broadcasts_the_cancel(
    make_engine: MakeEngine, peer: PersonaPeer
) -> None:
    engine = await make_engine()
    assert engine.addresses is not None
    base = engine.addresses.http_url
    blocker = image("busy", size=512, steps=40)
    await peer.publish("image", blocker)
    await peer.wait_for(lambda a: a.kind == "progress", timeout=30)
    request = image("http-user", size=256, steps=8)
    post = asyncio.create_task(_post(f"{base}/generate/image", request))
    await engine.scheduling.pending.wait_until(
        lambda p: bool(p.find(request["request_id"])), timeout=10)
    async with aiohttp.ClientSession() as session:
        async with session.delete(f"{base}/requests/{request['request_id']}") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "cancelled"
        async with session.delete(f"{base}/requests/unknown-id") as response:
            assert response.status == 404
        for blank in ("%20", "c" * 201):  # blank or too long: a 422 naming it
            async with session.delete(f"{base}/requests/unknown-id?conversation_id={blank}"
                                      ) as response:
                detail = (await response.json())["detail"]
                assert response.status == 422 and detail[0]["loc"] == ["query",
                                                                          "conversation_id"]
    status, body, _ = await post
    assert status == 409 and body["error_code"] == "CANCELLED"
    broadcast = await peer.wait_for(  # published for every instance to act on
        lambda a: a.kind == "control" and a.event.get("request_id") == request["request_id"])
    assert broadcast[0].event["conversation_id"] == "http-user"
    assert broadcast[0].key == b"http-user"


async def test_a_client_that_goes_away_cancels_its_queued_request(
    make_engine: MakeEngine, peer: PersonaPeer
) -> None:
    engine = await make_engine()
    assert engine.addresses is not None
    blocker = image("busy", size=512, steps=40)
    await peer.publish("image", blocker)
    await peer.wait_for(lambda a: a.kind == "progress", timeout=30)
    request = image("impatient-client", size=256, steps=8)
    post = asyncio.create_task(_post(f"{engine.addresses.http_url}/generate/image",
                                     request, timeout=60))
    await engine.scheduling.pending.wait_until(
        lambda p: bool(p.find(request["request_id"])), timeout=10)
    post.cancel()  # the client disconnects
    await asyncio.gather(post, return_exceptions=True)
    await engine.scheduling.pending.wait_until(
        lambda p: not p.find(request["request_id"]), timeout=10)
    assert sample(engine, "engine_requests_cancelled_total", kind="image") == 1
    await peer.answers_for([blocker["request_id"]], timeout=60)
    assert sample(engine, "engine_image_batch_size_sum") == 1  # only the blocker ran
