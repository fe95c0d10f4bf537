"""SIGTERM while the broker is gone: the engine still ends, within its grace period plus a
few seconds, instead of waiting for ever on publishes, commits and leaving the group (and
being killed by the orchestrator)."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from consumers.broker import launch_broker
from consumers.topics import CONTRACT_TOPICS
from tests.support.engine_process import EngineProcess
from tests.support.kafka_client import PersonaPeer

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

GRACE = 3.0
MARGIN = 10.0  # consumers/engine.py _STOP_MARGIN


async def test_sigterm_during_a_broker_outage_ends_in_bounded_time(
    tmp_path: Path, dev_model_dir: Path
) -> None:
    broker = launch_broker("tansu")  # our own: this test takes it down
    broker.start()
    prefix = f"t{uuid.uuid4().hex[:6]}."
    engine: EngineProcess | None = None
    try:
        broker.create_topics([prefix + t for t in CONTRACT_TOPICS], 3)
        engine = EngineProcess({
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "KAFKA_TOPIC_PREFIX": prefix, "KAFKA_GROUP_ID": f"{prefix}group",
            "KAFKA_SESSION_TIMEOUT_MS": "3000", "KAFKA_HEARTBEAT_INTERVAL_MS": "300",
            "SERVICE_PORT": "0", "OUTPUT_DIR": str(tmp_path / "outputs"),
            "VOICE_BACKEND": "local", "LOG_LEVEL": "INFO", "PROGRESS_INTERVAL": "0",
            "SHUTDOWN_GRACE_SECONDS": str(GRACE), "FLUX_MODEL_PATH": str(dev_model_dir),
            "LORA_OUTPUT_DIR": str(tmp_path / "loras"),
        }, tmp_path, "engine")
        await engine.start(timeout=60)
        async with PersonaPeer(broker.bootstrap_servers, prefix) as peer:
            # a long image (its progress events need the broker) and a backlog behind it
            for i in range(6):
                await peer.publish("image", {
                    "request_id": str(uuid.uuid4()), "conversation_id": f"c{i % 2}",
                    "prompt": "a portrait", "width": 1024, "height": 1024,
                    "num_inference_steps": 30, "optimize_prompt": False})
            await peer.wait_for(lambda a: a.kind == "progress", timeout=60)
        seen = len(engine.lines)
        broker.stop()  # the broker is gone, and the engine notices (a publish fails)
        await engine.wait_for_line(lambda line: "failed (attempt" in line
                                   or "unreachable" in line, timeout=30, after=seen)
        started = time.monotonic()
        engine.send_signal(signal.SIGTERM)
        code = await engine.wait(timeout=GRACE + MARGIN + 30)
        elapsed = time.monotonic() - started
        assert code == 0, "\n".join(engine.lines[-30:])
        assert elapsed < GRACE + MARGIN + 5, (elapsed, "\n".join(engine.lines[-30:]))
    finally:
        if engine is not None:
            await engine.stop()
        broker.stop()
