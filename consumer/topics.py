"""The user's side of the topics: publish a file of rows, read the enriched output back."""

from __future__ import annotations

import asyncio
import csv
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from tqdm import tqdm  # type: ignore[import-untyped]


@dataclass(frozen=True)
class PublishRow:
    key: bytes | None
    value: bytes


def read_rows(path: Path, key_field: str | None) -> Iterator[PublishRow]:
    """JSONL lines are sent byte for byte (so bad rows can be published on purpose); CSV rows
    become JSON objects of strings."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            for record in csv.DictReader(handle):
                field = record.get(key_field) if key_field else None
                yield PublishRow(field.encode() if field else None, orjson.dumps(record))
        return
    with path.open("rb") as handle:
        for line in handle:
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            key: bytes | None = None
            if key_field:
                try:
                    parsed = orjson.loads(line)
                except orjson.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, dict) and parsed.get(key_field) is not None:
                    key = str(parsed[key_field]).encode()
            yield PublishRow(key, line)


async def ensure_topic(bootstrap: str, topic: str, partitions: int) -> bool:
    """Create the topic if it does not exist; True when it was created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
        return True
    except TopicAlreadyExistsError:
        return False
    finally:
        await admin.close()


async def publish(
    bootstrap: str,
    topic: str,
    path: Path,
    key_field: str | None = None,
    partitions: int | None = None,
    progress: bool = True,
) -> int:
    """Publish every row of a JSONL or CSV file; returns how many were acknowledged."""
    if partitions:
        await ensure_topic(bootstrap, topic, partitions)
    rows = list(read_rows(path, key_field))
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=10
    )
    await producer.start()
    try:
        bar = tqdm(total=len(rows), unit="row", disable=not progress, desc=f"-> {topic}")
        futures = []
        for row in rows:
            future = await producer.send(topic, value=row.value, key=row.key)
            future.add_done_callback(lambda _: bar.update(1))
            futures.append(future)
        await asyncio.gather(*futures)
        bar.close()
    finally:
        await producer.stop()
    return len(rows)


def _table_line(message: Any, row: Any, response_field: str, width: int) -> str:
    key = (message.key or b"").decode("utf-8", "replace")[:12]
    where = f"{message.partition}:{message.offset}"
    if not isinstance(row, dict):
        return f"{where:>8}  {key:<12}  (not a JSON object)"
    error = row.get(f"{response_field}_error")
    if isinstance(error, dict):
        answer = f"ERROR {error.get('reason')}"
    else:
        answer = orjson.dumps(row.get(response_field)).decode()
    usage = row.get(f"{response_field}_usage") or {}
    tokens = str(usage.get("total_tokens", "")) if isinstance(usage, dict) else ""
    texts = [v for k, v in row.items() if isinstance(v, str) and not k.startswith(response_field)]
    text = max(texts, key=len, default="")
    room = max(10, width - 8 - 12 - 24 - 6 - 8)
    text = text.replace("\n", " ")
    text = text if len(text) <= room else text[: room - 1] + "…"
    return f"{where:>8}  {key:<12}  {answer[:24]:<24}  {tokens:>6}  {text}"


async def tail(
    bootstrap: str,
    topic: str,
    out: TextIO = sys.stdout,
    follow: bool = False,
    output_format: str = "table",
    response_field: str = "llm_response",
    limit: int | None = None,
    idle_timeout_s: float = 5.0,
    expect: int | None = None,
    timeout_s: float | None = None,
) -> int:
    """Print the topic from the beginning; stop at its end unless `follow`. Returns the count.

    With `expect`, keep reading until that many messages arrived (or `timeout_s` passed):
    scripts use it to wait for a run to finish.
    """
    loop = asyncio.get_running_loop()
    gives_up_at = None if timeout_s is None else loop.time() + timeout_s
    idle_gives_up_at = loop.time() + idle_timeout_s
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    count = 0
    try:
        end: dict[TopicPartition, int] = {}
        width = shutil.get_terminal_size((120, 20)).columns
        if output_format == "table":
            print(
                f"{'part:off':>8}  {'key':<12}  {response_field[:24]:<24}  {'tokens':>6}  input",
                file=out,
            )
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                for message in messages:
                    count += 1
                    _print_message(message, out, output_format, response_field, width)
                    if (limit is not None and count >= limit) or (
                        expect is not None and count >= expect
                    ):
                        return count
            if gives_up_at is not None and loop.time() >= gives_up_at:
                return count
            if not follow and expect is None:
                assigned = sorted(consumer.assignment())
                if not assigned:
                    if loop.time() >= idle_gives_up_at:
                        return count
                    continue
                if set(end) != set(assigned):
                    end = await consumer.end_offsets(assigned)
                positions = [await consumer.position(tp) for tp in assigned]
                if all(pos >= end[tp] for pos, tp in zip(positions, assigned, strict=True)):
                    return count
    finally:
        await consumer.stop()


def _print_message(
    message: Any, out: TextIO, output_format: str, response_field: str, width: int
) -> None:
    try:
        row = orjson.loads(message.value) if message.value is not None else None
    except orjson.JSONDecodeError:
        row = None
    if output_format == "table":
        print(_table_line(message, row, response_field, width), file=out)
        return
    record = {
        "partition": message.partition,
        "offset": message.offset,
        "key": message.key.decode("utf-8", "replace") if message.key else None,
        "headers": {k: v.decode("utf-8", "replace") for k, v in message.headers or ()},
        "value": row if row is not None else (message.value or b"").decode("utf-8", "replace"),
    }
    print(orjson.dumps(record).decode(), file=out)
