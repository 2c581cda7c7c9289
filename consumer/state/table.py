"""A global table: a compacted topic that every replica reads into its own local store.

Kafka Streams' global table on the broker we already run: the topic is the truth, shared by
every replica and surviving all of them; the local store makes reads free and remembers the
offsets it has read, so a restart reads only what is new. Writes go to the local store at once
(this replica reads its own writes) and to the topic without waiting (other replicas see them
with their next fetch). The cache, the spend budget and the batch registry are tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    UnknownTopicOrPartitionError,
    for_code,
)

from consumer.config import ConfigError, KafkaSettings, StateSettings
from consumer.kafka.clients import build_producer, connection_options
from consumer.retry import Backoff
from consumer.state.store import LocalStore, StateRecord, StoreCorrupt, StoreError

log = logging.getLogger(__name__)

# Records applied per store transaction: each batch holds the event loop for a few ms at most.
_READ_BATCH = 500
_POLL_MS = 200
# How often a caught-up reader notes that in the store (see _check_store).
_SYNC_MARK_S = 60.0
_TOPIC_EXISTS = 36
_RETRY = Backoff(0.2, 2.0)


class StateTopicError(ConfigError):
    """The state topic cannot hold a table: wrong cleanup.policy, or the broker refused it."""


class StateUnavailable(Exception):
    """The brokers could not be reached in time to start a table."""


@dataclass(frozen=True)
class CatchUp:
    """One catch-up: how long it took, records applied, whether it reached the end it aimed
    at, and how many records it was short of that end when it stopped."""

    seconds: float
    records: int
    complete: bool
    lag: int


@dataclass(frozen=True)
class TableStats:
    entries: int
    bytes: int
    writes: int
    write_failures: int
    pending_writes: int  # produced, not yet acknowledged
    records_read: int
    lag: int  # records behind the end of the topic, as of the last fetch
    last_catch_up: CatchUp | None


@dataclass
class _Own:
    """The latest write of this process to one key, until the reader has gone past it."""

    value: bytes | None
    partition: int | None = None
    offset: int | None = None  # known once the broker acknowledged it
    newer: StateRecord | None = None  # a different value read before the acknowledgement


class GlobalTable:
    """A compacted topic that every replica reads into its LocalStore; writes go to both."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        store_path: Path | None,
        *,
        partitions: int = 3,
        replication_factor: int | None = None,
        topic_configs: Mapping[str, str] | None = None,
        start_timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.topic = topic
        self.store_path = store_path
        self._kafka = kafka
        self._partitions = partitions
        self._replication_factor = replication_factor
        # compact by default; "compact,delete" (with retention.ms) for entries that expire.
        self._topic_configs = {"cleanup.policy": "compact", **(topic_configs or {})}
        # How long start() tries to reach the brokers: as long as the consumer does by default.
        self._start_timeout_s = start_timeout_s or kafka.connect_timeout_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._store: LocalStore | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._positions: dict[TopicPartition, int] = {}
        self._advanced = asyncio.Event()
        self._own: dict[bytes, _Own] = {}
        self._outbox: asyncio.Queue[tuple[bytes, _Own]] = asyncio.Queue()
        self._queued = 0
        self._handed = 0
        self._handed_event = asyncio.Event()
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._writes = 0
        self._write_failures = 0
        self._failures_since_flush = 0
        self._records_read = 0
        self._rebuild_reason: str | None = None
        self._last_catch_up: CatchUp | None = None
        self._synced_mark_at: float | None = None

    @classmethod
    def from_settings(
        cls,
        kafka: KafkaSettings,
        state: StateSettings,
        topic: str,
        *,
        topic_configs: Mapping[str, str] | None = None,
    ) -> GlobalTable:
        """A table whose store is `<state.directory>/<topic>.sqlite`."""
        return cls(
            kafka,
            topic,
            state.directory / f"{topic}.sqlite",
            partitions=state.partitions,
            replication_factor=state.replication_factor,
            topic_configs=topic_configs,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Ensure the topic, open the store, and start reading and writing.

        Raises StateTopicError for a topic that is not compacted, StateUnavailable when the
        brokers do not answer in time, StoreLocked when another process uses
        the store file. A corrupt store file is moved aside and rebuilt from the topic.
        """
        if self._store is not None:
            raise RuntimeError(f"state table {self.topic} is already started")
        delete_retention_ms, beginnings, ends = await self._connect()
        assert self._consumer is not None
        try:
            self._store = self._open_store()
            self._check_store(ends, delete_retention_ms)
            offsets = self._store.offsets()
            self._positions = {
                tp: max(offsets.get(tp.partition, 0), beginning)
                for tp, beginning in beginnings.items()
            }
            for tp, position in self._positions.items():
                self._consumer.seek(tp, position)
        except BaseException:
            await self.stop()
            raise
        self._tasks = [
            asyncio.create_task(self._read_forever(), name=f"state-read-{self.topic}"),
            asyncio.create_task(self._send_forever(), name=f"state-send-{self.topic}"),
        ]
        log.info(
            "state table started",
            extra={
                "topic": self.topic,
                "store": str(self.store_path or "memory"),
                "partitions": len(self._positions),
                "entries": self._store.stats().entries,
                "lag": self._lag(ends),
            },
        )

    async def stop(self, flush_timeout_s: float = 10.0) -> None:
        """Flush what was written (for at most `flush_timeout_s`), then close everything."""
        if self._producer is not None and self._tasks:
            try:
                async with asyncio.timeout(flush_timeout_s):
                    await self.flush()
            except TimeoutError:
                log.warning(
                    "state table stopped with writes not acknowledged",
                    extra={"topic": self.topic, "pending": self.stats().pending_writes},
                )
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        producer, self._producer = self._producer, None
        consumer, self._consumer = self._consumer, None
        for client in (producer, consumer):
            if client is not None:
                with contextlib.suppress(KafkaError):
                    await client.stop()
        store, self._store = self._store, None
        if store is not None:
            store.close()

    async def _connect(self) -> tuple[int, dict[TopicPartition, int], dict[TopicPartition, int]]:
        """Topic, clients, and where each partition begins and ends, retried while the brokers
        cannot be reached."""
        started = self._clock()
        attempt = 0
        while True:
            remaining = self._start_timeout_s - (self._clock() - started)
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    return await self._connect_once()
            except (KafkaConnectionError, TimeoutError) as error:
                await self._close_clients()
                last_error = error
            except BaseException:
                await self._close_clients()
                raise
            attempt += 1
            remaining = self._start_timeout_s - (self._clock() - started)
            if remaining <= 0:
                raise StateUnavailable(
                    f"state topic {self.topic}: cannot reach the Kafka brokers at "
                    f"{self._kafka.bootstrap_servers} within {self._start_timeout_s:g} s "
                    f"({type(last_error).__name__}: {last_error}); check "
                    "kafka.bootstrap_servers and that the brokers are up"
                ) from last_error
            await asyncio.sleep(min(_RETRY.delay(attempt), remaining))

    async def _connect_once(
        self,
    ) -> tuple[int, dict[TopicPartition, int], dict[TopicPartition, int]]:
        admin = AIOKafkaAdminClient(**connection_options(self._kafka))
        await admin.start()
        try:
            delete_retention_ms = await self._ensure_topic(admin)
            partitions = await _partitions(admin, self.topic)
        finally:
            await admin.close()
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self._consumer = AIOKafkaConsumer(
            **connection_options(self._kafka),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await self._consumer.start()
        self._consumer.assign(tps)
        self._producer = build_producer(self._kafka, compression=None)
        await self._producer.start()
        beginnings = await self._consumer.beginning_offsets(tps)
        ends = await self._consumer.end_offsets(tps)
        return delete_retention_ms, beginnings, ends

    async def _close_clients(self) -> None:
        for client in (self._producer, self._consumer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self._producer = None
        self._consumer = None

    async def _ensure_topic(self, admin: AIOKafkaAdminClient) -> int:
        """Create the topic if missing; check it is compacted; its delete.retention.ms."""
        new = NewTopic(
            self.topic,
            self._partitions,
            self._replication_factor or -1,
            replica_assignments={},  # with -1: the broker's default.replication.factor
            topic_configs=self._topic_configs,
        )
        response = await admin.create_topics([new])
        _, code, message = response.topic_errors[0]
        if code == 0:
            log.info(
                "state topic created",
                extra={
                    "topic": self.topic,
                    "partitions": self._partitions,
                    "configs": self._topic_configs,
                },
            )
        elif code != _TOPIC_EXISTS:
            raise StateTopicError(
                f"state topic {self.topic}: the broker refused to create it "
                f"({for_code(code).__name__}: {message}); check state.partitions, "
                "state.replication_factor and the topic settings"
            )
        configs = await _topic_configs(admin, self.topic, ("cleanup.policy", "delete.retention.ms"))
        policy = configs.get("cleanup.policy", "")
        if "compact" not in policy.split(","):
            raise StateTopicError(
                f"state topic {self.topic} has cleanup.policy={policy}: a state topic must be "
                "compacted, or its entries are deleted by retention. Set cleanup.policy=compact "
                "on it (kafka-configs.sh --alter --entity-type topics --entity-name "
                f"{self.topic} --add-config cleanup.policy=compact) or use another topic"
            )
        return int(configs.get("delete.retention.ms", "86400000"))

    def _open_store(self) -> LocalStore:
        try:
            return LocalStore(self.store_path)
        except StoreCorrupt as error:
            aside = self._move_aside()
            log.error(
                "state store is corrupt; moved aside, rebuilding from the topic",
                extra={"topic": self.topic, "error": str(error), "moved_to": str(aside)},
            )
            return LocalStore(self.store_path)

    def _move_aside(self) -> Path | None:
        if self.store_path is None:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall_clock()))
        aside = self.store_path.with_name(f"{self.store_path.name}.corrupt-{stamp}")
        # The write-ahead log and its index belong to the old file: a new file must not see them.
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.store_path}{suffix}", f"{aside}{suffix}")
        return aside

    def _check_store(self, ends: Mapping[TopicPartition, int], delete_retention_ms: int) -> None:
        """Start the store afresh when it cannot be brought up to date by reading on.

        Offsets past the end mean the topic was deleted and created again. A store that has not
        been up to date within delete.retention.ms may have missed tombstones that compaction
        has since removed, so the entries they deleted would stay.
        """
        assert self._store is not None
        offsets = self._store.offsets()
        if not offsets:
            return
        end_of = {tp.partition: end for tp, end in ends.items()}
        synced_at = self._store.synced_at_ms()
        if any(offset > end_of.get(partition, 0) for partition, offset in offsets.items()):
            reason = "the store has read past the end of the topic (was it created again?)"
        elif synced_at is None:
            reason = "the store was never up to date with the topic"
        elif self._wall_clock() * 1000 - synced_at > delete_retention_ms:
            reason = "the store was last up to date longer ago than the topic keeps tombstones"
        else:
            return
        log.warning(
            "state store reset; reading the topic from the beginning",
            extra={"topic": self.topic, "reason": reason},
        )
        self._reset_store(move_aside=False)

    def _reset_store(self, move_aside: bool) -> None:
        assert self._store is not None
        self._store.close()
        if move_aside:
            self._move_aside()
        elif self.store_path is not None:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f"{self.store_path}{suffix}")
        self._store = LocalStore(self.store_path)

    # ------------------------------------------------------------------ reading

    def get(self, key: bytes) -> bytes | None:
        """The entry as this replica knows it: local only, no I/O to the broker."""
        try:
            return self._running_store().get(key)
        except StoreCorrupt as error:
            self._schedule_rebuild(str(error))
        except StoreError as error:
            log.warning("state store read failed", extra={"topic": self.topic, "error": str(error)})
        return None

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Entries whose key starts with `prefix`, as this replica knows them (local only)."""
        try:
            return self._running_store().scan(prefix)
        except StoreCorrupt as error:
            self._schedule_rebuild(str(error))
        except StoreError as error:
            log.warning("state store read failed", extra={"topic": self.topic, "error": str(error)})
        return []

    async def catch_up(self, timeout_s: float) -> CatchUp:
        """Read up to the end of the topic as of now (not forever), within `timeout_s`.

        What a replica calls on partition assignment, so that the entries written by a member
        that died are visible before it goes on.
        """
        consumer = self._running_consumer()
        started = self._clock()
        records_before = self._records_read
        target: dict[TopicPartition, int] | None = None
        complete = False
        try:
            async with asyncio.timeout(timeout_s):
                target = await consumer.end_offsets(list(self._positions))
                while self._lag(target) > 0:
                    await self._advanced.wait()
                complete = True
        except TimeoutError:
            pass
        except KafkaError as error:  # the end offsets could not be read: the broker is away
            log.warning(
                "state table end offsets unknown", extra={"topic": self.topic, "error": repr(error)}
            )
        lag = self._lag(target if target is not None else self._fetched_ends())
        result = CatchUp(
            self._clock() - started, self._records_read - records_before, complete, lag
        )
        self._last_catch_up = result
        if complete:
            self._mark_synced()
        log.log(
            logging.INFO if complete else logging.WARNING,
            "state table caught up" if complete else "state table catch-up timed out",
            extra={
                "topic": self.topic,
                "seconds": round(result.seconds, 3),
                "records": result.records,
                "lag": result.lag,
            },
        )
        return result

    async def _read_forever(self) -> None:
        """Tail every partition for good: apply in bounded batches, then wake catch-ups."""
        consumer = self._running_consumer()
        failures = 0
        while True:
            try:
                if self._rebuild_reason is not None:
                    self._rebuild(consumer)
                batch = await consumer.getmany(timeout_ms=_POLL_MS, max_records=_READ_BATCH)
                records = [
                    StateRecord(m.partition, m.offset, m.key, m.value, m.timestamp)
                    for messages in batch.values()
                    for m in messages
                    if m.key is not None
                ]
                if records:
                    self._running_store().apply(self._against_own_writes(records))
                    self._records_read += len(records)
                for tp in self._positions:
                    self._positions[tp] = await consumer.position(tp)
                self._forget_read_own_writes()
                self._advanced.set()
                self._advanced = asyncio.Event()
                ends = self._fetched_ends()
                if len(ends) == len(self._positions) and self._lag(ends) == 0:
                    self._mark_synced(every_s=_SYNC_MARK_S)
                failures = 0
            except asyncio.CancelledError:
                raise
            except StoreCorrupt as error:
                self._schedule_rebuild(str(error))
            except Exception as error:  # the reader must outlive any one failure
                failures += 1
                log.warning(
                    "state table read failed; reading again from the store's offsets",
                    extra={"topic": self.topic, "error": repr(error), "failures": failures},
                )
                await asyncio.sleep(_RETRY.delay(failures))
                self._seek_to_store(consumer)

    def _against_own_writes(self, records: list[StateRecord]) -> list[StateRecord]:
        """Keep this process's newer writes: a record older than one of them is not applied.

        Without this, an older value of a key read back after a local write would stand in the
        store until the write itself came back, and a read-modify-write (a spend total) in
        between would lose the write.
        """
        if not self._own:
            return records
        out = []
        for record in records:
            own = self._own.get(record.key)
            if own is None or record.value == own.value:
                out.append(record)
            elif own.offset is None:  # not acknowledged yet: older, unless proven newer later
                own.newer = record
                out.append(_with_value(record, own.value))
            elif record.offset > own.offset:
                del self._own[record.key]
                out.append(record)
            else:
                out.append(_with_value(record, own.value))
        return out

    def _forget_read_own_writes(self) -> None:
        """Own writes the reader has gone past are in the store as the topic has them."""
        if not self._own:
            return
        position = {tp.partition: offset for tp, offset in self._positions.items()}
        for key in [
            key
            for key, own in self._own.items()
            if own.partition is not None
            and own.offset is not None
            and position.get(own.partition, 0) > own.offset
        ]:
            del self._own[key]

    def _schedule_rebuild(self, reason: str) -> None:
        if self._rebuild_reason is None:
            log.error(
                "state store is corrupt; it is moved aside and rebuilt from the topic",
                extra={"topic": self.topic, "error": reason},
            )
            self._rebuild_reason = reason

    def _rebuild(self, consumer: AIOKafkaConsumer) -> None:
        self._reset_store(move_aside=True)
        self._rebuild_reason = None
        self._seek_to_store(consumer)

    def _seek_to_store(self, consumer: AIOKafkaConsumer) -> None:
        """Read again from what the store has applied (records fetched since are not in it)."""
        offsets = self._running_store().offsets()
        for tp in self._positions:
            self._positions[tp] = offsets.get(tp.partition, 0)
            consumer.seek(tp, self._positions[tp])

    def _fetched_ends(self) -> dict[TopicPartition, int]:
        """The end of each partition as of its last fetch (not known before the first one)."""
        consumer = self._running_consumer()
        ends: dict[TopicPartition, int] = {}
        for tp in self._positions:
            end = consumer.last_stable_offset(tp)
            if end is None:
                end = consumer.highwater(tp)
            if end is not None:
                ends[tp] = int(end)
        return ends

    def _lag(self, ends: Mapping[TopicPartition, int]) -> int:
        return sum(max(0, end - self._positions.get(tp, 0)) for tp, end in ends.items())

    def _mark_synced(self, every_s: float = 0.0) -> None:
        now = self._clock()
        if self._synced_mark_at is not None and now - self._synced_mark_at < every_s:
            return
        try:
            self._running_store().mark_synced(int(self._wall_clock() * 1000))
        except StoreError as error:
            log.warning(
                "state store write failed", extra={"topic": self.topic, "error": str(error)}
            )
            return
        self._synced_mark_at = now

    # ------------------------------------------------------------------ writing

    def put(self, key: bytes, value: bytes) -> None:
        """Write the local store now and the topic without waiting; never raises for the broker."""
        self._write(key, value)

    def delete(self, key: bytes) -> None:
        """A tombstone, written like put(): the entry is gone here now, elsewhere soon."""
        self._write(key, None)

    def _write(self, key: bytes, value: bytes | None) -> None:
        store = self._running_store()
        if self._producer is None:
            raise RuntimeError(f"state table {self.topic} is not started")
        try:
            store.write(key, value, int(self._wall_clock() * 1000))
        except StoreCorrupt as error:
            self._schedule_rebuild(str(error))
        except StoreError as error:  # the topic still gets it, and the reader brings it back
            log.warning(
                "state store write failed", extra={"topic": self.topic, "error": str(error)}
            )
        own = self._own[key] = _Own(value)
        self._outbox.put_nowait((key, own))
        self._queued += 1
        self._writes += 1

    async def _send_forever(self) -> None:
        """Hand writes to the producer in the order they were made (one task keeps the order)."""
        while True:
            key, own = await self._outbox.get()
            try:
                assert self._producer is not None
                future = await self._producer.send(self.topic, key=key, value=own.value)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # refused before sending: too large, no metadata
                self._sent_one(key, own, None, error)
            else:
                self._in_flight.add(future)
                future.add_done_callback(partial(self._delivered, key, own))
            self._handed += 1
            self._handed_event.set()
            self._handed_event = asyncio.Event()

    def _delivered(self, key: bytes, own: _Own, future: asyncio.Future[Any]) -> None:
        self._in_flight.discard(future)
        if future.cancelled():
            self._sent_one(key, own, None, KafkaError("the send was cancelled"))
            return
        error = future.exception()
        self._sent_one(key, own, None if error is not None else future.result(), error)

    def _sent_one(self, key: bytes, own: _Own, metadata: Any, error: BaseException | None) -> None:
        if error is not None:
            self._write_failures += 1
            self._failures_since_flush += 1
            log.debug("state write failed", extra={"topic": self.topic, "error": repr(error)})
        if self._own.get(key) is not own:
            return  # a later write of the key decides
        if error is None:
            own.partition, own.offset = int(metadata.partition), int(metadata.offset)
            if own.newer is None or own.newer.offset < own.offset:
                return  # the reader forgets it once it has gone past the offset
        del self._own[key]
        if own.newer is not None:
            # Another replica's write was read before this one was acknowledged, and it is newer
            # (or this one never reaches the topic): the store takes the topic's value.
            with contextlib.suppress(StoreError):
                self._running_store().write(key, own.newer.value, own.newer.timestamp_ms)

    async def flush(self) -> int:
        """Wait for every write made so far; how many failed since the last flush (logged)."""
        target = self._queued
        while self._handed < target:
            await self._handed_event.wait()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))
        failed, self._failures_since_flush = self._failures_since_flush, 0
        if failed:
            log.warning(
                "state table writes failed; they stay in this replica's store only",
                extra={"topic": self.topic, "failed": failed},
            )
        return failed

    # ------------------------------------------------------------------ reporting

    def stats(self) -> TableStats:
        try:
            store = self._running_store().stats()
            entries, size = store.entries, store.bytes
        except StoreError:
            entries, size = 0, 0
        return TableStats(
            entries=entries,
            bytes=size,
            writes=self._writes,
            write_failures=self._write_failures,
            pending_writes=len(self._in_flight) + (self._queued - self._handed),
            records_read=self._records_read,
            lag=self._lag(self._fetched_ends()) if self._consumer is not None else 0,
            last_catch_up=self._last_catch_up,
        )

    def keys_older_than(self, timestamp_ms: int) -> list[bytes]:
        """Keys last written before `timestamp_ms` (epoch ms), from the local store: for purges."""
        return self._running_store().keys_older_than(timestamp_ms)

    def _running_store(self) -> LocalStore:
        if self._store is None:
            raise RuntimeError(f"state table {self.topic} is not started")
        return self._store

    def _running_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError(f"state table {self.topic} is not started")
        return self._consumer


