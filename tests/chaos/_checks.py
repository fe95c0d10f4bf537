"""What every chaos test asserts: nothing lost, each conversation answered in order, and
every answered record committed in the end."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support.kafka_client import Answer, PersonaPeer
from tests.support.kafka_security import client_options

__all__ = ["answered_twice", "assert_all_committed", "assert_in_order",
           "assert_nothing_lost", "eventually", "voice_requests"]

def voice_requests(n: int, conversations: int = 6, tag: str = "r") -> list[dict[str, Any]]:
    """``n`` voice requests spread round robin over ``conversations`` conversations."""
    return [{"request_id": str(uuid.uuid4()), "conversation_id": f"conv-{i % conversations}",
             "text": f"{tag} {i}. Good morning, how are you?"} for i in range(n)]


async def assert_nothing_lost(peer: PersonaPeer, published: list[dict[str, Any]], *,
                              timeout: float = 90.0, stall: float = 15.0) -> dict[str, Answer]:
    """Waits until every request of ``published`` is answered, deduplicating by
    request_id, and requires each first answer to be ``completed``; returns them.

    Fails when no answer came for ``stall`` seconds (a lost request or a wedged
    conversation: no need to wait out ``timeout``), or after ``timeout``."""
    wanted = {r["request_id"] for r in published}

    def ours(answer: Answer) -> bool:
        return answer.kind in ("completed", "failed") and answer.event.get("request_id") in wanted

    def missing() -> set[str]:
        return wanted - {a.event["request_id"] for a in peer.answers if ours(a)}

    deadline = asyncio.get_running_loop().time() + timeout
    while missing():
        left = deadline - asyncio.get_running_loop().time()
        try:
            await peer.wait_for(ours, count=sum(map(ours, peer.answers)) + 1,
                                timeout=max(0.0, min(stall, left)))
        except TimeoutError:
            raise AssertionError(f"{len(missing())} of {len(wanted)} requests unanswered "
                                 f"(no answer for {min(stall, left):g} s)") from None
    answers = await peer.answers_for(list(wanted), timeout=1.0)
    not_completed = {rid: a.event for rid, a in answers.items() if a.kind != "completed"}
    assert not not_completed, f"answered, but not completed: {not_completed}"
    return answers


def assert_in_order(answers: dict[str, Answer], published: list[dict[str, Any]]) -> None:
    """Requires the first answers of each conversation to be in publish order (one
    partition of ``generation.completed``, rising offsets), rebalances included (found by
    this suite: records fetched just before a revoke were once dispatched after the next
    assignment, ahead of the records fetched again)."""
    by_conversation: dict[str, list[Answer]] = defaultdict(list)
    for request in published:
        by_conversation[request["conversation_id"]].append(answers[request["request_id"]])
    violations = []
    for conversation, in_publish_order in by_conversation.items():
        places = [(a.partition, a.offset) for a in in_publish_order]
        if places != sorted(places) or len({p for p, _ in places}) != 1:
            violations.append(f"{conversation}: answers at {places}")
    assert not violations, f"answers out of publish order: {'; '.join(violations)}"


def answered_twice(peer: PersonaPeer, published: list[dict[str, Any]]) -> int:
    """How many answers of ``published`` beyond the first of each (redelivered after a
    fault: allowed)."""
    wanted = {r["request_id"] for r in published}
    counts = Counter(a.event["request_id"] for a in peer.answers
                     if a.kind == "completed" and a.event.get("request_id") in wanted)
    return sum(count - 1 for count in counts.values())


async def eventually(check: Callable[[], Awaitable[bool]], what: Callable[[], str],
                     timeout: float = 20.0, interval: float = 0.05) -> None:
    """Asks ``check()`` every ``interval`` seconds until it says True; AssertionError
    with ``what()`` after ``timeout`` seconds. Only for states nothing announces (a
    group's committed offsets, what the mock broker still has queued): wait on an event
    wherever there is one."""
    async def poll() -> None:
        while not await check():
            await asyncio.sleep(interval)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g} s: {what()}") from None


async def assert_all_committed(bootstrap: str, group: str, topic: str, partitions: int,
                               timeout: float = 20.0) -> None:
    """Waits until ``group`` has committed each of the ``partitions`` of ``topic`` up to
    its end: nothing left for a restarted engine to redo, the lag is 0."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, **client_options(bootstrap),
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        committed: dict[TopicPartition, int | None] = {}

        async def caught_up() -> bool:
            for tp in tps:
                committed[tp] = await consumer.committed(tp)
            return all(committed[tp] == ends[tp] for tp in tps if ends[tp])

        await eventually(caught_up, lambda: f"{group} committed {committed}, ends {ends}",
                         timeout)
    finally:
        await consumer.stop()
