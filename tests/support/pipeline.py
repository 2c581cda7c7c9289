"""Helpers for end-to-end tests: topics, publishing, reading back, and the consumer as a process.

Everything talks to the real broker on 127.0.0.1, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from consumer.observability.metrics import parse_exposition

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dlq: str
    group: str

    @classmethod
    def unique(cls, name: str) -> Topics:
        run = f"{name}-{uuid.uuid4().hex[:8]}"
        return cls(f"{run}.in", f"{run}.out", f"{run}.dlq", f"{run}-group")


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]

    def json(self) -> Any:
        assert self.value is not None
        return orjson.loads(self.value)

    @property
    def source(self) -> tuple[int, int]:
        return int(self.headers["source.partition"]), int(self.headers["source.offset"])


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
        )
    finally:
        await admin.close()


async def publish(
    bootstrap: str, topic: str, messages: Sequence[tuple[bytes | None, bytes | None]]
) -> list[tuple[int, int]]:
    """Send (key, value) pairs in order; returns their (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k) for k, v in messages]
        sent = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(meta.partition, meta.offset) for meta in sent]


def rows_to_messages(
    rows: Sequence[dict[str, Any]], key_field: str = "id"
) -> list[tuple[bytes | None, bytes | None]]:
    return [(str(row[key_field]).encode(), orjson.dumps(row)) for row in rows]


async def read_topic(
    bootstrap: str, topic: str, expect: int, timeout_s: float = 60.0, settle_s: float = 0.0
) -> list[Message]:
    """Read from the beginning until `expect` messages (then `settle_s` more, to catch extras)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    out: list[Message] = []
    try:
        deadline = time.monotonic() + timeout_s
        settle_until: float | None = None
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out.extend(
                    Message(
                        r.topic,
                        r.partition,
                        r.offset,
                        r.key,
                        r.value,
                        {k: v.decode() for k, v in r.headers or ()},
                    )
                    for r in records
                )
            if len(out) >= expect:
                if settle_until is None:
                    settle_until = time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
    finally:
        await consumer.stop()
    return out


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


async def end_offsets(bootstrap: str, topic: str, timeout_s: float = 30.0) -> dict[int, int]:
    """The topic's end offset per partition (waits, bounded, for the topic's metadata)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, metadata_max_age_ms=500)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not consumer.assignment() and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=200)
        assigned = list(consumer.assignment())
        if not assigned:
            raise TimeoutError(f"topic {topic} has no partitions after {timeout_s} s")
        ends = await consumer.end_offsets(assigned)
    finally:
        await consumer.stop()
    return {tp.partition: offset for tp, offset in ends.items()}


async def wait_for_commits(
    bootstrap: str, group: str, topic: str, timeout_s: float = 30.0
) -> dict[int, int]:
    """Poll until the group's committed offsets reach the topic's end (bounded)."""
    ends = await end_offsets(bootstrap, topic)
    deadline = time.monotonic() + timeout_s
    committed: dict[int, int] = {}
    while time.monotonic() < deadline:
        try:
            committed = await committed_offsets(bootstrap, group, topic)
        except KafkaError:  # the group's coordinator is not known yet right after it formed
            committed = {}
        if all(committed.get(p, -1) >= end for p, end in ends.items()):
            break
        await asyncio.sleep(0.3)
    return committed


def settings_file(
    directory: Path,
    bootstrap: str,
    llm_base_url: str,
    topics: Topics,
    template: str = "Review: {{ row.text }}",
    **sections: dict[str, Any],
) -> Path:
    """Write a settings YAML for one test; `sections` override or extend each section."""
    settings: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "input_topic": topics.input,
            "output_topic": topics.output,
            "dlq_topic": topics.dlq,
            "group_id": topics.group,
            "session_timeout_ms": 10_000,
        },
        "window": {"max_messages": 50, "max_wait_ms": 500},
        "llm": {
            "provider": "openai",
            "base_url": f"{llm_base_url}/v1",
            "api_key": "${TEST_LLM_KEY:-test-key}",
            "model": "fake-model",
            "template": template,
            "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5, "window_backoff_max_s": 2},
            # Test rows repeat a few texts: with the cache on, most would never reach the
            # LLM. Tests of the cache turn it on.
            "cache": {"backend": "off"},
        },
        "delivery": {"shutdown_grace_s": 15},
        "logging": {"format": "json", "level": "INFO"},
        "observability": {"port": 0},
    }
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    path = directory / f"settings-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


@dataclass
class ConsumerProcess:
    """`llm-consumer run` as a child process, its log kept in a file for assertions."""

    settings: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> ConsumerProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumer", "run", "-c", str(self.settings)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()
        return self

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code (kills after the timeout)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)

    def kill(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_bytes().splitlines():
            try:
                lines.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                continue
        return lines

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_consumer(settings: Path, log_path: Path, **env: str) -> Iterator[ConsumerProcess]:
    proc = ConsumerProcess(settings, log_path, env).start()
    try:
        yield proc
    finally:
        proc.kill()


async def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.05)


def logged(proc: ConsumerProcess, fragment: str) -> Callable[[], bool]:
    """True once the process has logged a message containing `fragment`."""
    return lambda: any(fragment in str(line.get("msg", "")) for line in proc.log_lines())


def duplicates(messages: Sequence[Message]) -> int:
    """How many outputs repeat a (source partition, offset) already seen."""
    counts = Counter(m.source for m in messages)
    return sum(n - 1 for n in counts.values())


async def scrape(port: int) -> dict[str, float]:
    """The consumer's /metrics, parsed into series name (with labels) -> value."""
    async with httpx.AsyncClient(timeout=5.0) as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    response.raise_for_status()
    return parse_exposition(response.text)


async def readiness(port: int) -> tuple[int, Any]:
    """The consumer's /readyz: (status, JSON body), or (0, None) while it does not answer."""
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            response = await http.get(f"http://127.0.0.1:{port}/readyz")
        return response.status_code, response.json()
    except (httpx.TransportError, ValueError):
        return 0, None


async def spend_per_period(bootstrap: str, group: str) -> dict[str, float]:
    """The spend topic as the ledger keeps it: period -> USD over every replica's key."""
    topic = f"{group}.llm-spend"
    count = sum((await end_offsets(bootstrap, topic)).values())
    latest: dict[bytes, float] = {}
    for message in await read_topic(bootstrap, topic, expect=count, timeout_s=30):
        if message.key is not None and message.value is not None:
            latest[message.key] = orjson.loads(message.value)["usd"]
    periods: dict[str, float] = {}
    for key, usd in latest.items():
        kind, index, _, _ = key.decode().split("/")
        periods[f"{kind}/{index}"] = periods.get(f"{kind}/{index}", 0.0) + usd
    return periods
