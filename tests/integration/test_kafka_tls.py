"""The engine on a broker it can reach only over TLS: Tansu behind Debian's stunnel4, which
advertises the TLS address alone (tests/support/tls_broker.py), with mutual TLS.

- The delivery tests, run as a whole against such a broker (``ENGINE_TEST_KAFKA_SECURITY``).
- Every other client the engine builds: topic creation, ``send``, the control reader and its
  offset lookups (a cancel published before its request applies), the idempotence probe.
- What refuses: a client without TLS, or without a client certificate, or with one from
  another CA; ``serve`` then stops with one line naming the settings to look at.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumers.engine import Engine
from consumers.security import PLAINTEXT, KafkaSecurity, diagnose
from consumers.send import send_and_wait
from consumers.topics import CONTRACT_TOPICS, ensure_topics
from core.settings import Settings, load_settings
from schemas.events import VoiceRequested
from tests.support.kafka_client import PersonaPeer
from tests.support.kafka_security import register
from tests.support.settings import engine_settings
from tests.support.tls_broker import STUNNEL, CertificateSet, TlsBroker

pytestmark = [pytest.mark.kafka,
              pytest.mark.skipif(STUNNEL is None, reason="stunnel4 is not installed "
                                 "(apt-get install stunnel4; .ci/run installs it)")]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    return CertificateSet.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def broker(certificates: CertificateSet) -> Iterator[TlsBroker]:
    instance = TlsBroker(certificates, mutual=True)
    instance.start()
    try:  # the test-side clients of this broker (PersonaPeer) use its TLS settings
        register(instance.bootstrap_servers, instance.client_settings())
        yield instance
    finally:
        instance.stop()


def _security(broker: TlsBroker, client: str = "client", **drop: bool) -> dict[str, str]:
    return {key.lower(): value for key, value in broker.client_settings(client).items()
            if not drop.get(key.lower())}


@pytest.fixture
def tls_settings(tmp_path: Path, broker: TlsBroker, monkeypatch: pytest.MonkeyPatch
                 ) -> Settings:
    monkeypatch.chdir(tmp_path)  # no stray .env
    prefix = f"t{uuid.uuid4().hex[:8]}."
    return engine_settings(tmp_path, broker.bootstrap_servers, prefix, **_security(broker))


def test_the_delivery_tests_pass_over_mutual_tls() -> None:
    """tests/integration/test_delivery.py as it is, in a session whose broker, engines and
    clients all use mutual TLS."""
    env = {**os.environ, "ENGINE_TEST_KAFKA_SECURITY": "mtls", "PYTHONPATH": str(ROOT)}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/integration/test_delivery.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, summary


async def test_every_client_of_the_engine_works_over_mutual_tls(
    tls_settings: Settings, broker: TlsBroker
) -> None:
    settings = tls_settings
    security = KafkaSecurity.from_settings(settings)
    topics = [settings.topic(name) for name in CONTRACT_TOPICS]
    # topic creation (ensure_topics: its admin client and the controller behind metadata)
    assert await ensure_topics(broker.bootstrap_servers, topics, 3, security=security) == topics
    engine = Engine(settings, broker.bootstrap_servers, http_host="127.0.0.1")
    await engine.start()
    try:
        assert engine.addresses is not None
        await engine.health.wait_until(lambda health: health.kafka_connected, timeout=20)
        async with httpx.AsyncClient(timeout=10) as http:
            health = (await http.get(engine.addresses.http_url + "/health")).json()
        assert health["kafka"]["connected"] is True
        assert health["kafka"]["security"] == "SSL"
        # `send` (the CLI's client pair) over TLS, answered by the engine's consumer and
        # producer
        reply = await send_and_wait(
            broker.bootstrap_servers, settings.topic("generation.requested.voice"),
            VoiceRequested(request_id=str(uuid.uuid4()), conversation_id="tls",
                           text="Hello over TLS."),
            "tls", completed_topic=settings.topic("generation.completed"),
            failed_topic=settings.topic("generation.failed"), timeout=60, security=security)
        assert reply is not None and reply.completed, reply
        # the control reader and its lookups: a cancel published right before its request
        # applies (the read barrier's end-offset lookups run on their own TLS client)
        async with PersonaPeer(broker.bootstrap_servers, settings.kafka_topic_prefix) as peer:
            request_id = str(uuid.uuid4())
            await peer.publish("control", {"action": "cancel", "request_id": request_id,
                                           "conversation_id": "tls-cancel"})
            await peer.publish("voice", {"request_id": request_id, "conversation_id":
                                         "tls-cancel", "text": "Never spoken."})
            answer = (await peer.answers_for([request_id], timeout=30))[request_id]
        assert answer.kind == "failed" and answer.event["error_code"] == "CANCELLED"
    finally:
        await engine.stop()


async def test_a_client_without_tls_cannot_use_the_broker(broker: TlsBroker) -> None:
    # its TLS address refuses the Kafka handshake, and says which setting to look at
    why = await diagnose(broker.bootstrap_servers, PLAINTEXT, timeout=5)
    assert why is not None and "KAFKA_SECURITY_PROTOCOL" in why
    # Tansu's own plaintext port answers, but names only the TLS address: nothing can be
    # produced through it
    producer = AIOKafkaProducer(bootstrap_servers=broker.plaintext_servers,
                                request_timeout_ms=3000, metadata_max_age_ms=3000)
    await producer.start()
    try:
        with pytest.raises((KafkaError, asyncio.TimeoutError)):
            async with asyncio.timeout(10):
                await producer.send_and_wait(f"t{uuid.uuid4().hex[:8]}.x", b"plain")
    finally:
        await producer.stop()


@pytest.mark.parametrize("client", ["none", "stranger"])
async def test_mutual_tls_refuses_a_client_without_our_certificate(
    broker: TlsBroker, client: str
) -> None:
    settings = load_settings(**(_security(broker, kafka_ssl_cert_file=True,
                                          kafka_ssl_key_file=True) if client == "none"
                                else _security(broker, client)))
    why = await diagnose(broker.bootstrap_servers, KafkaSecurity.from_settings(settings),
                         timeout=5)
    assert why is not None and "KAFKA_SSL_CERT_FILE" in why
    assert await diagnose(broker.bootstrap_servers, KafkaSecurity.from_settings(
        load_settings(**_security(broker)))) is None


def test_serve_without_its_client_certificate_stops_with_one_line_naming_it(
    broker: TlsBroker, dev_model_dir: Path, tmp_path: Path
) -> None:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("KAFKA_", "SERVICE_", "API_KEYS"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
               KAFKA_SECURITY_PROTOCOL="SSL",
               KAFKA_SSL_CA_FILE=str(broker.certificates.ca),
               KAFKA_TOPIC_PREFIX=f"t{uuid.uuid4().hex[:8]}.", FLUX_MODEL_PATH=str(dev_model_dir),
               SERVICE_PORT="0", OUTPUT_DIR=str(tmp_path / "outputs"), PYTHONPATH=str(ROOT),
               VOICE_BACKEND="local")
    script = str(Path(sys.executable).with_name("multimodal-engine"))
    done = subprocess.run([script, "serve"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("multimodal-engine: cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS=")
    assert "KAFKA_SSL_CERT_FILE" in last and "KAFKA_SECURITY_PROTOCOL" in last
