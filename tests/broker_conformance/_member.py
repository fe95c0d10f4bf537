"""A consumer-group member in its own process, for the conformance suite's crash tests.

    python _member.py BOOTSTRAP TOPIC GROUP SESSION_TIMEOUT_MS HEARTBEAT_MS

Prints one JSON line per event on stdout: ``{"event": "assigned", "partitions": [...]}``
after every rebalance, ``{"event": "error", "error": "..."}`` for a Kafka error it polled
through (librdkafka's mock answers some SyncGroups with InvalidRequestError; polling again
rejoins). It leaves the group and exits 0 when its stdin closes, so it never outlives the
test that started it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError


def _emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class _Report(ConsumerRebalanceListener):  # type: ignore[misc]
    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        _emit("assigned", partitions=sorted(tp.partition for tp in assigned))


async def _run(bootstrap: str, topic: str, group: str, session_ms: int, heartbeat_ms: int,
               secure: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stdin = sys.stdin.fileno()

    def on_stdin() -> None:
        # The parent never writes; readable stdin means end of input: the test is done.
        if not os.read(stdin, 4096):
            stop.set()

    loop.add_reader(stdin, on_stdin)
    from consumers.security import PLAINTEXT, KafkaSecurity
    from core.settings import load_settings

    security = KafkaSecurity.from_settings(load_settings()) if secure else PLAINTEXT
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **security.options(),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_ms,
        heartbeat_interval_ms=heartbeat_ms,
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    try:
        consumer.subscribe([topic], listener=_Report())
        while not stop.is_set():
            try:
                await consumer.getmany(timeout_ms=100)
            except KafkaError as exc:
                _emit("error", error=repr(exc))
    finally:
        loop.remove_reader(stdin)
        await consumer.stop()


if __name__ == "__main__":
    bootstrap, topic, group, session_ms, heartbeat_ms = sys.argv[1:6]
    # "secure": an external broker, reached as the engine's settings in the environment say
    secure = sys.argv[6:7] == ["secure"]
    asyncio.run(_run(bootstrap, topic, group, int(session_ms), int(heartbeat_ms), secure))
