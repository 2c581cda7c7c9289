"""The replicas' limits told through a state table: what is told, what is counted."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from consumer.llm.peers import LimiterPeers
from consumer.state import StateTopicError


class RecordingTable:
    """A state table's put/delete/scan over a dict: what the peers wrote, and what they read."""

    topic = "group.llm-limits"

    def __init__(self, refuse: BaseException | None = None) -> None:
        self.entries: dict[bytes, bytes] = {}
        self.deleted: list[bytes] = []
        self.refuse = refuse
        self.running = False

    async def start(self) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.running = True

    async def stop(self) -> None:
        self.running = False

    def put(self, key: bytes, value: bytes) -> None:
        self.entries[key] = value

    def delete(self, key: bytes) -> None:
        self.entries.pop(key, None)
        self.deleted.append(key)

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        return sorted((k, v) for k, v in self.entries.items() if k.startswith(prefix))


class RecordingLimiter:
    """A limit, whether it was pressed and answered, and what it was told of the peers."""

    def __init__(self, limit: float, pressing: bool, answered: bool) -> None:
        self.limit = limit
        self.pressing = pressing
        self.answered = answered
        self.cuts = 0
        self.told: list[list[float]] = []
        self.answering: list[bool] = []
        self.cut: list[bool] = []

    def pressed_within(self, seconds: float) -> bool:
        return self.pressing

    def answered_within(self, seconds: float) -> bool:
        return self.answered

    def peers_told(self, limits: list[float], answering: bool = False, cut: bool = False) -> None:
        self.told.append(limits)
        self.answering.append(answering)
        self.cut.append(cut)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    table: RecordingTable,
    member: str,
    wall: Clock,
    limit: float = 4.0,
    pressing: bool = True,
    answered: bool = True,
    endpoint: str = "openai model-a",
) -> tuple[LimiterPeers, RecordingLimiter]:
    limiter = RecordingLimiter(limit, pressing, answered)
    return LimiterPeers(table, limiter, endpoint, member=member, wall_clock=wall), limiter


def test_a_replica_tells_its_limit_and_is_told_the_others_pressing() -> None:
    table, wall = RecordingTable(), Clock(1000.0)
    a, a_limiter = make(table, "a", wall, limit=4.0)
    b, b_limiter = make(table, "b", wall, limit=7.5)
    a.tick()
    b.tick()
    a.tick()
    assert a_limiter.told == [[], [7.5]]
    assert b_limiter.told == [[4.0]]
    told = orjson.loads(next(v for k, v in table.entries.items() if k.endswith(b"/a")))
    assert told == {
        "limit": 4.0,
        "pressing": True,
        "answered": True,
        "cuts": 0,
        "at_ms": 1_000_000,
    }


def test_a_replica_is_told_when_a_pressing_other_cut_since_the_last_tick() -> None:
    table, wall = RecordingTable(), Clock(1000.0)
    me, me_limiter = make(table, "me", wall)
    other, other_limiter = make(table, "other", wall)
    idle, idle_limiter = make(table, "idle", wall, pressing=False)
    for peers in (other, idle, me):
        peers.tick()
    other_limiter.cuts = idle_limiter.cuts = 3  # both cut since (the first read is no cut)
    for peers in (other, idle, me):
        peers.tick()
    me.tick()  # no cut since the last tick
    idle_limiter.cuts = 4  # a cut of one that does not press is not followed
    idle.tick()
    me.tick()
    assert me_limiter.cut == [False, True, False, False]


def test_a_replica_is_told_whether_any_other_is_answered_pressing_or_not() -> None:
    table, wall = RecordingTable(), Clock(1000.0)
    me, me_limiter = make(table, "me", wall, answered=False)
    starved, _ = make(table, "starved", wall, answered=False)
    starved.tick()
    me.tick()
    assert me_limiter.answering == [False]
    idle_but_answered, _ = make(table, "idle", wall, pressing=False, answered=True)
    idle_but_answered.tick()
    me.tick()
    assert me_limiter.answering == [False, True]
    assert me_limiter.told == [[4.0], [4.0]]  # the idle one is answered, not pressing


def test_replicas_not_pressing_stale_or_of_another_endpoint_are_not_counted() -> None:
    table, wall = RecordingTable(), Clock(1000.0)
    me, me_limiter = make(table, "me", wall)
    stale, _ = make(table, "stale", wall)
    stale.tick()
    wall.now += 5.0  # the stale one stopped telling 5 s ago (it died, or stalled)
    idle, _ = make(table, "idle", wall, pressing=False)  # its traffic does not fill its limit
    other_model, _ = make(table, "other", wall, endpoint="openai model-b")
    idle.tick()
    other_model.tick()
    me.tick()
    prefix = next(k for k in table.entries if k.endswith(b"/me")).removesuffix(b"me")
    table.put(prefix + b"garbage", b"not json")
    table.put(prefix + b"odd", orjson.dumps({"limit": "many", "pressing": True, "at_ms": 0}))
    me.tick()
    assert me_limiter.told == [[], []]


async def test_a_replica_that_stops_deletes_its_entry_and_stops_the_table() -> None:
    table, wall = RecordingTable(), Clock(1000.0)
    peers, limiter = make(table, "a", wall)
    peers.start()
    for _ in range(3):
        await asyncio.sleep(0)  # the table starts, then the first tick
    assert table.running
    assert len(table.entries) == 1
    assert limiter.told == [[]]
    await peers.stop()
    assert table.entries == {}
    assert len(table.deleted) == 1
    assert not table.running


async def test_a_table_that_cannot_start_is_a_warning_and_the_replica_runs_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused = StateTopicError("group.llm-limits has cleanup.policy=delete, not compact")
    table, wall = RecordingTable(refuse=refused), Clock(1000.0)
    peers, limiter = make(table, "a", wall)
    with caplog.at_level(logging.WARNING):
        peers.start()
        for _ in range(3):
            await asyncio.sleep(0)
    assert [r.message for r in caplog.records] == [
        "cannot share the provider with the other replicas: each runs its own limit"
    ]
    assert table.entries == {}
    assert limiter.told == []  # never told anything: it runs on its own limit
    await peers.stop()
    assert table.deleted == []
