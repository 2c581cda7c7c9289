"""`llm-consumer cache stats | purge`: the Kafka-backed response cache as an operator sees it.

Both commands run the table the consumer runs (`consumer.parts.cache_table`), so they see what
a replica starting now would see: the topic is created if missing and refused if it is not
compacted (exit 2), the local store under `state.directory` is opened and read up to the
topic's end as of now, for at most `llm.cache.catch_up_timeout_s`. A purge selects from the
whole topic, never from whatever part of it this store happened to have read.

A purge writes one tombstone per entry through the table (`GlobalTable.delete`) and waits for
the broker to acknowledge them all: every replica drops the entries as its reader meets the
tombstones, and compaction removes them from the topic later. The next request for a purged
entry is paid again and stored anew, which is the point when answers bought before some time
should not be served any more (the provider changed the model behind its name, a bad
deployment answered for a day, entries are kept longer than they should be).

Entries are selected by age only. An entry holds the answer (content, model, usage,
finish_reason, when it was bought) under a hash of the request, so nothing in the table says
which template bought it; a purge by template hash needs that hash stored in the entry. (After
a change of template every request has a new key anyway: the old entries are never served
again, they only take room until they are purged by age.)

Exit codes, as for the other commands: 0 done, 1 a runtime failure (broker unreachable, the
store in use, the topic not read to its end, tombstones not acknowledged), 2 settings or flags
that cannot be used (the cache backend is not kafka, the topic is not compacted).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from consumer.config import ConfigError, KafkaSettings, Settings, load_settings

if TYPE_CHECKING:
    from consumer.state import CatchUp, GlobalTable, TableStats

_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
# Tombstones deleted per turn of the event loop: the sender hands them to the producer while
# the rest are still being deleted from the store, instead of all at the end.
_DELETE_BATCH = 1_000
# How long a purge waits for the broker to acknowledge its tombstones.
_FLUSH_TIMEOUT_S = 60.0

Subcommand = Callable[
    ["argparse._SubParsersAction[argparse.ArgumentParser]", str, str], argparse.ArgumentParser
]


@dataclass(frozen=True)
class Duration:
    """An age as the operator wrote it (for messages) and in seconds."""

    text: str
    seconds: float

    @classmethod
    def parse(cls, text: str) -> Duration:
        """`7d`, `12h`, `30m`, `45s`, or a bare number of seconds (`3600`, `0.5`)."""
        match = _DURATION.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"expected a number and a unit: 7d, 12h, 30m, 45s, or seconds as a bare "
                f"number (3600); got {text!r}"
            )
        number, unit = match.groups()
        return cls(text.strip(), float(number) * _UNITS[unit or "s"])


class TimedKeys(Protocol):
    """The part of a state table a purge selects from."""

    def keys_older_than(self, timestamp_ms: int) -> list[bytes]: ...


@dataclass(frozen=True)
class Selection:
    """The keys a purge tombstones: those last written before `cutoff_ms` (epoch ms)."""

    cutoff_ms: int
    keys: list[bytes]


def select_older_than(store: TimedKeys, age: Duration, now_s: float) -> Selection:
    """Entries last written more than `age` before `now_s`, by the time of their record.

    That time is the record's on the topic (the producer's clock when the answer was stored),
    or this process's clock for its own writes: an entry stored again is young again.
    """
    cutoff_ms = int((now_s - age.seconds) * 1000)
    return Selection(cutoff_ms, store.keys_older_than(cutoff_ms))


class CacheCommandFailed(Exception):
    """A cache command could not do its work; the message says what to do (exit 1)."""


def add_arguments(parser: argparse.ArgumentParser, subcommand: Subcommand) -> None:
    """`cache stats` and `cache purge`, with `subcommand` making each parser like the others."""
    actions = parser.add_subparsers(
        dest="cache_command", required=True, metavar="ACTION", help="stats or purge"
    )
    stats = subcommand(
        actions,
        "stats",
        "read the cache topic to its end; print entries, bytes, the topic's partitions and "
        "end offsets, the local store and how long the catch-up took",
    )
    _add_common(stats)
    purge = subcommand(
        actions,
        "purge",
        "tombstone the entries stored before a time, on every replica: their next requests "
        "are paid again",
    )
    _add_common(purge)
    purge.add_argument(
        "--older-than",
        type=_duration_argument,
        required=True,
        metavar="AGE",
        help="purge entries last written more than AGE ago: 7d, 12h, 30m, 45s, or seconds",
    )
    purge.add_argument(
        "--dry-run", action="store_true", help="print how many entries would go; write nothing"
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="the consumer's settings file (llm.cache.backend must be kafka)",
    )
    parser.add_argument(
        "--state-directory",
        type=Path,
        metavar="DIR",
        help="keep the local store here instead of state.directory: a consumer running with "
        "the same directory holds its store (the first run in a new directory reads the "
        "whole topic)",
    )
    parser.add_argument(
        "--catch-up-timeout",
        type=_seconds_argument,
        metavar="SECONDS",
        help="read the topic to its end for at most this long (default: "
        "llm.cache.catch_up_timeout_s)",
    )


def _seconds_argument(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError(f"takes seconds above 0, got {text!r}")
    return seconds


def _duration_argument(text: str) -> Duration:
    try:
        return Duration.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    """The `cache` command: settings first (exit 2), then the table (exit 1 on failure)."""
    from consumer.observability.logs import configure_cli_logging
    from consumer.state import StateUnavailable, StoreError

    settings = load_settings(args.config)
    _require_kafka_backend(settings, args.config, args.cache_command)
    configure_cli_logging()
    command = _stats if args.cache_command == "stats" else _purge
    try:
        return asyncio.run(command(settings, args))
    except (CacheCommandFailed, StateUnavailable, StoreError) as error:
        print(f"error: cache {args.cache_command}: {error}", file=sys.stderr)
        return 1


def _require_kafka_backend(settings: Settings, path: Path, command: str) -> None:
    backend = settings.llm.cache.backend
    if backend == "kafka":
        return
    why = (
        "the memory cache lives in each consumer process and ends with it (restarting the "
        "consumer empties it)"
        if backend == "memory"
        else "there is no cache to look at"
    )
    raise ConfigError(
        f"{path}: llm.cache.backend is {backend}: `cache {command}` works on the kafka "
        f"backend only, and {why}"
    )


async def _started_table(settings: Settings, args: argparse.Namespace) -> GlobalTable:
    """The consumer's cache table, started (the topic checked, the store opened and locked)."""
    from consumer.parts import cache_table
    from consumer.state import StoreLocked

    if args.state_directory is not None:
        state = settings.state.model_copy(update={"directory": args.state_directory})
        settings = settings.model_copy(update={"state": state})
    table = cache_table(settings)
    try:
        await table.start()
    except StoreLocked as error:
        raise CacheCommandFailed(
            f"{error}. A consumer running here holds it: pass --state-directory with another "
            "directory (its first run reads the whole topic), or stop the consumer"
        ) from None
    return table


