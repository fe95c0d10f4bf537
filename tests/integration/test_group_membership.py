"""Rebalances that move nothing needlessly (issue 18), with the engine's own group consumer
(``consumers.kafka.build_consumer``) on the session's broker.

- The sticky assignor: a member that joins takes its share and nothing more; the others
  keep the rest of what they had.
- Static membership (``KAFKA_GROUP_INSTANCE_ID``): a member stopped and restarted within
  the session timeout gets the same partitions back, and the other member is never revoked.

aiokafka's rebalances are eager: every member is revoked all it has, then assigned; what
is checked here is the assignment that follows. Measured timings are in docs/brokers.md.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from consumers.kafka import build_consumer
from consumers.security import KafkaSecurity
from core.settings import Settings
from tests.conftest import MakeTopics
from tests.support.settings import engine_settings

pytestmark = pytest.mark.kafka

_two_members = pytest.mark.skipif(
    not os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    and os.environ.get("EMBEDDED_BROKER", "tansu") == "rdkafka-mock",
    reason="librdkafka's mock never gives a second member its share: it answers the "
    "follower's SyncGroup with INVALID_REQUEST (docs/brokers.md)")

PARTITIONS = 6
ALL = frozenset(range(PARTITIONS))
# Tansu holds a dynamic member's join for about half the session timeout (2 s here)
REBALANCE_TIMEOUT_S = 20.0
# Tansu holds a static member's JoinGroup for about half the session timeout and its
# SyncGroup 3 s, and neither counts as contact: the restart has to end within the old
# session (docs/brokers.md), ≈ 11 s of these 15
STATIC_SESSION_MS = 15_000
STATIC_TIMEOUT_S = 2 * STATIC_SESSION_MS / 1000 + 10
# how long after the old session would have ended a revoke is still waited for
REVOKE_MARGIN_S = 3.0


class _Member(ConsumerRebalanceListener):  # type: ignore[misc]
    """One engine group consumer, polled as the consume loop polls it; ``events`` keeps
    every (``"revoked"`` | ``"assigned"``, partitions) its listener was told."""

    def __init__(self, label: str, settings: Settings, topic: str, changed: asyncio.Event
                 ) -> None:
        assert settings.kafka_bootstrap_servers is not None
        self.label = label
        self.consumer = build_consumer(settings, settings.kafka_bootstrap_servers,
                                       security=KafkaSecurity.from_settings(settings))
        self.events: list[tuple[str, frozenset[int]]] = []
        self.error: BaseException | None = None
        self._topic = topic
        self._changed = changed
        self._poll: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.subscribe([self._topic], listener=self)
        self._poll = asyncio.create_task(self._poll_forever(), name=f"poll-{self.label}")

    async def stop(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)
        await self.consumer.stop()

    async def _poll_forever(self) -> None:
        # group errors (a refused protocol, an unknown member) reach a client only here
        try:
            while True:
                await self.consumer.getmany(timeout_ms=50)
        except Exception as exc:  # noqa: BLE001 - reported by _Group.until
            self.error = exc
            self._changed.set()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._record("revoked", revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._record("assigned", assigned)

    def _record(self, kind: str, partitions: set[TopicPartition]) -> None:
        self.events.append((kind, frozenset(tp.partition for tp in partitions)))
        self._changed.set()

    @property
    def owned(self) -> frozenset[int] | None:
        """What it was last assigned; ``None`` before its first assignment and between a
        revoke and the assignment that follows."""
        if not self.events or self.events[-1][0] != "assigned":
            return None
        return self.events[-1][1]

    def revokes(self) -> list[frozenset[int]]:
        """Every revoke that took partitions (aiokafka also reports an empty one on the
        first join)."""
        return [parts for kind, parts in self.events if kind == "revoked" and parts]


class _Group:
    """The members of one consumer group, and waiting for what they are told."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.members: list[_Member] = []
        self.changed = asyncio.Event()

    async def join(self, label: str, settings: Settings) -> _Member:
        member = _Member(label, settings, self.topic, self.changed)
        self.members.append(member)
        await member.start()
        return member

    async def leave(self, member: _Member) -> None:
        self.members.remove(member)
        await member.stop()

    async def stop(self) -> None:
        for member in reversed(self.members):
            await member.stop()
        self.members.clear()

    def settled(self) -> bool:
        """Every member holds an assignment, and together they own every partition once."""
        owned = [member.owned for member in self.members]
        if any(parts is None or not parts for parts in owned):
            return False
        return sum(len(parts or ()) for parts in owned) == PARTITIONS and \
            frozenset().union(*(parts or () for parts in owned)) == ALL

    def assignment(self) -> dict[str, frozenset[int]]:
        """Each member's partitions, by label; ``AssertionError`` unless :meth:`settled`."""
        assert self.settled(), self._story()
        return {member.label: member.owned or frozenset() for member in self.members}

    async def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Waits until ``done()``; raises ``AssertionError`` naming ``what`` and every
        member's events when ``timeout`` seconds pass or a member's poll fails."""
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    self._raise_errors()
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"not within {timeout:g} s: {what}; {self._story()}") from None
        self._raise_errors()

    async def never(self, happens: Callable[[], bool], seconds: float, what: str) -> None:
        """Waits ``seconds``; raises ``AssertionError`` naming ``what`` as soon as
        ``happens()``, or when a member's poll fails."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not happens():
            self._raise_errors()
            self.changed.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self.changed.wait()
            except TimeoutError:
                return
        raise AssertionError(f"{what}; {self._story()}")

    def _raise_errors(self) -> None:
        for member in self.members:
            if member.error is not None:
                raise AssertionError(f"{member.label} failed to poll: {member.error!r}; "
                                     f"{self._story()}") from member.error

    def _story(self) -> str:
        return "; ".join(
            f"{m.label}: " + ", ".join(f"{k} {sorted(p)}" for k, p in m.events)
            for m in self.members)


