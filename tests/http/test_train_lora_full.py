"""A full kind answers 503 with ``Retry-After`` (CONTRACT): ``POST /train-lora`` once this
instance has MAX_IN_FLIGHT_LORA trainings in progress (running or queued, Kafka and HTTP
alike), refused before an image of it is stored; a request for a training in progress here
or registered is answered as before. ``POST /generate/voice`` likewise when its kind is full.

The app and the training service are the real ones of ``tests/http/conftest.py`` on the
tiny model; long trainings (100000 steps) stay in progress while a test runs and are
stopped at their next step when it ends."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.scheduling import Priority
from http_files.services import SERVICES
from schemas.events import InlineImage, LoraTrainingRequested
from tests.core.test_training_images import photos
from tests.http.conftest import Serve, Served
from tests.http.forms import form
from tests.http.raw import head, open_raw, read_response, until

BOUNDARY = "full-b0undary"
LONG = "100000"  # steps: in progress for the whole test


async def post(served: Served, images: list[bytes], **fields: str) -> tuple[int, Any, str]:
    async with served.client.post("/train-lora", data=form(images, **fields)) as response:
        return response.status, await response.json(), response.headers.get("Retry-After", "")


def assert_full(status: int, body: Any, retry_after: str, limit: int) -> None:
    assert status == 503, body
    assert body["error_code"] == "UPSTREAM_UNAVAILABLE" and body["retryable"] is True
    assert f"MAX_IN_FLIGHT_LORA={limit}" in body["message"]
    assert 5 <= int(retry_after) <= 600


async def rejected(served: Served) -> str:
    text = await (await served.client.get("/metrics")).text()
    return next((line for line in text.splitlines()
                 if line.startswith('engine_http_rejected_total{kind="lora"}')), "")


@contextlib.asynccontextmanager
async def kafka_training(served: Served) -> AsyncIterator[str]:
    """A training begun as a Kafka record's is (:meth:`TrainingService.train`), in progress
    while the block runs; its id yielded."""
    event = LoraTrainingRequested(
        request_id=str(uuid.uuid4()), character_id="kaf", trigger_word="kfq", steps=100000,
        images=[InlineImage(filename=f"{i}.img", data=d) for i, d in enumerate(photos(5))])
    task = asyncio.create_task(served.training.train(event))
    try:
        await until(lambda: bool(served.training.in_progress))  # its images checked first
        yield next(iter(served.training.in_progress))
    finally:
        task.cancel()  # as a revoked record: stopped at its next step
        await asyncio.gather(task, return_exceptions=True)


async def test_a_new_training_beyond_the_limit_is_503_before_its_images(serve: Serve
                                                                       ) -> None:
    served = await serve(max_in_flight_lora=2)
    pictures = photos(5)
    async with kafka_training(served) as kafka_id:
        status, first, _ = await post(served, pictures, character_id="ana", steps=LONG)
        assert status == 200 and first["status"] == "training_started", first
        assert served.training.in_progress == {kafka_id, first["training_id"]}

        # a new one: its fields, then the start of its first image, then nothing more
        reader, writer = await open_raw(served.client)
        start = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"character_id\""
                 f"\r\n\r\nbob\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; "
                 f"name=\"trigger_word\"\r\n\r\nbbq\r\n--{BOUNDARY}\r\nContent-Disposition: "
                 "form-data; name=\"images\"; filename=\"0.png\"\r\n\r\n").encode() + (
                     b"\x89PNG" + bytes(256 * 1024))  # (the reader reads a chunk ahead)
        writer.write(head("/train-lora", {
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Content-Length": str(len(start) + 10**7)}) + start)
        await writer.drain()
        answer = await read_response(reader)  # answered with most of the body unsent
        writer.close()
        assert_full(answer.status, answer.json(), answer.headers["retry-after"], 2)
        await served.uploads.wait_idle()
        assert not list((served.temp / "uploads").iterdir())  # nothing of it was kept

        # the same request again finds its training: answered as before
        status, again, _ = await post(served, pictures, character_id="ana", steps=LONG,
                                      request_id=first["request_id"])
        assert status == 200 and again["training_id"] == first["training_id"], again
        assert again["status"] == "training_started"

        # a new one sent by an ordinary client: refused likewise
        status, body, retry_after = await post(served, pictures, character_id="cid",
                                               steps=LONG)
        assert_full(status, body, retry_after, 2)
        assert served.training.in_progress == {kafka_id, first["training_id"]}
        assert await rejected(served) == 'engine_http_rejected_total{kind="lora"} 2.0'

    # the Kafka training gone: a place is free again
    await until(lambda: kafka_id not in served.training.in_progress)
    status, taken, _ = await post(served, pictures, character_id="dan", steps=LONG)
    assert status == 200 and taken["status"] == "training_started", taken


async def test_a_registered_training_is_answered_when_the_kind_is_full(serve: Serve
                                                                      ) -> None:
    served = await serve(max_in_flight_lora=1)
    pictures = photos(5)
    status, done, _ = await post(served, pictures, character_id="eva")  # 4 steps
    assert status == 200, done
    finished = await served.training.wait(done["training_id"])
    assert finished is not None and finished.state == "completed"

    status, running, _ = await post(served, pictures, character_id="fay", steps=LONG)
    assert status == 200 and running["status"] == "training_started", running
    status, replay, _ = await post(served, pictures, character_id="eva",
                                   request_id=done["request_id"])
    assert status == 200 and replay["status"] == "completed", replay
    assert replay["lora_id"] == finished.lora_id


async def test_two_uploads_arriving_together_do_not_both_take_the_last_place(serve: Serve
                                                                            ) -> None:
    served = await serve(max_in_flight_lora=1)
    pictures = photos(5)
    answers = await asyncio.gather(
        post(served, pictures, character_id="gus", steps=LONG),
        post(served, pictures, character_id="hal", steps=LONG))
    assert sorted(status for status, _, _ in answers) == [200, 503], answers
    assert len(served.training.in_progress) == 1


@pytest.mark.parametrize("accept", ["application/json", "audio/mpeg"])
async def test_voice_is_503_with_retry_after_when_its_kind_is_full(serve: Serve,
                                                                   accept: str) -> None:
    served = await serve(max_in_flight_voice=1)
    admission = served.client.server.app[SERVICES].scheduling.admission
    assert admission.try_acquire("voice", "another-conversation", Priority.INTERACTIVE)
    try:
        async with served.client.post("/generate/voice", json={"text": "Full."},
                                       headers={"Accept": accept}) as response:
            body = await response.json()
            assert response.status == 503, body
            assert int(response.headers["Retry-After"]) >= 1
        assert body["error_code"] == "UPSTREAM_UNAVAILABLE" and body["retryable"] is True
    finally:
        admission.release("voice", "another-conversation", Priority.INTERACTIVE)
    async with served.client.post("/generate/voice", json={"text": "Room now."}) as response:
        assert response.status == 200
