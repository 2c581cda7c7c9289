"""Provider, broker and partition health: thresholds on an injected clock, no Kafka or HTTP."""

from __future__ import annotations

import asyncio

import pytest

from consumer.observability.health import BrokerHealth, PartitionProgress, ProviderHealth
from consumer.records import TopicPartition


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_provider_failures_become_failing_only_after_the_threshold() -> None:
    clock = _Clock()
    provider = ProviderHealth(failing_after_s=2.0, clock=clock)
    assert provider.failing() is None
    provider.record_failure("rate_limited")
    clock.now += 1.9
    provider.record_failure("server_error")
    assert provider.failing() is None
    clock.now += 1.3
    assert provider.failing() == "LLM provider failing for 3.2 s: server_error"


def test_one_provider_success_clears_failing_at_once_and_is_counted() -> None:
    clock = _Clock()
    provider = ProviderHealth(failing_after_s=2.0, clock=clock)
    provider.record_success()
    provider.record_failure("timeout")
    clock.now += 5
    assert provider.failing() is not None
    before = provider.successes
    provider.record_success()
    assert provider.failing() is None
    assert provider.successes == before + 1 == 2
    provider.record_failure("timeout")  # a new run of failures starts its own clock
    clock.now += 1
    assert provider.failing() is None


def test_the_broker_is_unreachable_after_failures_without_a_success() -> None:
    clock = _Clock()
    broker = BrokerHealth(unreachable_after_s=3.0, clock=clock)
    assert broker.unreachable() is None
    clock.now += 1
    broker.record_error("metadata probe", "connection refused")
    assert broker.unreachable() is None  # 1 s since start: not yet
    clock.now += 2.5
    reason = "broker unreachable for 3.5 s: metadata probe: connection refused"
    assert broker.unreachable() == reason
    broker.record_ok()
    assert broker.unreachable() is None


def test_one_broker_error_among_successes_is_not_an_outage() -> None:
    clock = _Clock()
    broker = BrokerHealth(unreachable_after_s=3.0, clock=clock)
    clock.now += 10
    broker.record_ok()
    broker.record_error("produce", "NotLeaderForPartitionError")
    clock.now += 2.9
    assert broker.unreachable() is None
    broker.record_ok()
    clock.now += 10
    assert broker.unreachable() is None  # the latest operation worked


async def test_a_probe_that_hangs_or_raises_is_an_error_and_a_later_answer_clears_it() -> None:
    clock = _Clock()
    broker = BrokerHealth(unreachable_after_s=3.0, clock=clock)

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def refuses() -> None:
        raise ConnectionRefusedError("connection refused")

    async def answers() -> set[str]:
        return {"in"}

    clock.now += 5
    assert not await broker.probe(hangs, timeout_s=0.01)
    assert broker.unreachable() == (
        "broker unreachable for 5.0 s: metadata probe: no answer within 0.01 s"
    )
    assert not await broker.probe(refuses, timeout_s=1.0)
    assert "metadata probe: connection refused" in str(broker.unreachable())
    assert await broker.probe(answers, timeout_s=1.0)
    assert broker.unreachable() is None


async def test_the_probe_loop_probes_every_interval() -> None:
    broker = BrokerHealth(clock=_Clock())
    calls: list[str] = []
    sleeps: list[float] = []

    async def check() -> None:
        calls.append("probe")

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await broker.run_probe(check, interval_s=1.5, timeout_s=1.0, sleep=sleep)
    assert calls == ["probe"] * 3
    assert sleeps == [1.5] * 3


def test_a_partition_with_lag_and_no_progress_is_stuck_after_the_threshold() -> None:
    clock = _Clock()
    progress = PartitionProgress(stuck_after_s=120.0, clock=clock)
    p0, p1, p2 = (TopicPartition("in", p) for p in range(3))
    progress.advanced(p0)
    progress.advanced(p1)
    clock.now += 60
    progress.advanced(p1)  # p1 moves on; p0 does not; p2 never did and is first seen now
    assert progress.stuck({p0: 5, p1: 5, p2: 5}) == []
    clock.now += 60
    assert progress.stuck({p0: 5, p1: 5, p2: 5}) == [p0]
    clock.now += 60
    assert progress.stuck({p0: 5, p1: 5, p2: 5}) == [p0, p1, p2]
    progress.advanced(p0)
    assert progress.stuck({p0: 5, p1: 5, p2: 5}) == [p1, p2]


def test_a_partition_without_lag_is_never_stuck_and_its_wait_starts_when_lag_appears() -> None:
    clock = _Clock()
    progress = PartitionProgress(stuck_after_s=120.0, clock=clock)
    p0 = TopicPartition("in", 0)
    progress.advanced(p0)
    clock.now += 1000
    assert progress.stuck({p0: 0}) == []  # idle at the end of the partition
    clock.now += 10
    assert progress.stuck({p0: 3}) == []  # a message arrived after a long quiet: not stuck yet
    clock.now += 119
    assert progress.stuck({p0: 3}) == []
    clock.now += 1
    assert progress.stuck({("in", 0): 3}) == [p0]  # plain tuples work too


def test_reset_forgets_partitions_on_revocation() -> None:
    clock = _Clock()
    progress = PartitionProgress(stuck_after_s=10.0, clock=clock)
    p0 = TopicPartition("in", 0)
    assert progress.stuck({p0: 1}) == []
    clock.now += 10
    assert progress.stuck({p0: 1}) == [p0]
    progress.reset()
    assert progress.stuck({p0: 1}) == []  # assigned again: its wait starts over


def test_a_failure_streak_is_undecided_until_it_counts_or_a_success_ends_it() -> None:
    now = [0.0]
    health = ProviderHealth(failing_after_s=2.0, clock=lambda: now[0])
    assert health.undecided_for_s() == 0.0  # nothing failing: decided (up)
    health.record_failure("server_error")
    now[0] = 0.5
    assert health.undecided_for_s() == 1.5
    now[0] = 2.5
    assert health.undecided_for_s() == 0.0 and health.failing() is not None  # decided: down
    health.record_success()
    assert health.undecided_for_s() == 0.0 and health.failing() is None
