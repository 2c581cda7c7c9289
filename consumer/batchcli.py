"""`llm-consumer batches -c settings.yaml`: the batch jobs of a group, from its state topic.

Reads the job records' compacted topic (`llm.batch.topic`, default `<group_id>.llm-batches`)
from its beginning to its end as of now with a plain consumer (no group, no local store, so it
can run beside the consumers), keeps the latest record of each job and prints them oldest
first: the provider's batch id, the input range per partition, the rows, the state, its age.
Exit codes: 0 done, 1 the broker could not be read in time, 2 unusable settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from consumer.config import KafkaSettings, load_settings
from consumer.enrich.batchjobs import JobRecord, decode_topic_record

_READ_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", type=Path, required=True, metavar="FILE", help="settings YAML file"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per job")
    parser.add_argument(
        "--state", help="only jobs in this state (submitting, in_progress, delivered, ...)"
    )


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    topic = settings.llm.batch.topic or f"{settings.kafka.group_id}.llm-batches"
    try:
        jobs = asyncio.run(read_jobs(settings.kafka, topic, _READ_TIMEOUT_S))
    except TimeoutError:
        print(
            f"error: batches: {topic} not read to its end in {_READ_TIMEOUT_S:g} s", file=sys.stderr
        )
        return 1
    if args.state:
        jobs = [job for job in jobs if job.state == args.state]
    now = time.time()
    if args.json:
        for job in jobs:
            sys.stdout.write(orjson.dumps(job.__dict__).decode() + "\n")
        return 0
    print(f"{len(jobs)} batch jobs in {topic}")
    print(f"{'batch id':<28} {'state':<12} {'rows':>6} {'age':>8}  ranges")
    for job in jobs:
        ranges = ", ".join(f"{tp}:{first}-{last}" for tp, (first, last) in job.ranges.items())
        age = f"{now - job.created_at:.0f}s"
        print(f"{job.batch_id or '-':<28} {job.state:<12} {job.rows:>6} {age:>8}  {ranges}")
    return 0


async def read_jobs(kafka: KafkaSettings, topic: str, timeout_s: float) -> list[JobRecord]:
    """Every job's latest record on the topic, oldest first (none if the topic is missing)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from consumer.kafka.clients import connection_options

    consumer = AIOKafkaConsumer(
        **connection_options(kafka),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    latest: dict[bytes, JobRecord | None] = {}
    try:
        async with asyncio.timeout(timeout_s):
            tps = [TopicPartition(topic, p) for p in await _partitions(kafka, topic)]
            if not tps:
                return []
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            while not await _at_end(consumer, ends):
                batch = await consumer.getmany(timeout_ms=200)
                for messages in batch.values():
                    for message in messages:
                        if message.key is not None:
                            latest[message.key] = decode_topic_record(message.key, message.value)
    finally:
        await consumer.stop()
    return sorted((job for job in latest.values() if job is not None), key=lambda j: j.created_at)


async def _at_end(consumer: Any, ends: dict[Any, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


async def _partitions(kafka: KafkaSettings, topic: str) -> list[int]:
    """The topic's partitions; none if it does not exist (no job was ever recorded)."""
    from aiokafka.admin import AIOKafkaAdminClient

    from consumer.kafka.clients import connection_options

    admin = AIOKafkaAdminClient(**connection_options(kafka))
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(
        p["partition"]
        for d in described
        if d["topic"] == topic and d["error_code"] == 0
        for p in d["partitions"]
    )
