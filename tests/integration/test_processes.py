"""The engine as separate processes on the real broker: crashes, graceful stops and a
group of two. Nothing accepted may be lost."""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from core.settings import Settings
from tests.support.engine_process import EngineProcess
from tests.support.kafka_client import PersonaPeer
from tests.support.kafka_security import security_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture
async def spawn(settings: Settings, tmp_path: Path, dev_model_dir: Path
                ) -> AsyncIterator[Callable[..., Any]]:
    started: list[EngineProcess] = []

    async def make(name: str = "engine") -> EngineProcess:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
            **security_env(settings.kafka_bootstrap_servers or ""),
            "KAFKA_TOPIC_PREFIX": settings.kafka_topic_prefix,
            "KAFKA_GROUP_ID": settings.kafka_group_id,
            "KAFKA_SESSION_TIMEOUT_MS": "3000",
            "KAFKA_HEARTBEAT_INTERVAL_MS": "300",
            "KAFKA_FETCH_MAX_WAIT_MS": "10",
            "SERVICE_PORT": "0",
            "OUTPUT_DIR": str(tmp_path / "outputs"),
            "VOICE_BACKEND": "local",
            "LOG_LEVEL": "INFO",
            "SHUTDOWN_GRACE_SECONDS": "20",
            "FLUX_MODEL_PATH": str(dev_model_dir),
            "LORA_OUTPUT_DIR": str(tmp_path / "loras"),
        }
        process = EngineProcess(env, tmp_path, name)
        started.append(process)
        await process.start()
        return process

    yield make
    for process in started:
        await process.stop()


def requests(n: int, conversations: int = 12) -> list[dict[str, Any]]:
    return [{"request_id": str(uuid.uuid4()), "conversation_id": f"conv-{i % conversations}",
             "text": f"Message number {i}. How are you today?"} for i in range(n)]


def answered(peer: PersonaPeer) -> Counter[str]:
    return Counter(a.event["request_id"] for a in peer.answers if a.kind == "completed")


async def test_sigkill_mid_stream_then_restart_loses_nothing(spawn: Any,
                                                              peer: PersonaPeer) -> None:
    first = await spawn("first")
    batch = requests(120)
    for r in batch:
        await peer.publish("voice", r)
    await peer.wait_for(lambda a: a.kind == "completed", count=20, timeout=60)
    first.send_signal(signal.SIGKILL)
    await first.wait()
    await spawn("restarted")
    answers = await peer.answers_for([r["request_id"] for r in batch], timeout=90)
    assert len(answers) == len(batch)  # every request answered: 0 lost
    assert all(a.kind == "completed" for a in answers.values())


async def test_sigterm_finishes_in_flight_and_nothing_is_redone(spawn: Any,
                                                                 peer: PersonaPeer) -> None:
    first = await spawn("first")
    batch = requests(60)
    for r in batch:
        await peer.publish("voice", r)
    await peer.wait_for(lambda a: a.kind == "completed", count=10, timeout=60)
    first.send_signal(signal.SIGTERM)
    assert await first.wait(timeout=30) == 0
    done_before_restart = set(answered(peer))
    await spawn("restarted")
    await peer.answers_for([r["request_id"] for r in batch], timeout=90)
    counts = answered(peer)
    assert set(counts) == {r["request_id"] for r in batch}
    assert max(counts.values()) == 1, "a request answered before SIGTERM was redone"
    assert done_before_restart  # the stop happened mid-stream


async def test_two_engines_in_one_group_share_the_partitions(spawn: Any,
                                                              peer: PersonaPeer) -> None:
    a = await spawn("a")
    await a.wait_for_line(lambda line: "partitions assigned: " in line
                          and "none" not in line, timeout=30)
    b = await spawn("b")
    await b.wait_for_line(lambda line: "partitions assigned: " in line
                          and "none" not in line, timeout=30)
    # b holds partitions now, so the group rebalanced: a keeps only the others
    batch = requests(60, conversations=30)
    for r in batch:
        await peer.publish("voice", r)
    answers = await peer.answers_for([r["request_id"] for r in batch], timeout=90)
    assert len(answers) == len(batch)
    async with aiohttp.ClientSession() as session:
        for process in (a, b):
            async with session.get(f"{process.http_url}/metrics") as response:
                text = await response.text()
            line = next(l for l in text.splitlines()
                        if l.startswith('engine_requests_completed_total{kind="voice"}'))
            assert float(line.split()[-1]) > 0, f"{process.name} answered nothing"


async def _run_serve(env: dict[str, str], cwd: Path) -> tuple[int, str]:
    import asyncio
    import os
    import sys

    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("multimodal-engine")), "serve", cwd=cwd,
        env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, output.decode()


async def test_serve_refuses_to_start_without_broker_or_model(
    settings: Settings, tmp_path: Path
) -> None:
    base = {"SERVICE_PORT": "0", "VOICE_BACKEND": "local", "OUTPUT_DIR": str(tmp_path / "o")}
    code, output = await _run_serve({**base, "KAFKA_BOOTSTRAP_SERVERS": ""}, tmp_path)
    assert code == 2 and "KAFKA_BOOTSTRAP_SERVERS is not set" in output

    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, output = await _run_serve({**base, "FLUX_MODEL_PATH": str(empty),
                                     "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers
                                     or "", "KAFKA_TOPIC_PREFIX": settings.kafka_topic_prefix},
                                    tmp_path)
    assert code == 2
    assert "cannot load the image model" in output and "model_index.json" in output
