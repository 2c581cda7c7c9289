"""A global table on the real broker: replicas share entries through the compacted topic, a
restart reads only what is new, and a bad topic, a bad file or no broker are handled."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from consumer.config import KafkaSettings, StateSettings
from consumer.state import (
    GlobalTable,
    LocalStore,
    StateTopicError,
    StateUnavailable,
    StoreCorrupt,
)
from tests.support.kafka_broker import free_port
from tests.support.pipeline import create_topics, end_offsets

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WAIT_S = 10.0


def kafka(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        input_topic="unused.in",
        output_topic="unused.out",
        group_id="-",
    )


def state_topic() -> str:
    return f"it-state-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def running(
    bootstrap: str, topic: str, directory: Path, **state: float
) -> AsyncIterator[GlobalTable]:
    settings = StateSettings(directory=directory, **state)  # type: ignore[arg-type]
    table = GlobalTable.from_settings(kafka(bootstrap), settings, topic)
    await table.start()
    try:
        yield table
    finally:
        await table.stop()


async def eventually(check: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_two_replicas_see_each_others_writes_and_deletes(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = state_topic()
    async with (
        running(kafka_bootstrap, topic, tmp_path / "a") as a,
        running(kafka_bootstrap, topic, tmp_path / "b") as b,
    ):
        a.put(b"from-a", b"1")
        b.put(b"from-b", b"2")
        assert a.get(b"from-a") == b"1"  # a replica reads its own write at once
        assert await eventually(lambda: b.get(b"from-a") == b"1")
        assert await eventually(lambda: a.get(b"from-b") == b"2")

        b.delete(b"from-a")
        assert b.get(b"from-a") is None
        assert await eventually(lambda: a.get(b"from-a") is None)
        assert await a.flush() == 0
        assert await b.flush() == 0


async def test_a_replica_keeps_its_newest_write_while_older_ones_come_back(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = state_topic()
    async with (
        running(kafka_bootstrap, topic, tmp_path / "a") as a,
        running(kafka_bootstrap, topic, tmp_path / "b") as b,
    ):
        seen: list[bytes | None] = []
        for _ in range(200):  # a running total, read-modify-write like a spend counter
            current = a.get(b"spend")
            seen.append(current)
            a.put(b"spend", str(int(current or b"0") + 1).encode())
            await asyncio.sleep(0.005)  # let older writes come back in between
        assert await a.flush() == 0
        await a.catch_up(WAIT_S)

        assert a.get(b"spend") == b"200"
        assert seen == [None, *(str(n).encode() for n in range(1, 200))]
        assert (await b.catch_up(WAIT_S)).complete
        assert b.get(b"spend") == b"200"


async def test_catch_up_on_start_makes_a_dead_members_writes_visible(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = state_topic()
    async with running(kafka_bootstrap, topic, tmp_path / "dead") as dead:
        for i in range(300):
            dead.put(f"k{i}".encode(), f"v{i}".encode())
        assert await dead.flush() == 0

    async with running(kafka_bootstrap, topic, tmp_path / "heir") as heir:
        caught = await heir.catch_up(WAIT_S)
        assert caught.complete
        assert caught.lag == 0
        assert caught.records == 300
        assert all(heir.get(f"k{i}".encode()) == f"v{i}".encode() for i in range(300))
        assert heir.stats().entries == 300


async def test_a_restart_reads_only_what_is_new(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = state_topic()
    async with running(kafka_bootstrap, topic, tmp_path / "a") as a:
        for i in range(500):
            a.put(f"k{i}".encode(), b"v")
        assert await a.flush() == 0
        assert (await a.catch_up(WAIT_S)).records == 500  # its own writes, read back

    async with running(kafka_bootstrap, topic, tmp_path / "a") as a:
        again = await a.catch_up(WAIT_S)
        assert (again.complete, again.records, again.lag) == (True, 0, 0)
        assert a.stats().entries == 500

    async with running(kafka_bootstrap, topic, tmp_path / "b") as b:
        for i in range(7):
            b.put(f"new{i}".encode(), b"w")
        b.delete(b"k0")
        assert await b.flush() == 0

    async with running(kafka_bootstrap, topic, tmp_path / "a") as a:
        assert (await a.catch_up(WAIT_S)).records == 8
        assert a.get(b"new6") == b"w"
        assert a.get(b"k0") is None
        assert a.stats().entries == 506


async def test_a_topic_that_is_not_compacted_is_refused(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = state_topic()
    await create_topics(kafka_bootstrap, [topic], partitions=1)  # cleanup.policy=delete

    table = GlobalTable.from_settings(
        kafka(kafka_bootstrap), StateSettings(directory=tmp_path), topic
    )
    with pytest.raises(StateTopicError, match=rf"{topic} has cleanup.policy=delete"):
        await table.start()
    await table.stop()


async def test_a_corrupt_store_file_is_moved_aside_and_rebuilt(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = state_topic()
    async with running(kafka_bootstrap, topic, tmp_path) as table:
        for i in range(400):
            table.put(f"k{i}".encode(), f"v{i}".encode())
        table.delete(b"k0")
        assert await table.flush() == 0
        path = table.store_path
    for leftover in path.parent.glob(path.name + "-*"):
        leftover.unlink()
    path.write_bytes(b"\x00garbage, not SQLite\x00" * 1000)

    async with running(kafka_bootstrap, topic, tmp_path) as table:
        rebuilt = await table.catch_up(WAIT_S)
        assert rebuilt.complete
        assert rebuilt.records == 401
        assert table.stats().entries == 399
        assert table.get(b"k1") == b"v1"
        assert table.get(b"k0") is None
    assert len(await asyncio.to_thread(lambda: list(tmp_path.glob(path.name + ".corrupt-*")))) == 1


async def test_a_store_found_corrupt_while_running_is_rebuilt_and_reads_miss_meanwhile(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = state_topic()
    async with running(kafka_bootstrap, topic, tmp_path) as table:
        for i in range(100):
            table.put(f"k{i}".encode(), f"v{i}".encode())
        assert await table.flush() == 0
        assert (await table.catch_up(WAIT_S)).complete
        real_get = LocalStore.get
        failed = []

        def damaged_once(store: LocalStore, key: bytes) -> bytes | None:
            if not failed:  # a page turns out damaged on the first read
                failed.append(key)
                raise StoreCorrupt(f"{store.path} is not a usable state store: malformed")
            return real_get(store, key)

        monkeypatch.setattr(LocalStore, "get", damaged_once)

        assert table.get(b"k1") is None  # a miss, never an exception
        assert await eventually(lambda: table.stats().records_read == 200)  # read again
        assert table.stats().entries == 100
        assert table.get(b"k1") == b"v1"
    assert len(await asyncio.to_thread(lambda: list(tmp_path.glob("*.corrupt-*")))) == 1


async def test_flush_returns_once_the_broker_has_every_write(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = state_topic()
    async with running(kafka_bootstrap, topic, tmp_path) as table:
        for i in range(1000):
            table.put(f"k{i}".encode(), b"x" * 200)
        assert await table.flush() == 0
        assert sum((await end_offsets(kafka_bootstrap, topic)).values()) == 1000
        assert table.stats().pending_writes == 0


async def test_a_write_the_broker_refuses_is_counted_never_raised(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = state_topic()
    async with running(kafka_bootstrap, topic, tmp_path) as table:
        table.put(b"huge", b"x" * 5_000_000)  # over the producer's max_request_size
        table.put(b"fine", b"y")
        assert await table.flush() == 1
        assert await table.flush() == 0
        assert table.stats().write_failures == 1
        assert table.get(b"huge") is not None  # kept locally, though no other replica has it
        assert await eventually(lambda: table.stats().records_read == 1)


async def test_an_unreachable_broker_is_a_clear_error_in_bounded_time(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    settings = kafka(bootstrap).model_copy(update={"connect_timeout_s": 2.0})
    table = GlobalTable.from_settings(settings, StateSettings(directory=tmp_path), state_topic())
    started = time.monotonic()
    with pytest.raises(StateUnavailable, match=rf"cannot reach the Kafka brokers at {bootstrap}"):
        await table.start()
    assert time.monotonic() - started < 5.0
    assert not await asyncio.to_thread(lambda: list(tmp_path.iterdir()))  # no store was opened
