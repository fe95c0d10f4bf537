from consumers.tracking import PartitionTracker


def test_commit_position_waits_for_the_oldest_unanswered_record() -> None:
    tracker = PartitionTracker()
    for offset in (10, 11, 12):
        tracker.fetched(offset)
    tracker.finished(12)
    tracker.finished(11)
    assert tracker.committable() == 10  # 10 still in flight: nothing at or past it
    tracker.finished(10)
    assert tracker.committable() == 13


def test_gaps_in_offsets_do_not_block_commits() -> None:
    tracker = PartitionTracker()
    for offset in (5, 9, 20):  # compaction or transaction markers leave gaps
        tracker.fetched(offset)
    for offset in (20, 5, 9):
        tracker.finished(offset)
    assert tracker.committable() == 21


def test_nothing_new_to_commit_after_mark() -> None:
    tracker = PartitionTracker()
    assert tracker.committable() is None
    tracker.fetched(0)
    tracker.finished(0)
    assert tracker.committable() == 1
    tracker.mark_committed(1)
    assert tracker.committable() is None
    tracker.fetched(1)
    assert tracker.committable() is None
    assert tracker.in_flight == 1
