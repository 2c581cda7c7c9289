"""The topics: publish a file of rows, read the enriched output back, check them at start.

Both commands talk to a broker a person just named, so a broker that does not answer is the
common first failure: clients start with bounded retries, the failure becomes one
`BrokerUnreachable` that says what was tried and what to check, and every client is closed
however the command ends (no "Unclosed AIOKafkaProducer" at exit).

Nothing here creates a topic by reading it. A metadata request that names a topic creates it
on a broker with auto.create.topics.enable (aiokafka asks for that), so an input topic
subscribed to before it existed got 1 partition and a later `publish -p 3` did nothing. So
existence is asked with requests that name no topic, and a topic is subscribed to only once
it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError, for_code
from tqdm import tqdm  # type: ignore[import-untyped]

from consumer.config import KafkaSettings, Settings
from consumer.csvrows import CsvTypes, RowFileError, read_csv
from consumer.kafka.clients import connection_options
from consumer.retry import Backoff

log = logging.getLogger("consumer.topics")

# How many conversion errors a refused CSV file lists before "and N more".
_ERRORS_SHOWN = 5
_PROBE_TIMEOUT_S = 2.0
# How often a missing topic is looked for: a consumer or `tail --expect` started first notices
# it this soon after it is created.
_TOPIC_POLL_S = 1.0
_STILL_WAITING_EVERY_S = 60.0


@dataclass(frozen=True)
class Broker:
    """How to reach the broker, and where the address came from, for the error a person reads.

    `options` are aiokafka connection options (bootstrap_servers, and with a settings file its
    client id and SASL/SSL options); `source` names the flag, variable or key that set them.
    """

    options: dict[str, Any]
    source: str
    connect_timeout_s: float = 10.0

    @property
    def bootstrap(self) -> str:
        return str(self.options["bootstrap_servers"])


def start_broker(kafka: KafkaSettings) -> Broker:
    """The consumer's own broker, as `run` reaches it (with its SASL/SSL options)."""
    return Broker(connection_options(kafka), "kafka.bootstrap_servers", kafka.connect_timeout_s)


class BrokerUnreachable(Exception):
    """No client could start within the connect timeout; the message is one line to act on."""


class TopicError(Exception):
    """A topic is missing or could not be created; the message names it and what to do."""


@dataclass(frozen=True)
class PublishRow:
    key: bytes | None
    value: bytes


def read_rows(
    path: Path, key_field: str | None, csv_types: CsvTypes | None = None
) -> Iterator[PublishRow]:
    """JSONL lines are sent byte for byte (so bad rows can be published on purpose); CSV rows
    become JSON objects with converted values (see `consumer.csvrows`).

    A CSV file with fields that do not convert is refused as a whole, before anything is sent:
    half a file on the topic is harder to clean up than none.
    """
    if path.suffix.lower() == ".csv":
        yield from _csv_rows(path, key_field, csv_types)
        return
    try:
        handle = path.open("rb")
    except OSError as error:
        raise RowFileError(f"{path}: cannot read: {error.strerror}") from None
    with handle:
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


def _csv_rows(path: Path, key_field: str | None, csv_types: CsvTypes | None) -> list[PublishRow]:
    rows: list[PublishRow] = []
    errors: list[str] = []
    for record in read_csv(path, csv_types):
        if record.row is None:
            errors.append(f"line {record.line}: {record.error}")
            continue
        key = record.text.get(key_field) if key_field else None  # the key as written: "007"
        rows.append(PublishRow(key.encode() if key else None, orjson.dumps(record.row)))
    if errors:
        more = len(errors) - _ERRORS_SHOWN
        shown = "; ".join(errors[:_ERRORS_SHOWN]) + (f"; and {more} more" if more > 0 else "")
        raise RowFileError(
            f"{path}: {len(errors)} row(s) do not convert, nothing was published: {shown} "
            "(--csv-types col=str keeps a column as text, --csv-strings every column)"
        )
    return rows


async def _diagnose(bootstrap: str) -> str:
    """What a plain TCP connection to each bootstrap address says: aiokafka only reports
    "Unable to bootstrap", but a refused port, a name that does not resolve and a listener
    that speaks TLS call for different fixes."""
    findings: list[str] = []
    for address in (part.strip() for part in bootstrap.split(",") if part.strip()):
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            findings.append(f"{address!r} is not host:port")
            continue
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port)), _PROBE_TIMEOUT_S
            )
        except socket.gaierror:
            findings.append(f"{host} does not resolve")
        except ConnectionRefusedError:
            findings.append(f"{address} refused the connection (nothing listens there)")
        except TimeoutError:
            findings.append(f"{address} did not answer within {_PROBE_TIMEOUT_S:g} s")
        except OSError as error:
            findings.append(f"{address}: {error.strerror or error}")
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            findings.append(
                f"{address} accepts connections but does not answer as a Kafka broker "
                "(a TLS or SASL listener? see kafka.security_protocol)"
            )
    return "; ".join(findings)


async def _close(client: Any) -> None:
    # Producer and consumer have stop(), the admin client close(); both are safe after a
    # failed start, and the only way to keep their __del__ from warning.
    await (client.stop() if hasattr(client, "stop") else client.close())


