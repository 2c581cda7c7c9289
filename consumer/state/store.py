"""The local half of a global table: one SQLite file with the entries and the offsets read.

Entries and offsets change in one transaction, so after a crash the file says exactly what it
has applied and a restart reads only the records after those offsets. SQLite comes with Python
and is fast enough here: bench/state_store.py measures it against LMDB and RocksDB.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1

# The page cache SQLite may keep, in KiB: enough for the key index of about a million entries,
# so that writes in random key order do not re-read index pages from disk.
_CACHE_KIB = 65_536
# Pages in the write-ahead log before they are copied into the file. Ten times SQLite's default:
# a catch-up rewrites the same index pages again and again, and copies each of them once per
# checkpoint rather than once per transaction (measured in bench/state_store.py).
_CHECKPOINT_PAGES = 10_000

_SCHEMA = (
    # A rowid table with a unique key: entries of a few hundred bytes are appended to the table
    # in order and only the key index is updated in random order (a WITHOUT ROWID table puts
    # whole entries in key order, which is several times slower to write for entries this size).
    "CREATE TABLE entries (key BLOB NOT NULL UNIQUE, value BLOB NOT NULL,"
    " timestamp_ms INTEGER NOT NULL)",
    "CREATE TABLE offsets (partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL)",
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
_CORRUPT = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})


@dataclass(frozen=True)
class StateRecord:
    """One record of a state topic as the store applies it; value None is a tombstone."""

    partition: int
    offset: int
    key: bytes
    value: bytes | None
    timestamp_ms: int


@dataclass(frozen=True)
class StoreStats:
    entries: int
    bytes: int  # the file and its write-ahead log, on disk


class StoreError(Exception):
    """The local store cannot be used; the message says what to do about it."""


class StoreCorrupt(StoreError):
    """The file is not a usable store: it can be moved aside and rebuilt from the topic."""


class StoreLocked(StoreError):
    """Another process holds the store: two readers of one file would undo each other's work."""


