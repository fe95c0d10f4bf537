"""`multimodal-engine send` against an engine with a Schema Registry (SCHEMA_REGISTRY_URL), on
the real broker and the local registry: the answer, in the registry's wire format, is read
with the writer schema the registry serves; while the registry is out of reach the command
says so instead of waiting in silence."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from tests.integration.conftest import running_engine
from tests.support.kafka_security import security_env
from tests.support.schema_registry import SchemaRegistryServer, running_registry
from tests.support.settings import engine_settings

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
USER_INFO = "engine:registry-secret-42"


@dataclass(frozen=True)
class Sent:
    code: int
    out: str
    err: str


@dataclass
class Registered:
    """A running engine that uses ``server`` as its Schema Registry."""

    settings: Settings
    server: SchemaRegistryServer

    async def send(self, *args: str) -> Sent:
        """``multimodal-engine send ARGS`` as a process, configured by its environment as
        the engine is (broker, topic prefix, registry and its credentials)."""
        bootstrap = self.settings.kafka_bootstrap_servers
        assert bootstrap is not None and self.server.url is not None
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("KAFKA_", "SERVICE_", "API_KEYS", "SCHEMA_REGISTRY_"))}
        env.update(security_env(bootstrap), KAFKA_BOOTSTRAP_SERVERS=bootstrap,
                   KAFKA_TOPIC_PREFIX=self.settings.kafka_topic_prefix,
                   SCHEMA_REGISTRY_URL=self.server.url, SCHEMA_REGISTRY_USER_INFO=USER_INFO,
                   PYTHONPATH=str(REPO))
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("multimodal-engine")), "send", *args,
            cwd=Path.cwd(), env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 90)
        assert process.returncode is not None
        return Sent(process.returncode, out.decode(), err.decode())

    def schema_reads(self) -> list[tuple[str, str]]:
        return [r for r in self.server.requests if r[1].startswith("/schemas/ids/")]


@pytest.fixture
async def registered(tmp_path: Path, broker_bootstrap: str, topic_prefix: str,
                     make_topics: Any, monkeypatch: pytest.MonkeyPatch
                     ) -> AsyncIterator[Registered]:
    monkeypatch.chdir(tmp_path)
    await make_topics(partitions=1)
    server = SchemaRegistryServer(user_info=USER_INFO)
    with running_registry(server) as url:
        settings = engine_settings(tmp_path, broker_bootstrap, topic_prefix,
                                   schema_registry_url=url,
                                   schema_registry_user_info=USER_INFO)
        async with running_engine(settings):
            yield Registered(settings, server)


async def test_send_reads_the_answer_in_the_registry_wire_format(
    registered: Registered,
) -> None:
    request_id = str(uuid.uuid4())
    sent = await registered.send("voice", "Hello there.", "--conversation-id", "c-1",
                                 "--request-id", request_id, "--timeout", "30")
    assert sent.code == 0, sent.err
    answer = json.loads(sent.out)
    assert answer["request_id"] == request_id and answer["url"].endswith(".mp3")
    assert registered.schema_reads()  # its writer schema came from the registry, by id
    assert USER_INFO.split(":")[1] not in sent.out + sent.err


async def test_send_says_when_the_registry_is_out_of_reach(registered: Registered) -> None:
    registered.server.unavailable = True  # the engine answers with the ids it registered
    request_id = str(uuid.uuid4())
    sent = await registered.send("voice", "Hello there.", "--conversation-id", "c-2",
                                 "--request-id", request_id, "--timeout", "5")
    assert sent.code == 1 and sent.out == ""
    (said,) = [line for line in sent.err.splitlines() if line.startswith("multimodal-engine:")]
    assert said.startswith(f"multimodal-engine: cannot read the answer to request "
                           f"{request_id}: the Schema Registry at {registered.server.url} "
                           "answered 503")
