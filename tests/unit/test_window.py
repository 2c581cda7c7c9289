"""Windows close on count, on time from their first item, on shutdown and on revocation."""

from __future__ import annotations

from consumer.records import Item, SourceRecord, TopicPartition
from consumer.window import CloseReason, WindowAccumulator

TP0 = TopicPartition("in", 0)
TP1 = TopicPartition("in", 1)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def item(offset: int, tp: TopicPartition = TP0) -> Item:
    record = SourceRecord(tp.topic, tp.partition, offset, None, b"{}", 0)
    return Item(record=record, row={})


def offsets(window) -> list[int]:
    return [i.record.offset for i in window.items]


def test_a_window_closes_on_count() -> None:
    acc = WindowAccumulator(max_messages=3, max_wait_s=10.0, clock=FakeClock())
    assert acc.add(item(0)) is None
    assert acc.add(item(1)) is None
    window = acc.add(item(2))
    assert window is not None
    assert window.close_reason is CloseReason.COUNT
    assert offsets(window) == [0, 1, 2]
    assert acc.deadline() is None


def test_the_next_item_after_a_count_close_opens_a_new_window() -> None:
    acc = WindowAccumulator(max_messages=2, max_wait_s=10.0, clock=FakeClock())
    acc.add(item(0))
    first = acc.add(item(1))
    acc.add(item(2))
    second = acc.add(item(3))
    assert first is not None and second is not None
    assert first.id != second.id
    assert offsets(second) == [2, 3]


def test_a_window_closes_on_time_measured_from_its_first_item_not_its_last() -> None:
    clock = FakeClock(100.0)
    acc = WindowAccumulator(max_messages=100, max_wait_s=2.0, clock=clock)
    acc.add(item(0))
    clock.now = 101.5
    acc.add(item(1))  # a later item does not push the deadline back
    assert acc.deadline() == 102.0
    clock.now = 101.99
    assert acc.close_if_due() is None
    clock.now = 102.0
    window = acc.close_if_due()
    assert window is not None
    assert window.close_reason is CloseReason.TIME
    assert window.opened_at == 100.0
    assert offsets(window) == [0, 1]


def test_an_idle_window_closes_at_its_deadline_with_no_further_input() -> None:
    clock = FakeClock(0.0)
    acc = WindowAccumulator(max_messages=100, max_wait_s=5.0, clock=clock)
    acc.add(item(7))
    clock.now = 60.0  # nothing else arrives
    window = acc.close_if_due()
    assert window is not None
    assert offsets(window) == [7]
    assert window.close_reason is CloseReason.TIME


def test_no_window_and_no_deadline_when_nothing_is_open() -> None:
    clock = FakeClock(0.0)
    acc = WindowAccumulator(max_messages=10, max_wait_s=1.0, clock=clock)
    assert acc.deadline() is None
    clock.now = 1_000.0
    assert acc.close_if_due() is None


def test_the_deadline_counts_from_when_the_window_opened_not_from_construction() -> None:
    clock = FakeClock(0.0)
    acc = WindowAccumulator(max_messages=10, max_wait_s=1.0, clock=clock)
    clock.now = 50.0
    acc.add(item(0))
    assert acc.deadline() == 51.0
    clock.now = 50.5
    assert acc.close_if_due() is None


def test_shutdown_returns_the_partial_window() -> None:
    acc = WindowAccumulator(max_messages=10, max_wait_s=10.0, clock=FakeClock())
    acc.add(item(0))
    acc.add(item(1))
    window = acc.close(CloseReason.SHUTDOWN)
    assert window is not None
    assert window.close_reason is CloseReason.SHUTDOWN
    assert offsets(window) == [0, 1]
    assert acc.deadline() is None


def test_shutdown_with_nothing_open_returns_none() -> None:
    acc = WindowAccumulator(max_messages=10, max_wait_s=10.0, clock=FakeClock())
    assert acc.close(CloseReason.SHUTDOWN) is None


def test_a_window_commits_past_its_last_offset_per_partition() -> None:
    acc = WindowAccumulator(max_messages=10, max_wait_s=10.0, clock=FakeClock())
    for offset, tp in ((4, TP0), (9, TP1), (5, TP0), (7, TP0), (10, TP1)):
        acc.add(item(offset, tp))
    window = acc.close(CloseReason.SHUTDOWN)
    assert window is not None
    assert window.committable() == {TP0: 8, TP1: 11}
