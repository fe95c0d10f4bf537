"""The Kafka side of a bench run that drives a `multimodal-engine serve` subprocess: the
broker with the contract topics (KAFKA_BOOTSTRAP_SERVERS, or an embedded Tansu) and the
engine's environment on them.

On KAFKA_BOOTSTRAP_SERVERS the bench's own clients connect with the settings' security
(KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_*), as the engine subprocess does: it
inherits the same environment."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from consumers.broker import launch_broker
from consumers.security import PLAINTEXT, KafkaSecurity
from consumers.topics import CONTRACT_TOPICS, ensure_topics
from core.image.devmodel import build_dev_model
from core.settings import Settings, load_settings
from tests.support.kafka_security import register

__all__ = ["BenchKafka", "bench_kafka", "engine_env"]

PARTITIONS = 6

# the settings KafkaSecurity.from_settings reads
_SECURITY_SETTINGS = (
    "kafka_security_protocol", "kafka_sasl_mechanism", "kafka_sasl_username",
    "kafka_sasl_password", "kafka_sasl_oauth_token_file", "kafka_ssl_ca_file",
    "kafka_ssl_cert_file", "kafka_ssl_key_file", "kafka_ssl_check_hostname")


@dataclass(frozen=True)
class BenchKafka:
    """Where the bench's topics are: ``bootstrap``, whether it is the embedded broker, and
    how clients connect to it (``security``, plaintext for the embedded broker)."""

    bootstrap: str
    embedded: bool
    security: KafkaSecurity = PLAINTEXT

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for an aiokafka client of ``bootstrap`` (producer, consumer,
        admin): the settings' security, ``{}`` for the embedded broker."""
        return {} if self.embedded else self.security.options()

    def describe(self) -> str:
        """``embedded tansu``, the bootstrap address, or the address and its security
        (``SASL_SSL (SCRAM-SHA-512)``, no user, no secrets), for the figures' header."""
        if self.embedded:
            return "embedded tansu"
        if self.security.protocol == "PLAINTEXT":
            return self.bootstrap
        return f"{self.bootstrap} {self.security.describe(user=False)}"


@asynccontextmanager
async def bench_kafka(prefixes: Sequence[str]) -> AsyncIterator[BenchKafka]:
    """The contract topics under each of ``prefixes`` (6 partitions each): on
    KAFKA_BOOTSTRAP_SERVERS, made where missing and reached with the settings' security, or,
    when that is unset, on an embedded Tansu started here and stopped on exit.

    On KAFKA_BOOTSTRAP_SERVERS the security is also registered for the bench's
    ``PersonaPeer`` clients (tests/support/kafka_security.py). Raises
    :class:`core.settings.ConfigurationError` naming the setting that cannot be used."""
    names = [p + t for p in prefixes for t in CONTRACT_TOPICS]
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap:
        settings = load_settings(_env_file=None)
        security = KafkaSecurity.from_settings(settings)
        register(bootstrap, _security_env(settings))
        await ensure_topics(bootstrap, names, PARTITIONS, security=security)
        yield BenchKafka(bootstrap, embedded=False, security=security)
        return
    broker = launch_broker("tansu")
    broker.start()
    try:
        broker.create_topics(names, PARTITIONS)
        yield BenchKafka(broker.bootstrap_servers, embedded=True)
    finally:
        broker.stop()


def _security_env(settings: Settings) -> dict[str, str]:
    """The security settings that are set, as environment names and strings."""
    env = {}
    for name in _SECURITY_SETTINGS:
        value = getattr(settings, name)
        if value is not None:
            env[name.upper()] = (value.get_secret_value() if isinstance(value, SecretStr)
                                 else str(value))
    return env


def engine_env(bootstrap: str, prefix: str, workdir: Path, fetch_wait_ms: int,
               **extra: str) -> dict[str, str]:
    """A bench engine's environment: its topics and group under ``prefix``, quick group
    heartbeats, outputs and LoRAs under ``workdir / prefix``, the development FLUX model
    (built once under ``workdir``), warnings only; ``extra`` added (the voice backend, the
    batch size). The Kafka security settings come with the inherited environment."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_TOPIC_PREFIX": prefix,
        "KAFKA_GROUP_ID": f"{prefix}bench", "KAFKA_FETCH_MAX_WAIT_MS": str(fetch_wait_ms),
        "KAFKA_SESSION_TIMEOUT_MS": "3000", "KAFKA_HEARTBEAT_INTERVAL_MS": "300",
        "SERVICE_PORT": "0", "OUTPUT_DIR": str(workdir / prefix / "outputs"),
        "LORA_OUTPUT_DIR": str(workdir / prefix / "loras"), "LOG_LEVEL": "WARNING",
        "FLUX_MODEL_PATH": str(build_dev_model(workdir / "dev-flux")), **extra,
    }