@pytest.fixture
async def topic(make_topics: MakeTopics) -> str:
    topics = await make_topics(partitions=PARTITIONS, names=["membership"])
    return topics["membership"]


@_two_members
async def test_a_joining_member_takes_only_its_share(
    tmp_path: Path, broker_bootstrap: str, topic_prefix: str, topic: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    settings = engine_settings(tmp_path, broker_bootstrap, topic_prefix)
    group = _Group(topic)
    try:
        first = await group.join("first", settings)
        await group.until(lambda: first.owned == ALL, REBALANCE_TIMEOUT_S, "first owns all")

        await group.join("second", settings)
        await group.until(group.settled, REBALANCE_TIMEOUT_S, "first and second split")
        two = group.assignment()
        assert len(ALL - two["first"]) == 3  # exactly the newcomer's share moved

        await group.join("third", settings)
        await group.until(group.settled, REBALANCE_TIMEOUT_S, "three split")
        three = group.assignment()
        for label, had in two.items():
            assert three[label] < had and len(three[label]) == 2, \
                f"{label}: {sorted(had)} -> {sorted(three[label])}"
        # one from each, where round-robin would move four to six of them
        assert sum(len(had - three[label]) for label, had in two.items()) == 2
    finally:
        await group.stop()


@_two_members
@pytest.mark.slow
async def test_a_static_member_restarted_within_its_session_keeps_its_partitions(
    tmp_path: Path, broker_bootstrap: str, topic_prefix: str, topic: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env

    def instance(name: str) -> Settings:
        return engine_settings(tmp_path, broker_bootstrap, topic_prefix,
                               kafka_session_timeout_ms=STATIC_SESSION_MS,
                               kafka_group_instance_id=f"{topic_prefix}{name}")

    group = _Group(topic)
    try:
        restarting = await group.join("a", instance("a"))
        other = await group.join("b", instance("b"))
        await group.until(group.settled, STATIC_TIMEOUT_S, "a and b split")
        had = group.assignment()["a"]
        assert other.revokes() == []

        await group.leave(restarting)  # static: no LeaveGroup
        stopped = time.monotonic()
        restarted = await group.join("a again", instance("a"))
        await group.until(lambda: restarted.owned is not None, STATIC_TIMEOUT_S,
                          "a, restarted, assigned")
        print(f"restart to assignment: {time.monotonic() - stopped:.2f} s")
        assert restarted.owned == had

        # A broker that took the restart for a new member would rebalance at once, or when
        # the old session ended: wait past that for a revoke of the other member.
        deadline = stopped + STATIC_SESSION_MS / 1000 + REVOKE_MARGIN_S
        await group.never(lambda: bool(other.revokes()), deadline - time.monotonic(),
                          "b was revoked: the restart rebalanced the group")
        assert restarted.events == [("revoked", frozenset()), ("assigned", had)]
        assert group.assignment() == {"b": ALL - had, "a again": had}
    finally:
        await group.stop()
