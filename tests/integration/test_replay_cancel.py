"""A replayed copy keeps its original's timestamp (its priority), yet it was published when
the replay sent it: a conversation's cancel issued before the replay does not reach it.
``replayed-at`` says when; a copy without it (an older replay tool's) counts as published
when the engine reads it."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from consumers.replay import REPLAYED_AT, REPLAYED_FROM
from core.settings import Settings
from tests.integration.test_replay_command import (
    Original,
    _create_time,
    publish,
    read_topic,
    run_replay,
)
from tests.support.dev_engine import dev_engine
from tests.support.kafka_client import Answer, PersonaPeer

pytestmark = [pytest.mark.kafka, _create_time]


def image(conversation: str, prompt: str) -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "conversation_id": conversation,
            "prompt": prompt, "width": 64, "height": 64, "num_inference_steps": 2,
            "optimize_prompt": False}


def original(request: dict[str, Any], timestamp: int,
             *extra: tuple[str, bytes]) -> Original:
    return Original(0, request["conversation_id"].encode(), json.dumps(request).encode(),
                    timestamp, (("content-type", b"application/json"), *extra))


async def test_a_conversation_stopped_before_the_replay_has_its_copies_answered(
    settings: Settings, peer: PersonaPeer, dev_model_dir: Path, tmp_path: Path
) -> None:
    published = int(time.time() * 1000) - 120_000  # two minutes ago: before the stops
    by_tool = image("conv-replayed", "a portrait of a woman in a cafe")
    by_old_tool = image("conv-old-tool", "a cat on a windowsill")
    await publish(settings, [original(by_tool, published), original(by_old_tool, published)])
    for conversation in ("conv-replayed", "conv-old-tool"):  # the user presses "stop"
        await peer.publish("control", {"action": "cancel", "conversation_id": conversation,
                                       "created_at": datetime.now(UTC).isoformat()},
                           key=conversation)

    def answers(request: dict[str, Any]) -> Any:
        def answered(a: Answer) -> bool:
            return a.kind in ("completed", "failed") \
                and a.event.get("request_id") == request["request_id"]
        return answered

    async with dev_engine(settings, dev_model_dir, tmp_path):
        for request in (by_tool, by_old_tool):  # published before their stop: cancelled
            (first,) = await peer.wait_for(answers(request), timeout=60)
            assert first.event.get("error_code") == "CANCELLED", first.event

        before = int(time.time() * 1000)
        code, out, err = await run_replay(
            settings, "image", "--since",
            (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
            "--conversation", "conv-replayed")
        after = int(time.time() * 1000)
        assert code == 0, err
        assert out.strip().splitlines()[-1].startswith("replayed 1 records"), out
        again = (await peer.wait_for(answers(by_tool), count=2, timeout=60))[-1]
        assert again.kind == "completed", again.event

        # an older tool's copy: the original timestamp, replayed-from and no replayed-at
        await publish(settings, [original(by_old_tool, published,
                                          (REPLAYED_FROM, b"elsewhere/0/1"))])
        old = (await peer.wait_for(answers(by_old_tool), count=2, timeout=60))[-1]
        assert old.kind == "completed", old.event

    (copy,) = [r for r in await read_topic(settings)
               if REPLAYED_AT in dict(r.headers) and r.key == b"conv-replayed"]
    assert copy.timestamp == published  # its priority: the old record it is
    assert before <= int(dict(copy.headers)[REPLAYED_AT]) <= after
