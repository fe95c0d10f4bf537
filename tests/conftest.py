"""Fixtures every test may use: a Kafka-protocol broker and topics of its own.

- ``broker_bootstrap`` (session): ``host:port`` of the broker. ``KAFKA_BOOTSTRAP_SERVERS``
  when set; otherwise an embedded broker (``EMBEDDED_BROKER``, default ``tansu``) started
  on first use, once per session, and stopped at its end. With
  ``ENGINE_TEST_KAFKA_SECURITY=tls`` (or ``mtls``) that broker is reachable only over TLS
  (mutual TLS); engine settings, clients and engine processes made for it by
  tests/support use its TLS settings (tests/support/kafka_security.py).
- ``topic_prefix``: unique per test (``t1a2b3c4d.``), so no two tests share a topic.
- ``make_topics``: ``await make_topics(partitions=3)`` creates the seven contract topics
  under ``topic_prefix`` and returns ``{contract name: real name}``.
- ``s3_store``: a location (``STORAGE_URL``, ``STORAGE_ENDPOINT_URL``) of its own on the
  session's S3-protocol server (moto, on 127.0.0.1), with its credentials in the
  environment.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from consumers.broker import EmbeddedBroker, launch_broker
from consumers.topics import CONTRACT_TOPICS, ensure_topics
from tests.support.kafka_security import SESSION_SECURITY, register, security_for
from tests.support.s3_server import CREDENTIALS, S3Server, StoreLocation

MakeTopics = Callable[..., Awaitable[dict[str, str]]]


@pytest.fixture(scope="session")
def _embedded_broker(tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[EmbeddedBroker | None]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip():
        yield None
        return
    if SESSION_SECURITY:
        yield from _tls_broker(tmp_path_factory.mktemp("kafka-tls"))
        return
    broker = launch_broker(os.environ.get("EMBEDDED_BROKER", "tansu"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _tls_broker(folder: Path) -> Iterator[EmbeddedBroker]:
    """``ENGINE_TEST_KAFKA_SECURITY=tls|mtls``: the session's broker only over TLS (mutual
    TLS too with ``mtls``), its settings registered for everything the tests build."""
    from tests.support.tls_broker import CertificateSet, TlsBroker

    if SESSION_SECURITY not in ("tls", "mtls"):
        raise pytest.UsageError(
            f"ENGINE_TEST_KAFKA_SECURITY={SESSION_SECURITY!r}: allowed are tls and mtls")
    broker = TlsBroker(CertificateSet.make(folder), mutual=SESSION_SECURITY == "mtls")
    broker.start()
    try:
        register(broker.bootstrap_servers, broker.client_settings())
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def broker_bootstrap(_embedded_broker: EmbeddedBroker | None) -> str:
    """Bootstrap servers of the session's broker (external or embedded)."""
    if _embedded_broker is None:
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"].strip()
    return _embedded_broker.bootstrap_servers


@pytest.fixture
def topic_prefix() -> str:
    """A topic-name prefix no other test uses, such as ``t1a2b3c4d.``."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def make_topics(
    _embedded_broker: EmbeddedBroker | None, broker_bootstrap: str, topic_prefix: str
) -> MakeTopics:
    """``await make_topics(partitions=3, names=CONTRACT_TOPICS)``: create ``names`` under
    ``topic_prefix`` on the session's broker and return ``{name: prefixed name}``.

    On the embedded broker a refusal raises ``BrokerError``; on an external one creation is
    best effort (``ensure_topics``: existing topics are used, a refusal is a warning).
    """

    async def make(partitions: int = 3, names: Sequence[str] = CONTRACT_TOPICS) -> dict[str, str]:
        topics = {name: f"{topic_prefix}{name}" for name in names}
        if _embedded_broker is None:
            await ensure_topics(broker_bootstrap, list(topics.values()), partitions,
                                security=security_for(broker_bootstrap))
        else:
            await asyncio.to_thread(
                _embedded_broker.create_topics, list(topics.values()), partitions
            )
        return topics

    return make


@pytest.fixture(scope="session")
def dev_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny development FLUX model, built once per session (real diffusers code,
    random weights, local tokenizers)."""
    from core.image.devmodel import build_dev_model

    return build_dev_model(tmp_path_factory.mktemp("dev-flux") / "model")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_store(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> StoreLocation:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return s3_server.location(f"t{uuid.uuid4().hex[:8]}")
