"""The compose Prometheus against a real engine HTTP app, with and without API_KEYS: the
scrape job of deploy/prometheus.yml as it is, the key file as Compose resolves it from
`.env` (the `metrics_scrape_key` config), and a real `prometheus` binary scraping."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.scheduling import build_scheduling
from core.settings import load_settings
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from http_files import AppServices, create_app
from http_files.auth import access_policy
from schemas.codec import EventCodec
from tests.deploy.test_deploy_files import (
    REPO,
    active_env,
    make_project,
    prometheus_etc,
    run_compose,
)
from tests.integration.test_operations import free_port, tool

KEY = "compose-scrape-key-0123456789abcdef"
JOB = "multimodal-engine"

pytestmark = pytest.mark.skipif(
    tool("prometheus", "PROMETHEUS") is None,
    reason="no prometheus binary: Debian's `prometheus` package ships it (.ci/run installs it)")


def compose_key_file(tmp_path: Path, env_lines: str) -> tuple[str, str]:
    """(what Compose writes into the Prometheus container, where) for .env.example plus
    ``env_lines``."""
    env_text = (REPO / ".env.example").read_text() + env_lines
    root = make_project(tmp_path / "project", env_text)
    result = run_compose(root, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    (mount,) = (c for c in document["services"]["prometheus"]["configs"]
                if c["source"] == "metrics_scrape_key")
    return document["configs"]["metrics_scrape_key"]["content"], mount["target"]


@pytest.fixture
async def engine_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A real engine HTTP app on a port; ``request.param``: its API_KEYS (None: unset)."""
    env = active_env(REPO / ".env.example")
    settings = load_settings(_env_file=None, api_keys=request.param,
                             metrics_require_key=env["METRICS_REQUIRE_KEY"])
    metrics = EngineMetrics(CollectorRegistry())
    store = OutputStore(tmp_path / "outputs")
    services = AppServices(
        health=EngineHealth(voice_backend="local"), metrics=metrics, store=store,
        codec=EventCodec(),
        voice=VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store,
                           settings.default_voice_id),
        scheduling=build_scheduling(settings, metrics))
    runner = web.AppRunner(create_app(services, access=access_policy(settings)))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def scrape_health(config: Path, data: Path, timeout: float = 60) -> dict[str, Any]:
    """The engine target of a real Prometheus running ``config``, once it was scraped."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(tool("prometheus", "PROMETHEUS")), f"--config.file={config}",
        f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    target: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline and process.returncode is None:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/api/v1/targets") as answer:
                        body = await answer.json() if answer.status == 200 else None
                except aiohttp.ClientConnectionError:
                    body = None  # not listening yet
                active = body["data"]["activeTargets"] if body else []
                target = next((t for t in active if t["labels"]["job"] == JOB), {})
                if target.get("health") in ("up", "down"):
                    return target
                await asyncio.sleep(0.2)  # polling the API with a deadline
    finally:
        if process.returncode is None:
            process.terminate()
        stderr = await asyncio.wait_for(process.communicate(), 30)
    raise AssertionError(f"no scrape of {JOB} (last: {target}): {stderr[1].decode()[-2000:]}")


def prometheus_config(tmp_path: Path, target: str, key_file: tuple[str, str]) -> Path:
    """deploy/prometheus.yml in /etc/prometheus's layout, the key file where the compose
    config puts it; only the engine job's target and the interval are changed."""
    content, container_path = key_file
    config = prometheus_etc(tmp_path / "etc")
    document = yaml.safe_load(config.read_text())
    (job,) = (j for j in document["scrape_configs"] if j["job_name"] == JOB)
    credentials = job["authorization"]["credentials_file"]
    assert (Path("/etc/prometheus") / credentials).as_posix() == container_path
    (config.parent / credentials).write_text(content)
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    document["scrape_configs"] = [job]
    config.write_text(yaml.safe_dump(document))
    return config


@pytest.mark.parametrize(
    ("engine_app", "env_lines", "health"),
    [(KEY, f"API_KEYS={KEY}\nMETRICS_SCRAPE_KEY={KEY}\n", "up"),
     (None, "", "up"),
     # the check can fail: API_KEYS without METRICS_SCRAPE_KEY is a 401
     (KEY, f"API_KEYS={KEY}\n", "down")],
    ids=["api-keys", "open", "api-keys-without-scrape-key"], indirect=["engine_app"])
async def test_compose_prometheus_scrapes_the_engine(
        engine_app: str, env_lines: str, health: str, tmp_path: Path) -> None:
    config = prometheus_config(tmp_path, engine_app, compose_key_file(tmp_path, env_lines))
    target = await scrape_health(config, tmp_path / "data")
    assert target["health"] == health, target["lastError"]
    if health == "down":
        assert "401" in target["lastError"], target["lastError"]