@contextlib.asynccontextmanager
async def connected(make: Callable[[], Any], broker: Broker) -> AsyncIterator[Any]:
    """A started client built by `make`, closed on exit.

    A broker that is starting (or a port-forward coming up) refuses connections for a moment,
    so starting is retried with backoff for `broker.connect_timeout_s`; each attempt uses a
    fresh client, because aiokafka does not promise that a failed start can be repeated.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + broker.connect_timeout_s
    backoff = Backoff(0.2, 2.0)
    for attempt in itertools.count(1):
        client = make()
        try:
            await asyncio.wait_for(client.start(), max(0.1, deadline - loop.time()))
            break
        except (KafkaConnectionError, TimeoutError):
            await _close(client)
            remaining = deadline - loop.time()
            if remaining <= 0:
                findings = await _diagnose(broker.bootstrap)
                raise BrokerUnreachable(
                    f"cannot reach a Kafka broker at {broker.bootstrap} (from {broker.source}), "
                    f"tried for {broker.connect_timeout_s:g} s: {findings}. Check that the "
                    "broker runs and the address is right (-b, KAFKA_BOOTSTRAP_SERVERS, or "
                    "kafka.bootstrap_servers with -c); --connect-timeout waits longer"
                ) from None
            await asyncio.sleep(min(backoff.delay(attempt), remaining))
        except BaseException:
            await _close(client)
            raise
    try:
        yield client
    finally:
        await _close(client)


def admin_client(broker: Broker) -> Callable[[], AIOKafkaAdminClient]:
    return lambda: AIOKafkaAdminClient(**broker.options)


async def partition_counts(admin: AIOKafkaAdminClient) -> dict[str, int]:
    """Every topic's partition count, from a metadata request that names no topic (one that
    names a missing topic would create it)."""
    described = await admin.describe_topics()
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


async def create_topic(
    admin: AIOKafkaAdminClient,
    topic: str,
    partitions: int,
    replication_factor: int | None = None,
    configs: Mapping[str, object] | None = None,
) -> bool:
    """Create the topic; True if created, False if it existed, `TopicError` for any refusal.

    The broker answers a refusal (a replication factor above the broker count, a bad config
    value, no permission) in the response rather than as an exception, so it is read there.
    """
    rf = replication_factor or -1  # -1: the broker's default.replication.factor
    new = NewTopic(
        topic,
        partitions,
        rf,
        replica_assignments={} if rf == -1 else None,  # aiokafka wants exactly one of them
        topic_configs={name: str(value) for name, value in (configs or {}).items()},
    )
    response = await admin.create_topics([new])
    _, code, *message = response.topic_errors[0]
    if code == 0:
        return True
    if code == TopicAlreadyExistsError.errno:
        return False
    said = (message[0] if message else None) or "no message"
    raise TopicError(f"cannot create topic {topic}: {for_code(code).__name__}: {said}")


async def ensure_topic(broker: Broker, topic: str, partitions: int) -> int | None:
    """Create the topic with `partitions` if it is missing; None when it was created, else the
    partition count it already had (Kafka does not change it)."""
    async with connected(admin_client(broker), broker) as admin:
        if await create_topic(admin, topic, partitions):
            return None
        return (await partition_counts(admin)).get(topic)


async def check_topics(
    settings: Settings,
    broker: Broker,
    beat: Callable[[], None],
    stopping: asyncio.Event,
) -> None:
    """At `run` start, before subscribing: wait for the input topic, then check the output and
    dead-letter topics (and create them if `topics.create_missing`).

    The wait calls `beat()` (liveness: waiting is not hanging) and ends early when `stopping`
    is set; with `topics.input_wait_s` it gives up with a `TopicError` after that long.
    """
    kafka, wanted = settings.kafka, settings.topics
    loop = asyncio.get_running_loop()
    async with connected(admin_client(broker), broker) as admin:
        counts = await partition_counts(admin)
        started = loop.time()
        note_at = started
        missing_at_start = kafka.input_topic not in counts
        while kafka.input_topic not in counts:
            waited = loop.time() - started
            if wanted.input_wait_s is not None and waited >= wanted.input_wait_s:
                raise TopicError(
                    f"input topic {kafka.input_topic} does not exist (waited "
                    f"{wanted.input_wait_s:g} s, topics.input_wait_s): create it (llm-consumer "
                    "publish FILE -c SETTINGS -p PARTITIONS creates it with that many "
                    "partitions) or check kafka.input_topic"
                )
            if loop.time() >= note_at:
                log.warning(
                    "input topic does not exist; waiting for it (create it, or check "
                    "kafka.input_topic): it is not created here",
                    extra={"topic": kafka.input_topic, "waited_s": round(waited)},
                )
                note_at = loop.time() + _STILL_WAITING_EVERY_S
            beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), _TOPIC_POLL_S)
            if stopping.is_set():
                return
            counts = await partition_counts(admin)
        if missing_at_start:
            log.info(
                "input topic found",
                extra={"topic": kafka.input_topic, "partitions": counts[kafka.input_topic]},
            )
        for topic in dict.fromkeys((kafka.output_topic, kafka.dead_letter_topic)):
            if topic in counts:
                continue
            if not wanted.create_missing:
                log.warning(
                    "topic does not exist: the broker creates it on the first write (with its "
                    "defaults) only if auto.create.topics.enable is on; topics.create_missing: "
                    "true creates it here with the input's partition count",
                    extra={"topic": topic},
                )
                continue
            partitions = wanted.partitions or counts[kafka.input_topic]
            await create_topic(admin, topic, partitions, wanted.replication_factor, wanted.configs)
            log.info("topic created", extra={"topic": topic, "partitions": partitions})


async def publish(
    broker: Broker,
    topic: str,
    path: Path,
    key_field: str | None = None,
    partitions: int | None = None,
    progress: bool = True,
    csv_types: CsvTypes | None = None,
) -> int:
    """Publish every row of a JSONL or CSV file; returns how many were acknowledged.

    The file is read completely before connecting, so a file that cannot be used publishes
    nothing.
    """
    rows = list(read_rows(path, key_field, csv_types))
    if partitions:
        existing = await ensure_topic(broker, topic, partitions)
        if existing is not None and existing != partitions:
            print(
                f"note: topic {topic} already exists with {existing} partition(s); -p "
                f"{partitions} changes nothing (kafka-topics.sh --alter --partitions adds "
                "partitions, and moves keys to other partitions)",
                file=sys.stderr,
            )

    def make() -> AIOKafkaProducer:
        return AIOKafkaProducer(**broker.options, acks="all", enable_idempotence=True, linger_ms=10)

    async with connected(make, broker) as producer:
        bar = tqdm(total=len(rows), unit="row", disable=not progress, desc=f"-> {topic}")
        try:
            futures = []
            for row in rows:
                future = await producer.send(topic, value=row.value, key=row.key)
                future.add_done_callback(lambda _: bar.update(1))
                futures.append(future)
            await asyncio.gather(*futures)
        finally:
            bar.close()
    return len(rows)


def _table_line(message: Any, row: Any, response_field: str, width: int) -> str:
    key = (message.key or b"").decode("utf-8", "replace")[:12]
    where = f"{message.partition}:{message.offset}"
    headers = dict(message.headers or ())
    room = max(10, width - 8 - 12 - 24 - 6 - 8)
    if "dlq.reason" in headers:  # a dead letter: why, and the bytes as they came
        answer = "DLQ " + headers["dlq.reason"].decode("utf-8", "replace")
        text = (message.value or b"")[: room * 4].decode("utf-8", "replace")
        return f"{where:>8}  {key:<12}  {answer[:24]:<24}  {'':>6}  {_fit(text, room)}"
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
    return f"{where:>8}  {key:<12}  {answer[:24]:<24}  {tokens:>6}  {_fit(text, room)}"


def _fit(text: str, room: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= room else text[: room - 1] + "…"


async def tail(
    broker: Broker,
    topic: str,
    out: TextIO = sys.stdout,
    follow: bool = False,
    output_format: str = "table",
    response_field: str = "llm_response",
    limit: int | None = None,
    idle_timeout_s: float = 5.0,
    expect: int | None = None,
    timeout_s: float | None = None,
    dead_letters: bool = False,
) -> int:
    """Print the topic from the beginning; stop at its end unless `follow`. Returns the count.

    With `expect`, keep reading until that many messages arrived (or `timeout_s` passed):
    scripts use it to wait for a run to finish. `dead_letters` only names the table's answer
    column `dlq.reason`; dead letters are recognised by their header on any topic.
    """
    loop = asyncio.get_running_loop()
    gives_up_at = None if timeout_s is None else loop.time() + timeout_s
    idle_gives_up_at = loop.time() + idle_timeout_s

    def make() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic,
            **broker.options,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            metadata_max_age_ms=1000,
        )

    if not await _wait_for_topic(broker, topic, follow or expect is not None, gives_up_at):
        return 0
    count = 0
    async with connected(make, broker) as consumer:
        end: dict[TopicPartition, int] = {}
        width = shutil.get_terminal_size((120, 20)).columns
        if output_format == "table":
            label = "dlq.reason" if dead_letters else response_field[:24]
            print(f"{'part:off':>8}  {'key':<12}  {label:<24}  {'tokens':>6}  input", file=out)
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


async def _wait_for_topic(
    broker: Broker, topic: str, wait: bool, gives_up_at: float | None
) -> bool:
    """Whether the topic exists, asked without creating it. With `wait` (`tail -f` or
    `--expect` started before the consumer's first output) it is looked for until it exists
    or `gives_up_at`; without, a missing topic is a `TopicError`."""
    loop = asyncio.get_running_loop()
    async with connected(admin_client(broker), broker) as admin:
        while topic not in await admin.list_topics():
            if not wait:
                raise TopicError(
                    f"topic {topic} does not exist at {broker.bootstrap} (from {broker.source}); "
                    "-f or --expect waits for it"
                )
            if gives_up_at is not None and loop.time() >= gives_up_at:
                return False
            await asyncio.sleep(_TOPIC_POLL_S)
    return True


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