def _catch_up_timeout(settings: Settings, args: argparse.Namespace) -> float:
    timeout: float = args.catch_up_timeout or settings.llm.cache.catch_up_timeout_s
    return timeout


async def _stats(settings: Settings, args: argparse.Namespace) -> int:
    table = await _started_table(settings, args)
    try:
        timeout = _catch_up_timeout(settings, args)
        caught = await table.catch_up(timeout)
        ends = await _end_offsets(settings.kafka, table.topic)
        stats = table.stats()
    finally:
        await table.stop()
    print(_stats_report(table.topic, table.store_path, ends, stats, caught, timeout))
    return 0


def _stats_report(
    topic: str,
    store_path: Path | None,
    ends: dict[int, int],
    stats: TableStats,
    caught: CatchUp,
    timeout_s: float,
) -> str:
    catch_up = f"{caught.seconds:.2f} s, {caught.records} records read"
    if not caught.complete:
        catch_up += (
            f"; stopped after {timeout_s:g} s short of the end (at least {caught.lag} records "
            "unread): entries and bytes may be short of the topic (a longer --catch-up-timeout "
            "reads on)"
        )
    rows = [
        ("topic", topic),
        ("partitions", str(len(ends))),
        ("end offsets", " ".join(f"{p}:{offset}" for p, offset in sorted(ends.items()))),
        ("store", str(store_path)),
        ("entries", str(stats.entries)),
        ("bytes", f"{stats.bytes} ({_size(stats.bytes)}: the file and its write-ahead log)"),
        ("last catch-up", catch_up),
    ]
    return "\n".join(f"{name + ':':<15}{value}" for name, value in rows)


