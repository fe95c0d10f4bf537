"""The ``serve`` and ``dev`` process entries: build, start, wait for a signal, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from contextlib import ExitStack

from aiokafka.errors import KafkaConnectionError

from consumers.broker import launch_broker
from consumers.devstate import DevState, clear_state, write_state
from consumers.engine import Engine
from consumers.topics import CONTRACT_TOPICS, ensure_topics
from core.settings import Settings

__all__ = ["run_serve", "run_dev"]

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """Start-up cannot go on; the message says why and what to do."""


async def _serve_until_signal(engine: Engine) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, engine.request_stop)
    try:
        await engine.wait_stopped()
    finally:
        logger.info("stopping: draining in-flight work")
        await engine.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def run_serve(settings: Settings) -> None:
    """Production entry: the configured broker, or a clear error."""
    if settings.kafka_bootstrap_servers is None:
        raise StartupError(
            "KAFKA_BOOTSTRAP_SERVERS is not set: `serve` needs a Kafka broker "
            "(host:port,…); for a local all-in-one setup use `multimodal-engine dev`"
        )
    bootstrap = settings.kafka_bootstrap_servers
    await ensure_topics(
        bootstrap, [settings.topic(t) for t in CONTRACT_TOPICS], settings.kafka_topic_partitions
    )
    engine = Engine(settings, bootstrap)
    try:
        addresses = await engine.start()
    except KafkaConnectionError as exc:
        await engine.stop()
        raise StartupError(f"cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS={bootstrap}: {exc}"
                           ) from exc
    print(f"engine serving: kafka={addresses.bootstrap_servers} http={addresses.http_url} "
          f"voice={engine.voice.backend.name}", flush=True)
    await _serve_until_signal(engine)


async def run_dev(settings: Settings) -> None:
    """Everything on one machine: embedded broker unless configured, local voice without a
    key; prints what it started and records it for ``send``."""
    with ExitStack() as stack:
        bootstrap = settings.kafka_bootstrap_servers
        broker_note = "external (KAFKA_BOOTSTRAP_SERVERS)"
        topics = [settings.topic(t) for t in CONTRACT_TOPICS]
        if bootstrap is None:
            broker = launch_broker(settings.embedded_broker)
            broker.start()
            stack.callback(broker.stop)
            broker.create_topics(topics, settings.kafka_topic_partitions)
            bootstrap = broker.bootstrap_servers
            broker_note = f"embedded {broker.name}"
        else:
            await ensure_topics(bootstrap, topics, settings.kafka_topic_partitions)
        engine = Engine(settings, bootstrap, http_host="127.0.0.1")
        addresses = await engine.start()
        write_state(DevState(os.getpid(), bootstrap, addresses.http_url,
                             settings.kafka_topic_prefix))
        stack.callback(clear_state, os.getpid())
        print(
            "multimodal-engine dev is up\n"
            f"  broker      {bootstrap} ({broker_note}, {settings.kafka_topic_partitions} "
            "partitions per topic)\n"
            f"  http        {addresses.http_url}  (/health, /metrics, /outputs/…, "
            "POST /generate/voice)\n"
            f"  voice       {engine.voice.backend.name}\n"
            f"  image model {settings.flux_model_path or 'none configured'} "
            "(image generation arrives with the image core)\n"
            f"  outputs     {settings.output_dir.resolve()}\n"
            "try:  multimodal-engine send voice \"Hello, I'm Sarah!\"   (Ctrl-C stops)",
            flush=True,
        )
        await _serve_until_signal(engine)


def exit_on_startup_error(exc: Exception) -> None:
    print(f"multimodal-engine: {exc}", file=sys.stderr)
    sys.exit(2)
