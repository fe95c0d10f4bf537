"""The group's assignor: every topic spread evenly over the instances (no instance left with
all the image partitions and another with all the voice ones), and within that every
partition left where it was when an instance joins or leaves."""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from consumers.assignor import BalancedStickyAssignor

TOPICS = {"image": 6, "voice": 6, "lora": 6}


class Cluster:
    """What the assignor asks of aiokafka's cluster metadata: each topic's partitions."""

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(range(TOPICS[topic])) if topic in TOPICS else None


def rebalance(members: Mapping[str, BalancedStickyAssignor]) -> dict[str, set[tuple[str, int]]]:
    """One JoinGroup/SyncGroup round: every member's metadata, the leader's assignment,
    each member told its part. Returns what each holds."""
    metadata = {m: a.metadata(TOPICS) for m, a in members.items()}
    leader = next(iter(members.values()))
    assignments = leader.assign(Cluster(), metadata)
    for member, assignor in members.items():
        assignor.on_assignment(assignments[member])
    return {m: {(tp.topic, tp.partition) for tp in assignments[m].partitions()}
            for m in members}


def per_topic(held: set[tuple[str, int]]) -> dict[str, int]:
    return {topic: sum(1 for t, _ in held if t == topic) for topic in TOPICS}


def test_every_topic_is_spread_evenly_and_a_joiner_moves_only_its_share() -> None:
    members = {"a": BalancedStickyAssignor()}
    first = rebalance(members)
    assert per_topic(first["a"]) == TOPICS
    members["b"] = BalancedStickyAssignor()
    second = rebalance(members)
    assert per_topic(second["a"]) == per_topic(second["b"]) == {t: 3 for t in TOPICS}
    assert second["a"] <= first["a"]  # a gave up half of each topic, kept the rest
    members["c"] = BalancedStickyAssignor()
    third = rebalance(members)
    assert all(per_topic(third[m]) == {t: 2 for t in TOPICS} for m in "abc")
    moved = sum(len(second[m] - third[m]) for m in "ab")
    assert moved == 6  # exactly c's share, one per topic from each of a and b


def test_a_leaver_s_partitions_go_to_the_others_and_nothing_else_moves() -> None:
    members = {m: BalancedStickyAssignor() for m in "abc"}
    rebalance({"a": members["a"]})
    rebalance({"a": members["a"], "b": members["b"]})
    before = rebalance(members)
    del members["b"]
    after = rebalance(members)
    for m in "ac":
        assert before[m] <= after[m]  # kept everything, took part of b's
        assert per_topic(after[m]) == {t: 3 for t in TOPICS}


def test_garbage_user_data_reports_nothing() -> None:
    assignor = BalancedStickyAssignor()
    metadata = {"a": ConsumerProtocolMemberMetadata(0, list(TOPICS), b"not json"),
                "b": ConsumerProtocolMemberMetadata(0, ["voice"], b"[1, 2]")}
    result = assignor.assign(Cluster(), metadata)
    b = {(tp.topic, tp.partition) for tp in result["b"].partitions()}
    a = {(tp.topic, tp.partition) for tp in result["a"].partitions()}
    assert per_topic(b)["voice"] == 3 and per_topic(a) == {"image": 6, "voice": 3, "lora": 6}
