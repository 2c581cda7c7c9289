"""The local store of a state table: entries and offsets together, kept across reopening."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer.state import LocalStore, StateRecord, StoreCorrupt, StoreError, StoreLocked


def put(partition: int, offset: int, key: bytes, value: bytes | None, ts: int = 0) -> StateRecord:
    return StateRecord(partition, offset, key, value, ts)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    opened = LocalStore(tmp_path / "table.sqlite")
    yield opened
    opened.close()


def test_apply_puts_deletes_and_moves_offsets_at_once(store: LocalStore) -> None:
    store.apply([put(0, 0, b"a", b"1"), put(1, 0, b"b", b"2"), put(0, 1, b"c", b"3")])
    store.apply([put(0, 2, b"a", None), put(1, 1, b"b", b"22")])

    assert store.get(b"a") is None
    assert store.get(b"b") == b"22"
    assert store.get(b"c") == b"3"
    assert store.offsets() == {0: 3, 1: 2}


def test_the_last_record_of_a_key_in_one_batch_wins(store: LocalStore) -> None:
    store.apply([put(0, 0, b"a", b"1"), put(0, 1, b"a", None), put(0, 2, b"b", b"x")])
    store.apply([put(0, 3, b"b", None), put(0, 4, b"b", b"y")])

    assert store.get(b"a") is None
    assert store.get(b"b") == b"y"


def test_applying_a_record_again_changes_nothing(store: LocalStore) -> None:
    records = [put(0, 0, b"a", b"1", ts=5), put(0, 1, b"b", None)]
    store.apply(records)
    store.apply(records)

    assert store.get(b"a") == b"1"
    assert store.stats().entries == 1
    assert store.offsets() == {0: 2}


def test_a_local_write_does_not_move_offsets(store: LocalStore) -> None:
    store.apply([put(0, 0, b"a", b"1")])
    store.write(b"b", b"2", timestamp_ms=10)
    store.write(b"a", None, timestamp_ms=10)

    assert store.get(b"b") == b"2"
    assert store.get(b"a") is None
    assert store.offsets() == {0: 1}


def test_a_failed_transaction_leaves_entries_and_offsets_as_they_were(
    store: LocalStore,
) -> None:
    store.apply([put(0, 0, b"a", b"1")])
    unbindable = StateRecord(0, 2, b"c", object(), 0)  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        store.apply([put(0, 1, b"b", b"2"), unbindable])

    assert store.get(b"b") is None
    assert store.offsets() == {0: 1}


def test_reopening_keeps_entries_offsets_and_the_sync_mark(tmp_path: Path) -> None:
    path = tmp_path / "table.sqlite"
    store = LocalStore(path)
    store.apply([put(0, 7, b"a", b"1"), put(2, 3, b"b", b"2")])
    store.mark_synced(1_700_000_000_000)
    store.close()

    again = LocalStore(path)
    try:
        assert again.get(b"a") == b"1"
        assert again.get(b"b") == b"2"
        assert again.offsets() == {0: 8, 2: 4}
        assert again.synced_at_ms() == 1_700_000_000_000
    finally:
        again.close()


def test_a_new_store_is_empty_and_was_never_synced(store: LocalStore) -> None:
    assert store.offsets() == {}
    assert store.synced_at_ms() is None
    assert store.get(b"a") is None


def test_a_file_of_garbage_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "table.sqlite"
    path.write_bytes(b"this is not a database, just bytes " * 200)

    with pytest.raises(StoreCorrupt, match="not a usable state store"):
        LocalStore(path)
    path.unlink()  # what the table does (it moves the file aside), then it opens a new one:
    LocalStore(path).close()  # the failed open let go of the lock


def test_another_sqlite_database_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "table.sqlite"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE something (x INTEGER)")
    other.close()

    with pytest.raises(StoreCorrupt, match="not a state store of this version"):
        LocalStore(path)


def test_a_damaged_page_is_reported_as_corrupt_when_read(tmp_path: Path) -> None:
    path = tmp_path / "table.sqlite"
    store = LocalStore(path)
    store.apply([put(0, i, f"key-{i}".encode(), b"v" * 500) for i in range(200)])
    store.close()
    with sqlite3.connect(path) as db:  # fold the write-ahead log into the file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = bytearray(path.read_bytes())
    data[4096 * 2 : 4096 * 6] = b"\xff" * (4096 * 4)
    path.write_bytes(bytes(data))

    with pytest.raises(StoreCorrupt):
        damaged = LocalStore(path)
        try:
            for i in range(200):
                damaged.get(f"key-{i}".encode())
            damaged.stats()
        finally:
            damaged.close()


def test_a_second_process_cannot_open_the_same_store(store: LocalStore) -> None:
    with pytest.raises(StoreLocked, match=r"give each process its own state\.directory"):
        LocalStore(store.path)


def test_stats_count_entries_and_bytes_on_disk(store: LocalStore) -> None:
    store.apply([put(0, i, f"k{i}".encode(), b"x" * 100) for i in range(50)])
    store.apply([put(0, 50, b"k0", None)])

    stats = store.stats()
    assert stats.entries == 49
    assert stats.bytes >= 49 * 100


def test_keys_older_than_a_time_are_those_last_written_before_it(store: LocalStore) -> None:
    store.apply([put(0, 0, b"old", b"1", ts=100), put(0, 1, b"new", b"2", ts=300)])
    store.apply([put(0, 2, b"renewed", b"3", ts=100), put(0, 3, b"renewed", b"4", ts=400)])
    store.write(b"local", b"5", timestamp_ms=50)

    assert sorted(store.keys_older_than(200)) == [b"local", b"old"]
    assert store.keys_older_than(50) == []


def test_a_store_without_a_path_lives_in_memory_and_holds_no_lock(tmp_path: Path) -> None:
    """Live state (the replicas' limits): two stores in one process and no file anywhere."""
    first, second = LocalStore(None), LocalStore(None)
    try:
        first.apply([put(0, 0, b"a", b"1")])
        assert first.get(b"a") == b"1"
        assert second.get(b"a") is None
        assert first.offsets() == {0: 1}
        assert first.stats().entries == 1
        assert first.stats().bytes == 0
    finally:
        first.close()
        second.close()
    assert list(tmp_path.iterdir()) == []
