"""The batch-job registry: one record per provider batch job, in a compacted state topic.

A record is written (and acknowledged by the broker) before its job is created, and updated as
the job moves, so whoever owns the partitions next (after a SIGKILL, a restart, a rebalance)
finds the running job and waits for it instead of paying for its rows again. It is a
`GlobalTable` like the response cache: every replica reads the topic into its local store.

Records are found by partition: an index entry per input partition lists the keys of the
latest jobs that hold its rows (`_INDEX_KEEP` of them; older jobs are for rows committed long
ago). A job's rows are named by `custom_id` = `topic/partition/offset`, and its record keeps
the first and last offset per partition, so a window finds the jobs that may hold its rows.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import orjson

from consumer.config import Settings
from consumer.records import SourceRecord
from consumer.state import GlobalTable

# Job keys kept in one partition's index entry, newest last.
_INDEX_KEEP = 64
# A record's state before its job exists at the provider.
SUBMITTING = "submitting"
# The job's answers were handed on to delivery: the job is done with, its record stays as the
# answers' source should the rows be read again before their offsets are committed.
DELIVERED = "delivered"
METADATA_KEY = "llm_consumer_job"


def custom_id(record: SourceRecord) -> str:
    return f"{record.topic}/{record.partition}/{record.offset}"


def split_custom_id(value: str) -> tuple[str, int] | None:
    """(`topic/partition`, offset) of a custom_id, or None for one this consumer did not make."""
    tp, sep, offset = value.rpartition("/")
    if not sep or not offset.isdigit():
        return None
    return tp, int(offset)


class Table(Protocol):
    """What the registry needs of a GlobalTable (unit tests hand in a dict)."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...

    async def flush(self) -> int: ...


@dataclass
class JobRecord:
    key: str
    window_id: str
    # "topic/partition" -> [first offset, last offset] of the rows in the job.
    ranges: dict[str, list[int]]
    rows: int
    state: str = SUBMITTING
    batch_id: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    request_counts: dict[str, int] = field(default_factory=dict)

    def covers(self, tp: str, offset: int) -> bool:
        found = self.ranges.get(tp)
        return found is not None and found[0] <= offset <= found[1]

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> JobRecord | None:
        try:
            data = orjson.loads(raw)
            return cls(**data) if isinstance(data, dict) else None
        except (orjson.JSONDecodeError, TypeError):
            return None


def ranges_of(custom_ids: Iterable[str]) -> dict[str, list[int]]:
    ranges: dict[str, list[int]] = {}
    for value in custom_ids:
        parsed = split_custom_id(value)
        if parsed is None:
            continue
        tp, offset = parsed
        found = ranges.get(tp)
        if found is None:
            ranges[tp] = [offset, offset]
        else:
            found[0], found[1] = min(found[0], offset), max(found[1], offset)
    return ranges


class JobRegistry:
    def __init__(self, table: Table, wall_clock: Callable[[], float] = time.time) -> None:
        self._table = table
        self._clock = wall_clock

    def new(self, window_id: str, custom_ids: list[str]) -> JobRecord:
        now = self._clock()
        return JobRecord(
            uuid.uuid4().hex,
            window_id,
            ranges_of(custom_ids),
            len(custom_ids),
            created_at=now,
            updated_at=now,
        )

    async def record(self, job: JobRecord) -> None:
        """Write a new record and its index entries, and wait until the broker has them.

        Jobs that fall out of an index were delivered long ago (`_INDEX_KEEP` jobs of the
        partition came after them): their records are deleted, so the topic does not grow
        for good.
        """
        self.save(job)
        for tp in job.ranges:
            key = _index_key(tp)
            keys = [k for k in self._index(key) if k != job.key] + [job.key]
            self._table.put(key, orjson.dumps(keys[-_INDEX_KEEP:]))
            for old in keys[:-_INDEX_KEEP]:
                record = self.get(old)
                if record is not None and record.state == DELIVERED:
                    self._table.delete(_job_key(old))
        await self._table.flush()

    def save(self, job: JobRecord) -> None:
        """Update a record (written to the topic without waiting)."""
        job.updated_at = self._clock()
        self._table.put(_job_key(job.key), job.encode())

    def covering(self, custom_ids: Iterable[str]) -> list[JobRecord]:
        """Jobs that may hold any of these rows, oldest first."""
        wanted: dict[str, list[int]] = {}
        for value in custom_ids:
            parsed = split_custom_id(value)
            if parsed is not None:
                wanted.setdefault(parsed[0], []).append(parsed[1])
        found: dict[str, JobRecord] = {}
        for tp, offsets in wanted.items():
            for key in self._index(_index_key(tp)):
                if key in found:
                    continue
                job = self.get(key)
                if job is not None and any(job.covers(tp, offset) for offset in offsets):
                    found[key] = job
        return sorted(found.values(), key=lambda job: job.created_at)

    def get(self, key: str) -> JobRecord | None:
        raw = self._table.get(_job_key(key))
        return JobRecord.decode(raw) if raw is not None else None

    def _index(self, key: bytes) -> list[str]:
        raw = self._table.get(key)
        if raw is None:
            return []
        try:
            keys: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return []
        return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def _job_key(key: str) -> bytes:
    return f"job:{key}".encode()


def _index_key(tp: str) -> bytes:
    return f"partition:{tp}".encode()


def decode_topic_record(key: bytes, value: bytes | None) -> JobRecord | None:
    """A job record read straight off the topic (for `llm-consumer batches`); None otherwise."""
    if value is None or not key.startswith(b"job:"):
        return None
    return JobRecord.decode(value)


def batch_table(settings: Settings) -> GlobalTable:
    """The job records' compacted topic and local store (the consumer's and `batches` CLI's)."""
    topic = settings.llm.batch.topic or f"{settings.kafka.group_id}.llm-batches"
    return GlobalTable.from_settings(settings.kafka, settings.state, topic)
