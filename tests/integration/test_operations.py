"""Operations end to end: a live engine's /metrics checked by the real `promtool`, scraped by
a real Prometheus, trace context carried from requests to events and to ElevenLabs, and a
`dev` run with LOG_FORMAT=json."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from consumers.engine import Engine
from consumers.serve import DEV_LORA_ID
from core.settings import Settings
from core.telemetry import TraceContext
from tests.support.dev_engine import dev_engine
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer
from tests.support.engine_process import LINE_LIMIT, EngineProcess
from tests.support.kafka_client import Answer, PersonaPeer
from tests.support.kafka_security import security_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
TRACE_HEADERS = [("traceparent", PARENT.encode()), ("tracestate", b"persona=chat-7")]


def tool(name: str, variable: str) -> str | None:
    return os.environ.get(variable) or shutil.which(name)


needs_promtool = pytest.mark.skipif(
    tool("promtool", "PROMTOOL") is None,
    reason="no promtool: Debian's `prometheus` package ships it (.ci/run installs it)")
needs_prometheus = pytest.mark.skipif(
    tool("prometheus", "PROMETHEUS") is None,
    reason="no prometheus binary: Debian's `prometheus` package ships it (.ci/run installs it)")


@pytest.fixture
async def full_engine(settings: Settings, dev_model_dir: Path, tmp_path: Path,
                      upstream: ElevenLabsServer) -> AsyncIterator[Engine]:
    """Images on the tiny model (with the development LoRA) and voice on ElevenLabs."""
    async with dev_engine(settings, dev_model_dir, tmp_path, progress_interval=0.0,
                          voice_backend="elevenlabs",
                          elevenlabs_api_key=SecretStr(DEFAULT_KEY),
                          elevenlabs_api_url=upstream.api_url) as engine:
        yield engine


def traced(answers: list[Answer]) -> list[TraceContext | None]:
    def read(answer: Answer) -> TraceContext | None:
        value = answer.headers.get("traceparent")
        state = answer.headers.get("tracestate")
        return TraceContext.parse(value.decode() if value else None,
                                  state.decode() if state else None)
    return [read(answer) for answer in answers]


async def scrape(engine: Engine) -> str:
    assert engine.addresses is not None
    async with aiohttp.ClientSession() as session, \
            session.get(engine.addresses.http_url + "/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_trace_context_metrics_and_promtool_on_a_live_engine(
        full_engine: Engine, peer: PersonaPeer, upstream: ElevenLabsServer) -> None:
    image = {"request_id": str(uuid.uuid4()), "conversation_id": "ops-1",
             "prompt": "sarah in a cafe", "character_lora_id": DEV_LORA_ID, "width": 64,
             "height": 64, "num_inference_steps": 3, "optimize_prompt": False}
    voice = {"request_id": str(uuid.uuid4()), "conversation_id": "ops-2",
             "text": "Hello there!", "inject_emotion": False}
    invalid = {"request_id": str(uuid.uuid4()), "conversation_id": "ops-3", "text": ""}
    untraced = {"request_id": str(uuid.uuid4()), "conversation_id": "ops-4", "text": "Hi."}
    await peer.publish("image", image, headers=TRACE_HEADERS)
    await peer.publish("voice", voice, headers=TRACE_HEADERS)
    await peer.publish("voice", invalid, headers=TRACE_HEADERS)
    await peer.publish("voice", untraced, headers=[("traceparent", b"00-not-a-trace")])
    ids = [r["request_id"] for r in (image, voice, invalid, untraced)]
    finals = await peer.answers_for(ids, timeout=90)
    assert [finals[i].kind for i in ids] == ["completed", "completed", "failed", "completed"]

    # the same trace on every event of a traced request, each with a span id of its own
    progress = [a for a in peer.answers if a.kind == "progress"
                and a.event["request_id"] == image["request_id"]]
    assert progress, "no progress events (PROGRESS_INTERVAL=0)"
    events = [*progress, finals[image["request_id"]], finals[voice["request_id"]],
              finals[invalid["request_id"]]]
    contexts = traced(events)
    assert all(c is not None and c.trace_id == TRACE_ID for c in contexts), contexts
    spans = [c.span_id for c in contexts if c is not None]
    assert "00f067aa0ba902b7" not in spans and len(set(spans)) == len(spans)
    assert all(c is not None and c.state == "persona=chat-7" for c in contexts)
    assert traced([finals[untraced["request_id"]]]) == [None]  # malformed: no trace

    # ... and on the ElevenLabs call made for the voice request
    speech = [r for r in upstream.received if r.path.startswith("/v1/text-to-speech")]
    sent = {TraceContext.parse(r.traceparent) for r in speech}
    assert None in sent  # the untraced request's call carries none
    called = [c for c in sent if c is not None]
    assert len(called) == 1 and called[0].trace_id == TRACE_ID
    assert called[0].span_id not in spans + ["00f067aa0ba902b7"]

    # /metrics: queue wait and work time per kind, upstream latency, LoRA loads, build info
    text = await scrape(full_engine)
    for kind in ("image", "voice"):
        assert re.search(rf'engine_queue_wait_seconds_count{{kind="{kind}",priority="'
                         rf'interactive"}} [1-9]', text), kind
        assert re.search(rf'engine_processing_seconds_count{{kind="{kind}"}} [1-9]', text), kind
        assert re.search(rf'engine_request_duration_seconds_count{{kind="{kind}"}} [1-9]',
                         text), kind
    assert re.search(r'engine_upstream_request_seconds_count{outcome="2xx",'
                     r'upstream="elevenlabs"} [1-9]', text)
    assert re.search(r"engine_lora_load_seconds_count [1-9]", text)
    assert re.search(r'engine_build_info{development_model="true",device="cpu",'
                     r'model="flux-tiny-dev",version="[^"]+"} 1.0', text), text[-2000:]
    assert "engine_gpu_memory_allocated_bytes{" not in text  # no CUDA here: no series
    if tool("promtool", "PROMTOOL") is not None:
        checked = await asyncio.to_thread(
            subprocess.run, [str(tool("promtool", "PROMTOOL")), "check", "metrics"],
            input=text, capture_output=True, text=True, timeout=30, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout + checked.stderr == ""  # not even a lint warning
    else:
        pytest.skip("no promtool (Debian's `prometheus` package): the metrics were read, "
                    "`promtool check metrics` did not run")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@needs_prometheus
async def test_a_real_prometheus_scrapes_the_engine(engine: Engine, peer: PersonaPeer,
                                                    tmp_path: Path) -> None:
    requests = [{"request_id": str(uuid.uuid4()), "conversation_id": f"p-{i}",
                 "text": f"Line {i}."} for i in range(3)]
    for request in requests:
        await peer.publish("voice", request)
    await peer.answers_for([r["request_id"] for r in requests], timeout=60)

    assert engine.addresses is not None
    target = engine.addresses.http_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: multimodal-engine\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(tool("prometheus", "PROMETHEUS")), f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        query = 'sum(engine_requests_completed_total{job="multimodal-engine",kind="voice"})'
        deadline = time.monotonic() + 60
        value = None
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline and process.returncode is None:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/api/v1/query",
                                           params={"query": query}) as response:
                        # 503 "Service Unavailable" (text) until its storage is ready
                        body = await response.json() if response.status == 200 else None
                    result = body["data"]["result"] if body is not None else []
                    if result:
                        value = float(result[0]["value"][1])
                        if value >= len(requests):
                            break
                except aiohttp.ClientConnectionError:
                    pass  # not listening yet
                await asyncio.sleep(0.2)  # polling the API with a deadline
        assert value == len(requests), f"Prometheus read {value} (exited: {process.returncode})"
    finally:
        if process.returncode is None:
            process.terminate()
        stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr[1].decode()[-2000:]


class DevProcess(EngineProcess):
    """`multimodal-engine dev`; ready when its banner (a JSON log record here) is out."""

    async def start(self, timeout: float = 60.0) -> str:
        script = Path(sys.executable).with_name("multimodal-engine")
        self._proc = await asyncio.create_subprocess_exec(
            str(script), "dev", cwd=self.cwd, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            limit=LINE_LIMIT)
        self._reader = asyncio.create_task(self._read())
        line = await self.wait_for_line(lambda text: "dev is up" in text, timeout)
        match = re.search(r"http +(http://\S+)", json.loads(line)["message"])
        assert match is not None, line
        self.http_url = match.group(1)
        return self.http_url


async def test_dev_with_json_logs_writes_only_json_lines(
        settings: Settings, dev_model_dir: Path, tmp_path: Path, peer: PersonaPeer) -> None:
    env = {
        "LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG",
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
        **security_env(settings.kafka_bootstrap_servers or ""),
        "KAFKA_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "KAFKA_GROUP_ID": settings.kafka_group_id, "SERVICE_PORT": "0",
        "KAFKA_SESSION_TIMEOUT_MS": "3000", "KAFKA_HEARTBEAT_INTERVAL_MS": "300",
        "OUTPUT_DIR": str(tmp_path / "outputs"), "LORA_OUTPUT_DIR": str(tmp_path / "loras"),
        "FLUX_MODEL_PATH": str(dev_model_dir), "VOICE_BACKEND": "local",
        "PYTHONWARNINGS": "default",
    }
    dev = DevProcess(env, Path(tempfile.mkdtemp(dir=tmp_path)), "dev")
    try:
        await dev.start()
        request = {"request_id": str(uuid.uuid4()), "conversation_id": "json-logs",
                   "text": "Logged as JSON."}
        bad = {"request_id": str(uuid.uuid4()), "conversation_id": "json-logs", "text": ""}
        await peer.publish("voice", request)
        await peer.publish("voice", bad)
        await peer.answers_for([request["request_id"], bad["request_id"]], timeout=60)
        dev.send_signal(signal.SIGTERM)
        assert await dev.wait(30) == 0
    finally:
        await dev.stop()

    records = []
    for line in dev.lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    mine = [r for r in records if r.get("request_id") == request["request_id"]]
    assert mine, "no line of the request carries its request_id"
    assert any("completed" in r["message"] for r in mine)
    for record in mine:
        assert record["conversation_id"] == "json-logs"
        assert record["topic"] == f"{settings.kafka_topic_prefix}generation.requested.voice"
        assert isinstance(record["partition"], int) and isinstance(record["offset"], int)
        assert record["kind"] == "voice"
    rejected = [r for r in records if r.get("request_id") == bad["request_id"]]
    assert any(r.get("error_code") == "INVALID_REQUEST" for r in rejected), rejected
    # every line of the engine's own that names a request in its text carries it as a
    # field too (aiokafka's sender task logs outside the request's work)
    for record in records:
        if not record["logger"].startswith(("consumers.", "core.", "http_files.")):
            continue
        for rid in (request["request_id"], bad["request_id"]):
            if rid in record["message"]:
                assert record.get("request_id") == rid, record
