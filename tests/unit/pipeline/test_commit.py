"""Commit step: offsets of delivered windows, merged, forward only, one commit at a time."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import CommitFailedError, KafkaConnectionError

from consumer.pipeline.commit import CommitStep, OffsetTracker
from consumer.pipeline.encode import EncodedWindow
from consumer.pipeline.enrich import EnrichedWindow
from consumer.pipeline.protocol import Deadline, Wakeup
from consumer.records import TopicPartition
from consumer.retry import Backoff
from tests.unit.pipeline.recording import (
    TP0,
    TP1,
    FakeClock,
    FakeEvents,
    Recording,
    RecordingSleep,
    ScriptedClock,
    fixed_rng,
    row_item,
    spin,
    turns,
    window,
)

BACKOFF = Backoff(0.5, 30.0, fixed_rng)
Offsets = dict[TopicPartition, int]


def delivered(*offsets: tuple[TopicPartition, int]) -> EncodedWindow:
    items = [row_item(offset, tp=tp) for tp, offset in offsets]
    return EncodedWindow(EnrichedWindow(window(*items), [None] * len(items), 0.0), [])


class FakeCommitter:
    """Commits offsets; `gated` makes each commit wait for `release()`; `errors` fail in turn."""

    def __init__(self, *, gated: bool = False) -> None:
        self.gated = gated
        self.calls: list[Offsets] = []
        self.committed: Offsets = {}
        self.errors: list[BaseException] = []
        self._gates: list[asyncio.Event] = []

    async def commit(self, offsets: Offsets) -> None:
        self.calls.append(dict(offsets))
        if self.gated:
            gate = asyncio.Event()
            self._gates.append(gate)
            await gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        self.committed.update(offsets)

    def release(self) -> None:
        for gate in self._gates:
            gate.set()
        self._gates.clear()


class Harness:
    def __init__(self, *, gated: bool = False) -> None:
        self.committer = FakeCommitter(gated=gated)
        self.events = FakeEvents()
        self.next: Recording[EncodedWindow] = Recording()
        self.sleep = RecordingSleep()
        self.clock = FakeClock()
        self.step = CommitStep(
            self.committer,
            self.events,
            self.next,
            Wakeup(),
            BACKOFF,
            sleep=self.sleep,
            clock=self.clock,
        )

    async def settle(self) -> None:
        await turns()
        self.step.poll()


def test_offsets_merge_per_partition_and_only_what_moved_is_committable() -> None:
    tracker = OffsetTracker()
    tracker.advance({TP0: 5})
    tracker.advance({TP0: 8, TP1: 2})
    assert tracker.committable() == {TP0: 8, TP1: 2}
    tracker.committed({TP0: 8, TP1: 2})
    assert tracker.committable() == {}
    tracker.advance({TP1: 4})
    assert tracker.committable() == {TP1: 4}
    tracker.advance({TP1: 4})  # the same offset again is no move
    assert tracker.committable() == {TP1: 4}


def test_an_offset_that_goes_back_is_refused_as_out_of_order() -> None:
    tracker = OffsetTracker()
    tracker.advance({TP0: 8})
    with pytest.raises(ValueError, match="went back from 8 to 5"):
        tracker.advance({TP0: 5})


def test_a_commit_never_moves_the_committed_offset_back() -> None:
    tracker = OffsetTracker()
    tracker.advance({TP0: 8})
    tracker.committed({TP0: 8})
    tracker.committed({TP0: 3})
    assert tracker.committable() == {}


async def test_a_delivered_window_is_forwarded_only_once_a_commit_covering_it_succeeded() -> None:
    h = Harness(gated=True)
    w = delivered((TP0, 0), (TP0, 1), (TP1, 7))
    h.step.submit(w)
    await turns()
    assert h.committer.calls == [{TP0: 2, TP1: 8}]
    h.step.poll()
    assert h.next.submitted == []  # not before the commit succeeded
    h.committer.release()
    await h.settle()
    assert h.next.submitted == [w]
    assert h.events.advanced == [TP0, TP1]
    assert len(h.events.commit_seconds) == 1


async def test_one_commit_runs_at_a_time_and_windows_delivered_meanwhile_join_the_next() -> None:
    h = Harness(gated=True)
    first = delivered((TP0, 0), (TP0, 1))
    second = delivered((TP0, 2), (TP0, 3))
    third = delivered((TP1, 0))
    h.step.submit(first)
    await turns()
    h.step.submit(second)
    h.step.submit(third)
    await h.settle()
    assert h.committer.calls == [{TP0: 2}]
    h.committer.release()
    await h.settle()
    assert h.next.submitted == [first]
    await turns()
    assert h.committer.calls == [{TP0: 2}, {TP0: 4, TP1: 1}]  # merged into one
    h.committer.release()
    await h.settle()
    assert h.next.submitted == [first, second, third]
    assert h.committer.committed == {TP0: 4, TP1: 1}


async def test_a_failed_commit_waits_the_backoff_and_is_retried_with_the_next_no_loss() -> None:
    h = Harness()
    h.committer.errors = [CommitFailedError(), KafkaConnectionError()]
    first = delivered((TP0, 0))
    second = delivered((TP0, 1), (TP1, 0))
    h.step.submit(first)
    await turns()
    h.step.submit(second)  # delivered while the first commit fails
    await spin(lambda: len(h.next.submitted) == 2, poll=h.step.poll)
    assert h.committer.calls == [{TP0: 1}, {TP0: 2, TP1: 1}, {TP0: 2, TP1: 1}]
    assert h.sleep.delays == [BACKOFF.delay(1), BACKOFF.delay(2)] == [0.5, 1.0]
    assert h.next.submitted == [first, second]  # in order, each once
    assert h.committer.committed == {TP0: 2, TP1: 1}
    assert h.events.advanced == [TP0, TP1]


async def test_after_a_successful_commit_the_backoff_starts_again_from_the_first_delay() -> None:
    h = Harness()
    h.committer.errors = [CommitFailedError()]
    h.step.submit(delivered((TP0, 0)))
    await spin(lambda: len(h.next.submitted) == 1, poll=h.step.poll)
    h.committer.errors = [CommitFailedError()]
    h.step.submit(delivered((TP0, 1)))
    await spin(lambda: len(h.next.submitted) == 2, poll=h.step.poll)
    assert h.sleep.delays == [0.5, 0.5]


async def test_an_error_that_is_not_a_kafka_error_is_a_bug_and_raised_from_poll() -> None:
    h = Harness()
    h.committer.errors = [RuntimeError("a bug")]
    h.step.submit(delivered((TP0, 0)))
    await turns()
    with pytest.raises(RuntimeError, match="a bug"):
        h.step.poll()


async def test_a_window_that_goes_back_in_offsets_is_refused() -> None:
    h = Harness()
    h.step.submit(delivered((TP0, 5)))
    with pytest.raises(ValueError, match="out of order"):
        h.step.submit(delivered((TP0, 3)))


async def test_join_waits_for_the_last_commit_forwards_its_windows_then_joins_the_next() -> None:
    h = Harness(gated=True)
    first, second = delivered((TP0, 0)), delivered((TP0, 1))
    h.step.submit(first)
    await turns()
    h.step.submit(second)
    h.step.close()
    assert h.next.closes == 1
    join = asyncio.ensure_future(h.step.join(Deadline(3600.0, FakeClock())))
    await turns()
    assert not join.done()
    h.committer.release()  # the first commit
    await turns()
    assert not join.done()  # the second, with `second`'s offsets, runs now
    h.committer.release()
    await asyncio.wait_for(join, timeout=5.0)
    assert h.next.submitted == [first, second]
    assert h.committer.committed == {TP0: 2}
    assert h.next.events[-1] == "join"


async def test_join_retries_a_failed_commit_within_the_deadline() -> None:
    h = Harness()
    h.committer.errors = [CommitFailedError()]
    w = delivered((TP0, 0))
    h.step.submit(w)
    await asyncio.wait_for(h.step.join(Deadline(3600.0, FakeClock())), timeout=5.0)
    assert h.next.submitted == [w]
    assert len(h.committer.calls) == 2


async def test_join_gives_up_at_the_deadline_leaving_the_commit_for_terminate() -> None:
    h = Harness(gated=True)
    h.step.submit(delivered((TP0, 0)))
    # 5 s at construction, 5 s left at the first look, none at the next.
    deadline = Deadline(5.0, ScriptedClock(0.0, 0.0, 10.0))
    await asyncio.wait_for(h.step.join(deadline), timeout=5.0)
    assert h.next.submitted == []
    assert h.next.joins == 1
    h.step.terminate()
    await turns()
    h.committer.release()
    await h.settle()
    assert h.next.submitted == []
    assert h.next.terminates == 1


async def test_terminate_cancels_the_commit_and_drops_the_uncommitted_windows() -> None:
    h = Harness(gated=True)
    h.step.submit(delivered((TP0, 0)))
    await turns()
    h.step.submit(delivered((TP0, 1)))
    h.step.terminate()
    await turns()
    h.step.poll()
    assert h.next.submitted == []
    assert h.committer.committed == {}
    assert h.events.advanced == []
    assert len(h.committer.calls) == 1  # nothing more is committed after terminate
