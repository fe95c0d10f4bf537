"""How `multimodal-engine dev` and `serve` start and stop as real processes: the embedded
broker dies with `dev` however `dev` ends (SIGKILL, SIGHUP), a start-up failure is one
line and exit 2, and a second stop signal ends the shutdown grace at once."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from tests.support.engine_process import EngineProcess
from tests.support.kafka_client import PersonaPeer

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

_BROKER_READY = re.compile(r"tansu broker ready on (\S+) \(pid (\d+)\)")


def _environment(cwd: Path, dev_model_dir: Path, **env: str) -> dict[str, str]:
    """No engine setting from the test's environment (dev's own broker, not the
    session's), the development model already built, and ``env``."""
    base = {key: value for key, value in os.environ.items()
            if key.lower() not in Settings.model_fields}
    return {**base, "MULTIMODAL_ENGINE_STATE": str(cwd / "dev.json"), "SERVICE_PORT": "0",
            "DEV_MODEL_DIR": str(dev_model_dir), "LOG_LEVEL": "INFO",
            "VOICE_BACKEND": "local", **env}


@pytest.fixture
async def dev(tmp_path: Path, dev_model_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[EngineProcess] = []

    async def make(**env: str) -> EngineProcess:
        process = EngineProcess(_environment(tmp_path, dev_model_dir, **env), tmp_path, "dev",
                                command="dev")
        started.append(process)
        await process.launch()
        return process

    yield make
    for process in started:
        await process.stop()


async def _broker_of(process: EngineProcess) -> tuple[str, int]:
    """The embedded broker's address and a pidfd of it, open while it surely runs (a pid
    alone could be reused once it is gone)."""
    line = await process.wait_for_line(lambda text: _BROKER_READY.search(text) is not None,
                                       timeout=60)
    match = _BROKER_READY.search(line)
    assert match is not None
    return match.group(1), os.pidfd_open(int(match.group(2)))


async def _gone(pidfd: int, timeout: float) -> bool:
    """Whether the process of ``pidfd`` ends within ``timeout`` s (a pidfd turns readable
    when its process exits)."""
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()
    loop.add_reader(pidfd, ended.set)
    try:
        await asyncio.wait_for(ended.wait(), timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def test_sigkill_of_dev_takes_the_embedded_broker_with_it(dev: Any) -> None:
    process = await dev()
    _, broker = await _broker_of(process)
    await process.wait_for_line(lambda line: "dev is up" in line, timeout=90)
    process.send_signal(signal.SIGKILL)
    assert await process.wait() == -signal.SIGKILL
    assert await _gone(broker, timeout=10), "the embedded broker outlived a SIGKILLed dev"


async def test_sighup_stops_dev_cleanly_with_its_broker(dev: Any) -> None:
    process = await dev()
    _, broker = await _broker_of(process)
    await process.wait_for_line(lambda line: "dev is up" in line, timeout=90)
    process.send_signal(signal.SIGHUP)  # the terminal running `make run` closed
    assert await process.wait(timeout=30) == 0
    assert await _gone(broker, timeout=5)
    assert not any("Traceback" in line for line in process.lines)


async def test_sigint_during_start_up_is_one_line_and_exit_130(dev: Any) -> None:
    process = await dev()
    _, broker = await _broker_of(process)  # started; the model and the engine follow
    process.send_signal(signal.SIGINT)
    assert await process.wait(timeout=60) == 130
    assert process.lines[-1] == "multimodal-engine: interrupted during start-up"
    assert not any("Traceback" in line for line in process.lines)
    assert await _gone(broker, timeout=5)


async def test_service_port_in_use_is_one_line_and_exit_2(dev: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await dev(SERVICE_PORT=str(port))
        _, broker = await _broker_of(process)
        assert await process.wait(timeout=90) == 2
    assert process.lines[-1] == (f"multimodal-engine: SERVICE_PORT={port}: address already "
                                 "in use (on 127.0.0.1)")
    assert not any("Traceback" in line for line in process.lines)
    assert await _gone(broker, timeout=5)


async def test_unusable_output_dir_is_one_line_and_exit_2(tmp_path: Path,
                                                          dev_model_dir: Path) -> None:
    (tmp_path / "file").write_text("a file where a folder must be")
    process = EngineProcess(_environment(
        tmp_path, dev_model_dir, OUTPUT_DIR=str(tmp_path / "file" / "out"),
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9", FLUX_MODEL_PATH=str(dev_model_dir)),
        tmp_path, "serve")
    await process.launch()
    try:
        assert await process.wait(timeout=60) == 2
    finally:
        await process.stop()
    assert process.lines[-1] == (f"multimodal-engine: OUTPUT_DIR={tmp_path}/file/out: "
                                 "not a directory")


async def test_second_signal_ends_the_grace_at_once(dev: Any) -> None:
    # a render far longer than the wait below, and a grace longer still: without the
    # second signal the stop would wait for the render
    process = await dev(SHUTDOWN_GRACE_SECONDS="600", MAX_INFERENCE_STEPS="1000",
                        PROGRESS_INTERVAL="0")
    bootstrap, broker = await _broker_of(process)
    await process.wait_for_line(lambda line: "dev is up" in line, timeout=90)
    request_id = str(uuid.uuid4())
    async with PersonaPeer(bootstrap, "") as peer:  # gone before the broker is
        await peer.publish("image", {
            "request_id": request_id, "conversation_id": "long", "prompt": "a long one",
            "width": 1024, "height": 1024, "num_inference_steps": 1000})
        await peer.wait_for(lambda a: a.kind == "progress"
                            and a.event["request_id"] == request_id, timeout=60)
    process.send_signal(signal.SIGTERM)
    await process.wait_for_line(lambda line: "finishing 1 request(s)" in line, timeout=30)
    process.send_signal(signal.SIGINT)
    assert await process.wait(timeout=20) == 0
    assert any("stopping now, without waiting" in line for line in process.lines)
    assert await _gone(broker, timeout=5)
