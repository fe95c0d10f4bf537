"""The Kafka side of a bench run that drives a `multimodal-engine serve` subprocess: the
broker with the contract topics (KAFKA_BOOTSTRAP_SERVERS, or an embedded Tansu) and the
engine's environment on them."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from consumers.broker import launch_broker
from consumers.topics import CONTRACT_TOPICS, ensure_topics
from core.image.devmodel import build_dev_model

__all__ = ["BenchKafka", "bench_kafka", "engine_env"]

PARTITIONS = 6


@dataclass(frozen=True)
class BenchKafka:
    """Where the bench's topics are: ``bootstrap``, and whether it is the embedded broker."""

    bootstrap: str
    embedded: bool

    def describe(self) -> str:
        """``embedded tansu`` or the bootstrap address, for the figures' header line."""
        return "embedded tansu" if self.embedded else self.bootstrap


@asynccontextmanager
async def bench_kafka(prefixes: Sequence[str]) -> AsyncIterator[BenchKafka]:
    """The contract topics under each of ``prefixes`` (6 partitions each): on
    KAFKA_BOOTSTRAP_SERVERS, made where missing, or, when that is unset, on an embedded
    Tansu started here and stopped on exit."""
    names = [p + t for p in prefixes for t in CONTRACT_TOPICS]
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap:
        await ensure_topics(bootstrap, names, PARTITIONS)
        yield BenchKafka(bootstrap, embedded=False)
        return
    broker = launch_broker("tansu")
    broker.start()
    try:
        broker.create_topics(names, PARTITIONS)
        yield BenchKafka(broker.bootstrap_servers, embedded=True)
    finally:
        broker.stop()


def engine_env(bootstrap: str, prefix: str, workdir: Path, fetch_wait_ms: int,
               **extra: str) -> dict[str, str]:
    """A bench engine's environment: its topics and group under ``prefix``, quick group
    heartbeats, outputs and LoRAs under ``workdir / prefix``, the development FLUX model
    (built once under ``workdir``), warnings only; ``extra`` added (the voice backend)."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_TOPIC_PREFIX": prefix,
        "KAFKA_GROUP_ID": f"{prefix}bench", "KAFKA_FETCH_MAX_WAIT_MS": str(fetch_wait_ms),
        "KAFKA_SESSION_TIMEOUT_MS": "3000", "KAFKA_HEARTBEAT_INTERVAL_MS": "300",
        "SERVICE_PORT": "0", "OUTPUT_DIR": str(workdir / prefix / "outputs"),
        "LORA_OUTPUT_DIR": str(workdir / prefix / "loras"), "LOG_LEVEL": "WARNING",
        "FLUX_MODEL_PATH": str(build_dev_model(workdir / "dev-flux")), **extra,
    }
