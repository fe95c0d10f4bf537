"""The SASL-enforcing test broker (tests/support/sasl_broker.py) enforces what it claims,
checked with two independent clients: aiokafka and librdkafka (confluent-kafka).

Right credentials produce and consume (through a consumer group, so the coordinator's
address goes through the gateway too); a wrong password, an unknown user, a rejected token,
a disabled mechanism and a plaintext client are refused, once, without a retry.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from consumers.broker.base import BrokerStartError
from consumers.broker.tansu import _tansu_binary
from tests.support.sasl_broker import AuthAttempt, SaslBroker

try:
    _tansu_binary()
except BrokerStartError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"the SASL broker runs Tansu, which is missing: {exc}", allow_module_level=True)

pytestmark = pytest.mark.kafka

USER, PASSWORD, TOKEN = "alice", "correct horse battery staple", "token-for-tests"
PASSWORD_MECHANISMS = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
REFUSED_WITHIN_S = 5.0  # measured: 2-4 ms; the point is "no wait for a timeout"


class _Token(AbstractTokenProvider):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token


@pytest.fixture(scope="module")
def broker() -> Iterator[SaslBroker]:
    with SaslBroker({USER: PASSWORD}, tokens=[TOKEN]) as running:
        yield running


def _topic() -> str:
    return f"sasl-{uuid.uuid4().hex[:8]}"


def _failures_since(broker: SaslBroker, start: int) -> list[AuthAttempt]:
    return [a for a in broker.attempts()[start:] if not a.succeeded]


async def _start_fails(config: dict[str, Any]) -> float:
    """Start a producer that must be refused; return how long the refusal took."""
    producer = AIOKafkaProducer(**config)
    began = time.monotonic()
    try:
        with pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):
            await producer.start()
        return time.monotonic() - began
    finally:
        await producer.stop()


@pytest.mark.parametrize("mechanism", PASSWORD_MECHANISMS)
async def test_the_right_password_produces(broker: SaslBroker, mechanism: str) -> None:
    topic = _topic()
    broker.create_topics([topic], partitions=1)
    producer = AIOKafkaProducer(**broker.client_config(mechanism, USER, PASSWORD))
    await producer.start()
    try:
        metadata = await producer.send_and_wait(topic, b"hello")
    finally:
        await producer.stop()
    assert metadata.offset == 0
    mine = [a for a in broker.attempts() if a.username == USER and a.mechanism == mechanism]
    assert mine and all(a.succeeded for a in mine)


async def test_a_consumer_group_reads_and_commits_through_the_gateway(
    broker: SaslBroker,
) -> None:
    # The coordinator's and the leaders' addresses come from Tansu's metadata: they must
    # name the gateway, or the group would reach Tansu around it (or not at all).
    topic = _topic()
    broker.create_topics([topic], partitions=2)
    config = broker.client_config("SCRAM-SHA-512", USER, PASSWORD)
    producer = AIOKafkaProducer(**config)
    # Tansu answers a first JoinGroup late (5 s at aiokafka's default 10 s session
    # timeout, 1 s at 1 s): keep the session short.
    consumer = AIOKafkaConsumer(topic, group_id=f"g-{topic}", auto_offset_reset="earliest",
                                fetch_max_wait_ms=10, session_timeout_ms=1000,
                                heartbeat_interval_ms=200, **config)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k")
        await consumer.start()
        record = await asyncio.wait_for(consumer.getone(), 10)
        assert (record.key, record.value) == (b"k", b"hello")
        await consumer.commit()
        assert await consumer.committed(TopicPartition(topic, record.partition)) == 1
    finally:
        await consumer.stop()
        await producer.stop()
    gateway = int(broker.bootstrap_servers.rsplit(":", 1)[1])
    assert {b.port for b in producer.client.cluster.brokers()} == {gateway}


async def test_an_accepted_bearer_token_produces(broker: SaslBroker) -> None:
    topic = _topic()
    broker.create_topics([topic], partitions=1)
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap_servers, security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=_Token(TOKEN),
    )
    await producer.start()
    try:
        metadata = await producer.send_and_wait(topic, b"x")
    finally:
        await producer.stop()
    assert metadata.offset == 0


@pytest.mark.parametrize("mechanism", PASSWORD_MECHANISMS)
@pytest.mark.parametrize(("user", "password"), [(USER, "wrong"), ("mallory", PASSWORD)])
async def test_wrong_credentials_are_refused_once_without_retry(
    broker: SaslBroker, mechanism: str, user: str, password: str
) -> None:
    seen = len(broker.attempts())
    took = await _start_fails(broker.client_config(mechanism, user, password))
    assert took < REFUSED_WITHIN_S
    assert [(a.mechanism, a.username) for a in _failures_since(broker, seen)] == [
        (mechanism, user)
    ]
    # aiokafka's start() reports only "Unable to bootstrap"; one connection says why.
    host, port = broker.bootstrap_servers.rsplit(":", 1)
    with pytest.raises(SaslAuthenticationFailed, match="Authentication failed"):
        await create_conn(host, int(port), security_protocol="SASL_PLAINTEXT",
                          sasl_mechanism=mechanism, sasl_plain_username=user,
                          sasl_plain_password=password)


async def test_a_rejected_bearer_token_is_refused(broker: SaslBroker) -> None:
    seen = len(broker.attempts())
    await _start_fails({
        "bootstrap_servers": broker.bootstrap_servers, "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "OAUTHBEARER", "sasl_oauth_token_provider": _Token("stolen"),
    })
    assert [a.mechanism for a in _failures_since(broker, seen)] == ["OAUTHBEARER"]


async def test_a_plaintext_client_is_refused(broker: SaslBroker) -> None:
    seen = len(broker.attempts())
    took = await _start_fails({"bootstrap_servers": broker.bootstrap_servers})
    assert took < REFUSED_WITHIN_S
    assert [(a.mechanism, a.succeeded) for a in broker.attempts()[seen:]] == [(None, False)]


async def test_a_mechanism_not_enabled_is_refused_with_the_enabled_list() -> None:
    with SaslBroker({USER: PASSWORD}, mechanisms=["SCRAM-SHA-512"]) as only_512:
        host, port = only_512.bootstrap_servers.rsplit(":", 1)
        with pytest.raises(UnsupportedSaslMechanismError):
            await create_conn(host, int(port), security_protocol="SASL_PLAINTEXT",
                              sasl_mechanism="SCRAM-SHA-256", sasl_plain_username=USER,
                              sasl_plain_password=PASSWORD)
        answer = _raw_handshake(host, int(port), "PLAIN")
        assert answer == (33, ["SCRAM-SHA-512"])


async def test_a_changed_password_and_a_removed_user_take_effect(broker: SaslBroker) -> None:
    topic = _topic()
    broker.create_topics([topic], partitions=1)
    broker.add_user("carol", "first")
    broker.add_user("carol", "second")
    await _start_fails(broker.client_config("SCRAM-SHA-256", "carol", "first"))
    producer = AIOKafkaProducer(request_timeout_ms=500,
                                **broker.client_config("SCRAM-SHA-256", "carol", "second"))
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before")
        seen = len(broker.attempts())
        broker.remove_user("carol")
        broker.drop_connections()
        with pytest.raises(KafkaError):
            await producer.send_and_wait(topic, b"after")
    finally:
        await producer.stop()
    assert {(a.username, a.succeeded) for a in _failures_since(broker, seen)} == {
        ("carol", False)
    }


def test_librdkafka_authenticates_with_scram_and_is_refused_a_wrong_password(
    broker: SaslBroker,
) -> None:
    # An independent SCRAM client, which also checks the server's signature.
    confluent_kafka = pytest.importorskip("confluent_kafka")
    topic = _topic()
    broker.create_topics([topic], partitions=1)

    def produce(password: str) -> tuple[list[str], list[Any]]:
        errors: list[str] = []
        delivered: list[Any] = []
        producer = confluent_kafka.Producer({
            "bootstrap.servers": broker.bootstrap_servers,
            "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": USER, "sasl.password": password,
            "message.timeout.ms": 500, "error_cb": lambda err: errors.append(err.name()),
        })
        producer.produce(topic, b"v", on_delivery=lambda err, msg: delivered.append(err))
        producer.flush(5)
        return errors, delivered

    errors, delivered = produce(PASSWORD)
    assert (errors, delivered) == ([], [None])
    errors, delivered = produce("wrong")
    assert "_AUTHENTICATION" in errors
    assert delivered and delivered[0] is not None


def test_sasl_authenticate_v2_is_answered_in_the_flexible_layout(broker: SaslBroker) -> None:
    # aiokafka and librdkafka send v0/v1; Tansu advertises up to v2, so v2 is served too.
    host, port = broker.bootstrap_servers.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        assert _handshake_on(sock, "PLAIN") == (0, ["PLAIN"])
        token = f"\0{USER}\0{PASSWORD}".encode()
        header = struct.pack(">hhih", 36, 2, 7, 4) + b"test" + b"\0"  # header v2: no tags
        body = bytes([len(token) + 1]) + token + b"\0"  # compact bytes, no tags
        sock.sendall(struct.pack(">i", len(header + body)) + header + body)
        answer = _read_response(sock)
    correlation_id, tags, error = struct.unpack_from(">ibh", answer)
    assert (correlation_id, tags, error) == (7, 0, 0)
    assert answer[7:] == b"\0" + b"\x01" + struct.pack(">q", 0) + b"\0"  # null msg, no bytes


def _raw_handshake(host: str, port: int, mechanism: str) -> tuple[int, list[str]]:
    with socket.create_connection((host, port), timeout=5) as sock:
        return _handshake_on(sock, mechanism)


def _handshake_on(sock: socket.socket, mechanism: str) -> tuple[int, list[str]]:
    name = mechanism.encode()
    payload = struct.pack(">hhih", 17, 1, 3, 4) + b"test" + struct.pack(">h", len(name)) + name
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    answer = _read_response(sock)
    _, error, count = struct.unpack_from(">ihi", answer)
    offset, names = 10, []
    for _ in range(count):
        (size,) = struct.unpack_from(">h", answer, offset)
        names.append(answer[offset + 2 : offset + 2 + size].decode())
        offset += 2 + size
    return error, names


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">i", data[:4])[0]:
        chunk = sock.recv(65536)
        assert chunk, "the broker closed the connection"
        data += chunk
    return data[4:]
