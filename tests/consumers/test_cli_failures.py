"""What ``send`` and ``dev`` say when they cannot do their work, run as the real command: one
line and exit 1 for ``send`` (no broker, an unreachable one, one gone while the answer is
awaited), and the variables a ``.env`` file set named in a start-up error they caused."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from consumers.broker import launch_broker
from consumers.topics import CONTRACT_TOPICS
from core.settings import Settings

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
COMMAND = str(Path(sys.executable).with_name("multimodal-engine"))


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def said(self) -> list[str]:
        return self.err.splitlines()


def _environment(cwd: Path, **env: str) -> dict[str, str]:
    """The test's environment without any engine setting (a ``.env`` in ``cwd`` is then
    what configures the command), no running ``dev`` to find, and ``env``."""
    return {**{key: value for key, value in os.environ.items()
               if key.lower() not in Settings.model_fields},
            "MULTIMODAL_ENGINE_STATE": str(cwd / "no-dev.json"), "PYTHONPATH": str(REPO),
            **env}


async def _start(cwd: Path, *args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        COMMAND, *args, cwd=cwd, env=_environment(cwd, **env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _ended(process: asyncio.subprocess.Process) -> Ran:
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def _run(cwd: Path, *args: str, **env: str) -> Ran:
    return await _ended(await _start(cwd, *args, **env))


def _closed_port() -> str:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def _first_record(bootstrap: str, topic: str) -> None:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        await asyncio.wait_for(consumer.getone(), 60)
    finally:
        await consumer.stop()


async def test_a_broker_gone_while_send_waits_is_one_line_and_exit_1(tmp_path: Path) -> None:
    broker = launch_broker("tansu")  # our own: this test takes it down
    broker.start()
    try:
        prefix = f"t{uuid.uuid4().hex[:6]}."
        broker.create_topics([prefix + t for t in CONTRACT_TOPICS], 1)
        bootstrap = broker.bootstrap_servers
        request_id = str(uuid.uuid4())
        process = await _start(tmp_path, "send", "voice", "Hello there.", "--request-id",
                               request_id, "--timeout", "8", KAFKA_BOOTSTRAP_SERVERS=bootstrap,
                               KAFKA_TOPIC_PREFIX=prefix)
        # the request is published: send now waits for its answer, which never comes
        await _first_record(bootstrap, f"{prefix}generation.requested.voice")
        broker.stop()
        ran = await _ended(process)
    finally:
        broker.stop()

    assert ran.code == 1 and ran.out == ""
    assert len(ran.said) == 1, ran.err[-3000:]  # no aiokafka retry lines, no traceback
    (said,) = ran.said
    assert said.startswith(f"multimodal-engine: no answer to request {request_id} within "
                           f"8s: cannot reach Kafka at {bootstrap}: "), said


async def test_send_without_a_running_dev_exits_1(tmp_path: Path) -> None:
    ran = await _run(tmp_path, "send", "voice", "Hello there.")

    assert ran.code == 1 and ran.out == ""
    (said,) = ran.said
    assert said.startswith("multimodal-engine: no broker: start `multimodal-engine dev`")


async def test_send_to_an_unreachable_broker_exits_1(tmp_path: Path) -> None:
    closed = _closed_port()
    (tmp_path / ".env").write_text(f"KAFKA_BOOTSTRAP_SERVERS={_closed_port()}\n")

    ran = await _run(tmp_path, "send", "voice", "Hello there.",
                     KAFKA_BOOTSTRAP_SERVERS=closed)

    assert ran.code == 1 and ran.out == ""
    (said,) = ran.said
    assert said.startswith(f"multimodal-engine: cannot reach Kafka at {closed}: "), said
    assert ".env" not in said  # the environment's broker: the .env file's is not used


async def test_send_names_the_broker_a_dotenv_file_set(tmp_path: Path) -> None:
    closed = _closed_port()
    (tmp_path / ".env").write_text(f"KAFKA_BOOTSTRAP_SERVERS={closed}\n")

    ran = await _run(tmp_path, "send", "voice", "Hello there.")

    assert ran.code == 1
    (said,) = ran.said
    assert said.startswith(f"multimodal-engine: cannot reach Kafka at {closed}: ")
    assert said.endswith(f" (KAFKA_BOOTSTRAP_SERVERS from {tmp_path / '.env'})"), said


async def test_dev_names_the_model_path_a_dotenv_file_set(tmp_path: Path) -> None:
    # what `cp .env.example .env` (made for docker compose) leaves for `make run`
    model = tmp_path / "app" / "models" / "FLUX.1-dev"
    (tmp_path / ".env").write_text(f"FLUX_MODEL_PATH={model}\nDEVICE=auto\n")

    ran = await _run(tmp_path, "dev", SERVICE_PORT="0")

    assert ran.code == 2
    said = ran.said[-1]
    assert said.startswith(f"multimodal-engine: cannot load the image model: image model at "
                           f"{model} is incomplete"), said
    assert said.endswith(f" (FLUX_MODEL_PATH from {tmp_path / '.env'})"), said