class LocalStore:
    """One SQLite file per table: the entries, and the next offset to read per partition.

    With no path, an in-memory database: for live state that is worth nothing after the
    process (the limits replicas tell each other), read whole from its topic at every start.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = _Lock(None)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _lock(path)
        try:
            self._db = sqlite3.connect(":memory:" if path is None else path, isolation_level=None)
        except sqlite3.Error as error:
            self._lock.close()
            raise StoreError(f"cannot open the state store {path}: {error}") from error
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    def _prepare(self) -> None:
        with self._errors():
            self._db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL syncs at checkpoints only: a power cut may lose the last
            # transactions, never consistency, and whatever it loses is read again from the topic.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_schema")}
            if version == 0 and not tables:
                with self._transaction():
                    for statement in _SCHEMA:
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StoreCorrupt(
                    f"{self.path} is not a state store of this version (schema {version}, "
                    f"expected {SCHEMA_VERSION})"
                )

    def get(self, key: bytes) -> bytes | None:
        with self._errors():
            row = self._db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def apply(self, records: Sequence[StateRecord]) -> None:
        """Puts, deletes and the new next offsets of records read from the topic, at once.

        Only the last record of a key counts (a key lives in one partition, so that is the
        newest); applying a record again leaves the store as it was.
        """
        if not records:
            return
        latest: dict[bytes, StateRecord] = {}
        next_offsets: dict[int, int] = {}
        for record in records:
            latest[record.key] = record
            next_offsets[record.partition] = max(
                next_offsets.get(record.partition, 0), record.offset + 1
            )
        puts = [(r.key, r.value, r.timestamp_ms) for r in latest.values() if r.value is not None]
        deletes = [(r.key,) for r in latest.values() if r.value is None]
        with self._errors(), self._transaction():
            self._db.executemany(_UPSERT, puts)
            self._db.executemany("DELETE FROM entries WHERE key = ?", deletes)
            self._db.executemany(
                "INSERT INTO offsets (partition, next_offset) VALUES (?, ?) ON CONFLICT "
                "(partition) DO UPDATE SET next_offset = excluded.next_offset",
                next_offsets.items(),
            )

    def write(self, key: bytes, value: bytes | None, timestamp_ms: int) -> None:
        """A write of this process, before it comes back from the topic: no offset moves."""
        with self._errors():
            if value is None:
                self._db.execute("DELETE FROM entries WHERE key = ?", (key,))
            else:
                self._db.execute(_UPSERT, (key, value, timestamp_ms))

    def offsets(self) -> dict[int, int]:
        with self._errors():
            rows = self._db.execute("SELECT partition, next_offset FROM offsets").fetchall()
        return {int(partition): int(offset) for partition, offset in rows}

    def synced_at_ms(self) -> int | None:
        """When the store was last known to hold the whole topic (wall clock), if ever."""
        with self._errors():
            row = self._db.execute("SELECT value FROM meta WHERE name = 'synced_at_ms'").fetchone()
        return None if row is None else int(row[0])

    def mark_synced(self, at_ms: int) -> None:
        with self._errors():
            self._db.execute(
                "INSERT INTO meta (name, value) VALUES ('synced_at_ms', ?) ON CONFLICT (name) "
                "DO UPDATE SET value = excluded.value",
                (at_ms,),
            )

    def stats(self) -> StoreStats:
        with self._errors():
            entries = int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
        size = 0
        for suffix in ("", "-wal") if self.path is not None else ():
            with contextlib.suppress(FileNotFoundError):
                size += os.stat(f"{self.path}{suffix}").st_size
        return StoreStats(entries=entries, bytes=size)

    def keys_older_than(self, timestamp_ms: int) -> list[bytes]:
        """Keys last written before `timestamp_ms` (record time): what a purge tombstones.

        A full scan: purges are rare, and an index on time would slow every write.
        """
        with self._errors():
            rows = self._db.execute(
                "SELECT key FROM entries WHERE timestamp_ms < ?", (timestamp_ms,)
            ).fetchall()
        return [bytes(row[0]) for row in rows]

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Entries whose key starts with `prefix` (a range on the key index): the spend ledger
        sums every replica's entries of a period."""
        upper = _after_prefix(prefix)
        query = "SELECT key, value FROM entries WHERE key >= ?"
        args: tuple[bytes, ...] = (prefix,)
        if upper is not None:
            query += " AND key < ?"
            args = (prefix, upper)
        with self._errors():
            rows = self._db.execute(query, args).fetchall()
        return [(bytes(key), bytes(value)) for key, value in rows]

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._lock.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors as StoreCorrupt (the file is damaged) or StoreError (anything else)."""
        try:
            yield
        except sqlite3.DatabaseError as error:
            if getattr(error, "sqlite_errorname", None) in _CORRUPT:
                raise StoreCorrupt(f"{self.path} is not a usable state store: {error}") from error
            raise StoreError(f"state store {self.path}: {error}") from error


_UPSERT = (
    "INSERT INTO entries (key, value, timestamp_ms) VALUES (?, ?, ?) ON CONFLICT (key) "
    "DO UPDATE SET value = excluded.value, timestamp_ms = excluded.timestamp_ms"
)


class _Lock:
    def __init__(self, handle: int | None) -> None:
        self._handle: int | None = handle

    def close(self) -> None:
        if self._handle is not None:
            os.close(self._handle)  # closing the descriptor releases the lock
            self._handle = None


def _lock(path: Path) -> _Lock:
    """Hold `<path>.lock` for the life of the store, or say which process holds it."""
    lock_path = path.with_name(path.name + ".lock")
    handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(handle, 32).decode(errors="replace").strip() or "unknown"
        os.close(handle)
        raise StoreLocked(
            f"the state store {path} is in use by another process (pid {holder}); give each "
            "process its own state.directory"
        ) from None
    os.ftruncate(handle, 0)
    os.write(handle, str(os.getpid()).encode())
    return _Lock(handle)


def _after_prefix(prefix: bytes) -> bytes | None:
    """The smallest key above every key starting with `prefix` (None: there is none)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])