def _with_value(record: StateRecord, value: bytes | None) -> StateRecord:
    return StateRecord(record.partition, record.offset, record.key, value, record.timestamp_ms)


async def _topic_configs(
    admin: AIOKafkaAdminClient, topic: str, names: Iterable[str]
) -> dict[str, str]:
    """The topic's configs; a topic created a moment ago may be unknown to the broker that
    answers for a while, so that answer is waited out (under the caller's timeout)."""
    while True:
        configs = await _described_configs(admin, topic, names)
        if configs is not None:
            return configs
        await asyncio.sleep(0.1)


async def _described_configs(
    admin: AIOKafkaAdminClient, topic: str, names: Iterable[str]
) -> dict[str, str] | None:
    """The topic's configs, or None while the broker does not know the topic yet."""
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, dict.fromkeys(names))
    for response in await admin.describe_configs([resource]):
        for code, message, _, name, entries in response.resources:
            if name != topic:
                continue
            if code == UnknownTopicOrPartitionError.errno:
                return None
            if code != 0:
                raise StateTopicError(
                    f"state topic {topic}: cannot read its configuration "
                    f"({for_code(code).__name__}: {message or 'no message'})"
                )
            return {entry[0]: entry[1] for entry in entries}
    raise StateTopicError(f"state topic {topic}: the broker did not describe its configuration")


async def _partitions(admin: AIOKafkaAdminClient, topic: str) -> list[int]:
    """The topic's partitions, waiting (under the caller's timeout) while it is being created."""
    while True:
        for described in await admin.describe_topics([topic]):
            if described["topic"] == topic and described["error_code"] == 0:
                found = sorted(p["partition"] for p in described["partitions"])
                if found:
                    return found
        await asyncio.sleep(0.1)