async def _end_offsets(kafka: KafkaSettings, topic: str) -> dict[int, int]:
    """Each partition's end offset, from clients of our own (the table's are its own)."""
    try:
        async with asyncio.timeout(kafka.connect_timeout_s):
            return await _read_end_offsets(kafka, topic)
    except TimeoutError:
        raise CacheCommandFailed(
            f"the end offsets of {topic} could not be read within {kafka.connect_timeout_s:g} s "
            "(kafka.connect_timeout_s); check that the brokers are up"
        ) from None


async def _read_end_offsets(kafka: KafkaSettings, topic: str) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from consumer.kafka.clients import connection_options

    admin = AIOKafkaAdminClient(**connection_options(kafka))
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [
        TopicPartition(topic, p["partition"])
        for entry in described
        if entry["topic"] == topic
        for p in entry["partitions"]
    ]
    consumer = AIOKafkaConsumer(
        **connection_options(kafka), group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return {tp.partition: int(offset) for tp, offset in ends.items()}


async def _purge(settings: Settings, args: argparse.Namespace) -> int:
    age: Duration = args.older_than
    table = await _started_table(settings, args)
    try:
        timeout = _catch_up_timeout(settings, args)
        caught = await table.catch_up(timeout)
        if not caught.complete:
            raise CacheCommandFailed(
                f"the cache topic {table.topic} was not read to its end within {timeout:g} s "
                f"(at least {caught.lag} records unread): a purge now would miss entries; run it "
                "again with a longer --catch-up-timeout"
            )
        selection = select_older_than(table, age, time.time())
        entries = table.stats().entries
        what = (
            f"{len(selection.keys)} of {entries} entries, last written before "
            f"{_utc(selection.cutoff_ms)} (older than {age.text})"
        )
        if args.dry_run:
            print(f"would purge {what}; nothing written (--dry-run)")
            return 0
        for done, key in enumerate(selection.keys, 1):
            table.delete(key)
            if done % _DELETE_BATCH == 0:
                await asyncio.sleep(0)
        try:
            async with asyncio.timeout(_FLUSH_TIMEOUT_S):
                failed = await table.flush()
        except TimeoutError:
            raise CacheCommandFailed(
                f"the broker did not acknowledge the tombstones on {table.topic} within "
                f"{_FLUSH_TIMEOUT_S:g} s; check the brokers, then run the purge again with "
                "--state-directory set to an empty directory (it reads the topic whole and "
                "finds the entries this store has already dropped)"
            ) from None
    finally:
        await table.stop()
    if failed:
        raise CacheCommandFailed(
            f"{failed} of {len(selection.keys)} tombstones on {table.topic} were refused by the "
            "broker: those entries are gone from this store only. Run the purge again with "
            "--state-directory set to an empty directory (it reads the topic whole and finds "
            "them)"
        )
    print(f"purged {what}: tombstones written to {table.topic}, every replica drops them")
    return 0


def _size(count: int) -> str:
    size, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{size:.1f} {unit}" if unit != "B" else f"{count} B"


def _utc(epoch_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_ms / 1000))
