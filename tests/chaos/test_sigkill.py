"""The engine process killed with SIGKILL mid-stream and started again: every request
published before, during and after the crash is answered, each conversation in order.

`multimodal-engine serve` runs as a real subprocess (SIGKILL cannot be sent to a part of
this process); it needs an image model, so the tiny development model serves a few
image requests alongside the voice stream.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from tests.chaos._checks import (
    answered_twice,
    assert_all_committed,
    assert_in_order,
    assert_nothing_lost,
    voice_requests,
)
from tests.chaos.conftest import PARTITIONS, SESSION_MS
from tests.support.engine_process import EngineProcess
from tests.support.kafka_client import PersonaPeer
from tests.support.kafka_security import security_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

Spawn = Callable[[str], Any]


@pytest.fixture
async def spawn(settings: Settings, tmp_path: Path, dev_model_dir: Path
                ) -> AsyncIterator[Spawn]:
    started: list[EngineProcess] = []

    async def make(name: str) -> EngineProcess:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
            **security_env(settings.kafka_bootstrap_servers or ""),
            "KAFKA_TOPIC_PREFIX": settings.kafka_topic_prefix,
            "KAFKA_GROUP_ID": settings.kafka_group_id,
            "KAFKA_SESSION_TIMEOUT_MS": str(SESSION_MS),
            "KAFKA_HEARTBEAT_INTERVAL_MS": "200",
            "KAFKA_FETCH_MAX_WAIT_MS": "10",
            "SERVICE_PORT": "0",
            "OUTPUT_DIR": str(tmp_path / "outputs"),
            "LORA_OUTPUT_DIR": str(tmp_path / "loras"),
            "VOICE_BACKEND": "local",
            "FLUX_MODEL_PATH": str(dev_model_dir),
            "LOG_LEVEL": "INFO",
            "SHUTDOWN_GRACE_SECONDS": "5",
            "RETRY_BASE_DELAY": "0.01",
            "RETRY_MAX_DELAY": "0.05",
        }
        process = EngineProcess(env, tmp_path, name)
        started.append(process)
        await process.start(timeout=60)
        return process

    yield make
    for process in started:
        await process.stop()


def image_requests(n: int) -> list[dict[str, Any]]:
    return [{"request_id": str(uuid.uuid4()), "conversation_id": f"img-{i}",
             "prompt": "a portrait in a cafe", "width": 64, "height": 64,
             "num_inference_steps": 2, "optimize_prompt": False} for i in range(n)]


@pytest.mark.timeout(240)  # two process starts: 8-20 s each on a busy 2-core machine
async def test_sigkill_mid_stream_then_restart_loses_nothing(
    spawn: Spawn, settings: Settings, peer: PersonaPeer
) -> None:
    first = await spawn("first")
    before, while_dead = voice_requests(60, tag="before"), voice_requests(20, tag="dead")
    images = image_requests(2)
    for request in images:
        await peer.publish("image", request, encoding="avro")
    for request in before:
        await peer.publish("voice", request, encoding="avro")
    await peer.wait_for(lambda a: a.kind == "completed", count=15, timeout=60)
    first.send_signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    answered_before_kill = sum(1 for a in peer.answers if a.kind == "completed")
    for request in while_dead:
        await peer.publish("voice", request, encoding="avro")

    await spawn("restarted")
    voices = before + while_dead
    answers = await assert_nothing_lost(peer, voices, stall=30.0)  # a process start: ~10 s
    await assert_nothing_lost(peer, images, stall=30.0)
    assert settings.kafka_bootstrap_servers is not None
    for kind in ("voice", "image"):
        await assert_all_committed(settings.kafka_bootstrap_servers, settings.kafka_group_id,
                                   settings.topic(f"generation.requested.{kind}"), PARTITIONS)
    print(f"SIGKILL after {answered_before_kill} of 82 answers; "
          f"{answered_twice(peer, voices)} voice requests answered twice")
    assert_in_order(answers, voices)  # the restarted engine joined fresh: no revoke
