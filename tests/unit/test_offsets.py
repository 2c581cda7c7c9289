"""Only a contiguous prefix of finished records is committed, per partition."""

from __future__ import annotations

from consumer.kafka.offsets import OffsetTracker
from consumer.records import TopicPartition

TP0 = TopicPartition("in", 0)
TP1 = TopicPartition("in", 1)


def tracker_with(tp: TopicPartition, offsets: list[int]) -> OffsetTracker:
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.track(tp, offset)
    return tracker


def test_nothing_is_committable_before_anything_finishes() -> None:
    tracker = tracker_with(TP0, [0, 1, 2])
    assert tracker.committable() == {}


def test_the_commit_is_the_last_finished_offset_plus_one() -> None:
    tracker = tracker_with(TP0, [3, 4])
    tracker.finish(TP0, 3)
    assert tracker.committable() == {TP0: 4}
    tracker.finish(TP0, 4)
    assert tracker.committable() == {TP0: 5}


def test_finishing_out_of_order_commits_only_the_contiguous_prefix() -> None:
    tracker = tracker_with(TP0, [3, 4, 5])
    tracker.finish(TP0, 3)
    tracker.finish(TP0, 5)  # 4 is still pending: nothing past 3 may commit
    assert tracker.committable() == {TP0: 4}
    tracker.finish(TP0, 4)
    assert tracker.committable() == {TP0: 6}


def test_finishing_a_later_record_before_the_first_commits_nothing() -> None:
    tracker = tracker_with(TP0, [4, 5])
    tracker.finish(TP0, 5)
    assert tracker.committable() == {}


def test_gaps_in_offsets_commit_the_last_finished_plus_one() -> None:
    tracker = tracker_with(TP0, [10, 12, 15])
    tracker.finish(TP0, 12)
    tracker.finish(TP0, 10)
    assert tracker.committable() == {TP0: 13}
    tracker.finish(TP0, 15)
    assert tracker.committable() == {TP0: 16}


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.track(TP0, 0)
    tracker.track(TP1, 0)
    tracker.track(TP1, 1)
    tracker.finish(TP1, 1)
    tracker.finish(TP0, 0)
    assert tracker.committable() == {TP0: 1}


def test_committable_only_returns_partitions_that_moved_since_the_last_commit() -> None:
    tracker = OffsetTracker()
    for tp in (TP0, TP1):
        tracker.track(tp, 0)
        tracker.track(tp, 1)
        tracker.finish(tp, 0)
    first = tracker.committable()
    assert first == {TP0: 1, TP1: 1}
    tracker.committed(first)
    assert tracker.committable() == {}
    tracker.finish(TP1, 1)
    assert tracker.committable() == {TP1: 2}


def test_an_older_commit_acknowledgement_does_not_move_committed_back() -> None:
    tracker = tracker_with(TP0, [0, 1])
    tracker.finish(TP0, 0)
    tracker.finish(TP0, 1)
    tracker.committed({TP0: 2})
    tracker.committed({TP0: 1})
    assert tracker.committable() == {}


def test_first_pending_is_the_first_unfinished_offset() -> None:
    tracker = tracker_with(TP0, [10, 12, 15])
    assert tracker.first_pending(TP0) == 10
    tracker.finish(TP0, 12)
    assert tracker.first_pending(TP0) == 10
    tracker.finish(TP0, 10)
    assert tracker.first_pending(TP0) == 15
    tracker.finish(TP0, 15)
    assert tracker.first_pending(TP0) is None
    assert tracker.first_pending(TP1) is None


def test_forget_drops_a_revoked_partitions_state() -> None:
    tracker = OffsetTracker()
    for tp in (TP0, TP1):
        tracker.track(tp, 0)
        tracker.track(tp, 1)
        tracker.finish(tp, 0)
    tracker.forget([TP1])
    assert tracker.committable() == {TP0: 1}
    assert tracker.first_pending(TP1) is None
    assert tracker.first_pending(TP0) == 1


def test_a_partition_assigned_again_after_forget_starts_fresh() -> None:
    tracker = tracker_with(TP0, [0])
    tracker.finish(TP0, 0)
    tracker.committed({TP0: 1})
    tracker.forget([TP0])
    tracker.track(TP0, 0)
    tracker.finish(TP0, 0)
    assert tracker.committable() == {TP0: 1}


def test_finishing_an_untracked_partition_is_ignored() -> None:
    tracker = OffsetTracker()
    tracker.finish(TP0, 3)
    assert tracker.committable() == {}
