"""Issue 10, "one bad row must never stop a topic": the six poison cases, in both delivery modes.

Each case publishes good rows around the poison, runs the consumer as a real process against the
real broker and the real fake-LLM process, and reads the output and dead-letter topics back as
they fill. The contract, every time: the consumer keeps running; every input ends as an output
(an enriched row, or one with `llm_response_error`) or as a dead letter that says why; the rows
behind the poison come out; the offsets are committed to the end of the input; nothing is
missing, and in exactly-once nothing is duplicated for a read_committed reader.
"""

from __future__ import annotations

import asyncio
import decimal
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.fake_llm_process import FakeLLM, fake_llm_process
from tests.support.kafka_broker import private_local_broker, stop_local_broker
from tests.support.ledger import Ledger, account
from tests.support.pipeline import (
    ConsumerProcess,
    Message,
    Topics,
    end_offsets,
    settings_file,
    wait_for_commits,
)

pytestmark = pytest.mark.faults

MODES = ("at_least_once", "exactly_once")
MiB = 1024 * 1024
FAST_GROUP = {"session_timeout_ms": 6_000, "heartbeat_interval_ms": 1_000}
# Every knob that makes a row that always fails give up quickly (cases 1-5).
FAST_RETRY = {
    "max_attempts": 2,
    "row_deadline_s": 5,
    "partial_window_retries": 1,
    "window_backoff_max_s": 1,
    "initial_backoff_s": 0.05,
    "max_backoff_s": 0.2,
}
GOOD_TEXT = "great and reliable"
TEMPLATE = "Review: {{ row.text }}"

Record = tuple[bytes | None, bytes | None]


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeLLM]:
    with fake_llm_process("--latency-ms", "5") as server:
        yield server


# ---- topics, publishing, reading back ------------------------------------------------------


async def create(bootstrap: str, *topics: NewTopic) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(list(topics))
    finally:
        await admin.close()


def topic(name: str, partitions: int = 1, max_message_bytes: int | None = None) -> NewTopic:
    configs = {} if max_message_bytes is None else {"max.message.bytes": str(max_message_bytes)}
    return NewTopic(name, partitions, 1, topic_configs=configs)


async def publish(
    bootstrap: str, name: str, records: Sequence[Record], partitions: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Send in order, records of several MB included; returns each one's (partition, offset)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=8 * MiB
    )
    await producer.start()
    try:
        futures = [
            await producer.send(
                name, value=value, key=key, partition=None if partitions is None else partitions[i]
            )
            for i, (key, value) in enumerate(records)
        ]
        sent = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(meta.partition, meta.offset) for meta in sent]


@dataclass
class Arrivals:
    """What came out, and when the last input was first covered by an output or dead letter."""

    outputs: list[Message] = field(default_factory=list)
    dead: list[Message] = field(default_factory=list)
    complete_at: float | None = None

    def errors(self) -> dict[bytes | None, str]:
        """Key -> reason of every output that carries a row error."""
        return {
            m.key: m.json()["llm_response_error"]["reason"]
            for m in self.outputs
            if m.json()["llm_response_error"] is not None
        }

    def reasons(self) -> dict[bytes | None, str]:
        return {m.key: m.headers["dlq.reason"] for m in self.dead}

    def output(self, key: bytes) -> Message:
        (match,) = [m for m in self.outputs if m.key == key]
        return match


async def collect(
    bootstrap: str,
    topics: Topics,
    inputs: Sequence[tuple[int, int]],
    timeout_s: float,
    settle_s: float = 2.0,
) -> Arrivals:
    """Read outputs and dead letters (read_committed) until they cover `inputs`, then `settle_s`
    more to catch duplicates; bounded by `timeout_s`."""
    reader = AIOKafkaConsumer(
        topics.output,
        topics.dlq,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        metadata_max_age_ms=1000,
        max_partition_fetch_bytes=8 * MiB,
        fetch_max_bytes=64 * MiB,
    )
    await reader.start()
    arrivals = Arrivals()
    wanted, seen = set(inputs), set()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batch = await reader.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    headers = {k: v.decode("utf-8", "replace") for k, v in r.headers or ()}
                    message = Message(r.topic, r.partition, r.offset, r.key, r.value, headers)
                    (arrivals.dead if r.topic == topics.dlq else arrivals.outputs).append(message)
                    seen.add(message.source)
            if arrivals.complete_at is None and wanted <= seen:
                arrivals.complete_at = time.monotonic()
                deadline = min(deadline, arrivals.complete_at + settle_s)
    finally:
        await reader.stop()
    return arrivals


# ---- the consumer and its readiness --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Run:
    """One consumer process under test, with its /readyz port and the moment it started."""

    proc: ConsumerProcess
    port: int
    started: float

    @property
    def alive(self) -> bool:
        assert self.proc.process is not None
        return self.proc.process.poll() is None

    def seconds_to(self, arrivals: Arrivals) -> float | None:
        if arrivals.complete_at is None:
            return None
        return round(arrivals.complete_at - self.started, 1)


def log_path(tmp_path: Path, topics: Topics) -> Path:
    return tmp_path / f"consumer-{topics.group}.log"


def start(
    tmp_path: Path,
    bootstrap: str,
    fake: FakeLLM,
    topics: Topics,
    mode: str,
    *,
    observability: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> Run:
    port = free_port()
    kafka = {**FAST_GROUP, **sections.pop("kafka", {})}
    window = {"max_messages": 20, "max_wait_ms": 300, **sections.pop("window", {})}
    settings = settings_file(
        tmp_path,
        bootstrap,
        fake.base_url,
        topics,
        TEMPLATE,
        kafka=kafka,
        window=window,
        delivery={"mode": mode, "shutdown_grace_s": 15},
        observability={"host": "127.0.0.1", "port": port, **(observability or {})},
        **sections,
    )
    proc = ConsumerProcess(settings, log_path(tmp_path, topics)).start()
    return Run(proc, port, time.monotonic())


async def readiness(port: int) -> tuple[int, dict[str, Any]]:
    """/readyz status and body; (0, {}) while nothing listens."""
    try:
        async with httpx.AsyncClient(timeout=2.0) as http:
            response = await http.get(f"http://127.0.0.1:{port}/readyz")
    except httpx.TransportError:
        return 0, {}
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        body = {}
    return response.status_code, body


async def until_ready_says(
    port: int, wanted: Callable[[int, dict[str, Any]], bool], timeout_s: float
) -> dict[str, Any]:
    """Poll /readyz every 0.1 s until `wanted(status, body)`; returns the body. Bounded."""
    deadline = time.monotonic() + timeout_s
    status, body = 0, dict[str, Any]()
    while time.monotonic() < deadline:
        status, body = await readiness(port)
        if wanted(status, body):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"/readyz never matched in {timeout_s} s; last: {status} {body}")


def problems_of(body: dict[str, Any]) -> str:
    return "; ".join(str(p) for p in body.get("problems", []))


def mentions(*words: str) -> Callable[[int, dict[str, Any]], bool]:
    def check(status: int, body: dict[str, Any]) -> bool:
        text = problems_of(body).lower()
        return status == 503 and any(word in text for word in words)

    return check


async def readyz_summary(port: int) -> str:
    status, body = await readiness(port)
    return "200" if status == 200 else f"{status}: {problems_of(body)[:60]}"


async def finish(run: Run, bootstrap: str, topics: Topics) -> None:
    """The consumer still runs, has committed every input, and stops cleanly."""
    ends = await end_offsets(bootstrap, topics.input)
    committed = await wait_for_commits(bootstrap, topics.group, topics.input, timeout_s=30)
    assert run.alive, "the consumer must keep running:\n" + run.proc.log_text()[-3000:]
    assert all(committed.get(p, -1) >= end for p, end in ends.items()), (committed, ends)
    assert run.proc.stop() == 0


def ledger(
    name: str, mode: str, inputs: Sequence[tuple[int, int]], arrivals: Arrivals, **columns: Any
) -> Ledger:
    """The case's ledger line; nothing missing, and no duplicates in exactly-once."""
    entry = account(
        f"{name} ({mode})",
        inputs,
        arrivals.outputs,
        arrivals.dead,
        row_errors=len(arrivals.errors()),
        **columns,
    )
    assert entry.missing == 0, entry.missing_examples
    if mode == "exactly_once":
        assert entry.duplicates == 0
    return entry


def once_each(arrivals: Arrivals) -> Counter[tuple[int, int]]:
    """Per source offset, how many records came out (outputs and dead letters) beyond one."""
    counts = Counter(m.source for m in [*arrivals.outputs, *arrivals.dead])
    return Counter({source: n - 1 for source, n in counts.items() if n > 1})


def good(key: str, text: str = GOOD_TEXT) -> Record:
    return key.encode(), orjson.dumps({"id": key, "text": text})


async def run_case(
    scenario: str,
    tmp_path: Path,
    bootstrap: str,
    fake: FakeLLM,
    topics: Topics,
    mode: str,
    inputs: Sequence[tuple[int, int]],
    timeout_s: float = 45,
    **sections: dict[str, Any],
) -> Arrivals:
    """Start the consumer and read until every input is covered; write the ledger line (with
    what /readyz says once it is all out), then check nothing is missing and it finished."""
    run = start(tmp_path, bootstrap, fake, topics, mode, **sections)
    try:
        arrivals = await collect(bootstrap, topics, inputs, timeout_s)
        ledger(
            scenario,
            mode,
            inputs,
            arrivals,
            seconds_to_move_on=run.seconds_to(arrivals),
            readyz=await readyz_summary(run.port),
        )
        await finish(run, bootstrap, topics)
    finally:
        run.proc.kill()
    return arrivals


# ---- 1. rows nested too deep ---------------------------------------------------------------


def nested(depth: int) -> bytes:
    """A row `depth` levels deep (the row itself is level 1) with a text at its top level."""
    inner = '{"a":' * (depth - 2) + "{}" + "}" * (depth - 2)
    return f'{{"text":"{GOOD_TEXT}","nest":{inner}}}'.encode()


@pytest.mark.parametrize("mode", MODES)
async def test_rows_nested_too_deep_are_dead_letters_and_the_rows_behind_them_come_out(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path, mode: str
) -> None:
    topics = Topics.unique(f"deep-{mode}")
    await create(kafka_bootstrap, topic(topics.input), topic(topics.output), topic(topics.dlq))
    records = [good("g0"), (b"deep-255", nested(255)), good("g1"), (b"deep-2000", nested(2000))]
    records += [good("g2"), (b"deep-64", nested(64)), good("g3"), (b"deep-65", nested(65))]
    records += [good("g4"), good("g5")]
    inputs = await publish(kafka_bootstrap, topics.input, records)

    arrivals = await run_case(
        "P1. 255/2000/65-deep rows, 64 enriched",
        tmp_path,
        kafka_bootstrap,
        fake_llm,
        topics,
        mode,
        inputs,
    )

    assert arrivals.reasons() == {
        b"deep-255": "too_deep",
        b"deep-2000": "too_deep",
        b"deep-65": "too_deep",
    }
    assert arrivals.errors() == {}
    at_the_limit = arrivals.output(b"deep-64").json()
    assert at_the_limit["llm_response"] == "POSITIVE"
    assert arrivals.output(b"deep-64").value.startswith(nested(64)[:-1])  # type: ignore[union-attr]
    assert {m.key for m in arrivals.outputs} == {b"deep-64", *(f"g{i}".encode() for i in range(6))}


# ---- 2. a dead letter that does not fit the DLQ --------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_2_mb_row_becomes_a_dead_letter_stub_and_its_window_is_not_repeated(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path, mode: str
) -> None:
    topics = Topics.unique(f"twomb-{mode}")
    await create(
        kafka_bootstrap,
        topic(topics.input, max_message_bytes=8 * MiB),
        topic(topics.output),
        topic(topics.dlq),  # the broker's default limit, about 1 MiB
    )
    huge = orjson.dumps({"id": "huge", "text": GOOD_TEXT + " " + "x" * 2_000_000})
    records = [good(f"before-{i}") for i in range(4)]
    records += [(b"huge", huge), *(good(f"after-{i}") for i in range(4))]
    inputs = await publish(kafka_bootstrap, topics.input, records)

    arrivals = await run_case(
        "P2. 2 MB row, dead letter too large for the DLQ",
        tmp_path,
        kafka_bootstrap,
        fake_llm,
        topics,
        mode,
        inputs,
    )

    (stub,) = arrivals.dead
    assert stub.key == b"huge" and stub.source == inputs[4]
    assert stub.headers["dlq.reason"] == "too_large"
    assert stub.headers["dlq.truncated"] == "true"
    assert stub.headers["dlq.original_value_bytes"] == str(len(huge))
    assert stub.value == huge[:1024]
    assert len(arrivals.outputs) == 8 and arrivals.errors() == {}
    assert once_each(arrivals) == Counter(), "a refused dead letter must not repeat its window"
    assert "record refused by the broker; replaced" in log_path(tmp_path, topics).read_text()


# ---- 3. an output the broker refuses, and a 1 MB key ---------------------------------------

# 3000 bytes is below the producer's batch size (256 KiB): valid outputs share batches with the
# one that outgrows the limit. 300 KB is above it, as a topic's limit is by default, so there a
# batch is only refused when a record in it is too large alone.
OUTPUT_LIMITS = (3_000, 300_000)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("limit", OUTPUT_LIMITS, ids=lambda limit: f"output-limit-{limit}")
async def test_an_output_over_the_topic_limit_and_a_1_mb_key_become_dead_letters(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path, mode: str, limit: int
) -> None:
    topics = Topics.unique(f"refused-{mode}")
    await create(
        kafka_bootstrap,
        topic(topics.input, max_message_bytes=8 * MiB),
        topic(topics.output, max_message_bytes=limit),
        topic(topics.dlq),
    )
    # Under kafka.max_row_bytes and the output limit; the response fields take it over.
    grows = orjson.dumps({"id": "grows", "text": GOOD_TEXT + " " + "y" * (limit - 400)})
    assert len(grows) < limit
    big_key = b"k" * MiB
    records = [good("g0"), good("g1"), (b"grows", grows), good("g2"), good("g3")]
    records += [(big_key, orjson.dumps({"id": "big-key", "text": GOOD_TEXT})), good("g4")]
    records += [good("g5")]
    inputs = await publish(kafka_bootstrap, topics.input, records)

    arrivals = await run_case(
        f"P3. output over a {limit} B limit + 1 MB key",
        tmp_path,
        kafka_bootstrap,
        fake_llm,
        topics,
        mode,
        inputs,
    )

    assert sorted(m.key or b"" for m in arrivals.outputs) == [f"g{i}".encode() for i in range(6)]
    assert arrivals.errors() == {}
    by_source = {m.source: m for m in arrivals.dead}
    assert len(arrivals.dead) == 2
    rejected, keyed = by_source[inputs[2]], by_source[inputs[5]]
    assert rejected.headers["dlq.reason"] == "output_rejected"
    assert rejected.value == grows and rejected.key == b"grows"
    assert keyed.headers["dlq.reason"] == "key_too_large"
    if keyed.headers.get("dlq.truncated") == "true":  # the 1 MB key does not fit the DLQ either
        assert keyed.key == big_key[:1024]
        assert keyed.headers["dlq.original_key_bytes"] == str(len(big_key))
    else:
        assert keyed.key == big_key
    assert once_each(arrivals) == Counter(), "a refused output must not repeat its window"


# ---- 4. rows that fail every attempt -------------------------------------------------------

ALWAYS_FAILING = {
    7: "hang",
    301: "hang",
    599: "hang",  # the last row of partition 5
    44: "error200",
    350: "error200",
    594: "error200",  # the last row of partition 0
    90: "malformed",
    455: "malformed",
    598: "malformed",  # the last row of partition 4
}


@pytest.mark.parametrize("mode", MODES)
async def test_rows_that_fail_every_attempt_end_as_row_errors_in_bounded_time(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path, mode: str
) -> None:
    topics = Topics.unique(f"failing-{mode}")
    partitions = 6
    await create(
        kafka_bootstrap,
        topic(topics.input, partitions),
        topic(topics.output, partitions),
        topic(topics.dlq),
    )
    records = [
        good(f"r{i}", f"{GOOD_TEXT} {i} [[fake:{ALWAYS_FAILING[i]}]]")
        if i in ALWAYS_FAILING
        else good(f"r{i}", f"{GOOD_TEXT} {i}")
        for i in range(600)
    ]
    inputs = await publish(
        kafka_bootstrap, topics.input, records, [i % partitions for i in range(600)]
    )

    arrivals = await run_case(
        "P4. 9 rows hang/error200/malformed, 600 rows",
        tmp_path,
        kafka_bootstrap,
        fake_llm,
        topics,
        mode,
        inputs,
        timeout_s=40,
        window={"max_messages": 50, "max_wait_ms": 300},
        llm={"request_timeout_s": 1, "retry": FAST_RETRY},
    )

    assert arrivals.dead == []
    assert arrivals.errors() == {f"r{i}".encode(): "retries_exhausted" for i in ALWAYS_FAILING}
    assert len({m.source for m in arrivals.outputs}) == 600


# ---- 5. big numbers ------------------------------------------------------------------------

NUMBERS = {
    "2**64": str(2**64),
    "2**100": str(2**100),
    "-2**100": str(-(2**100)),
    "30 digits": "0.123456789012345678901234567891",
    "-0.0": "-0.0",
    "1e-400": "1e-400",
    "long decimal": "12345678901234567890.123456789",
}


def exactly(parsed: Any, text: str) -> bool:
    """`parsed` (from json.loads with Decimal floats) is the number `text`, digit for digit."""
    if isinstance(parsed, int):
        return str(parsed) == text
    return isinstance(parsed, decimal.Decimal) and (
        parsed.as_tuple() == decimal.Decimal(text).as_tuple()
    )


@pytest.mark.parametrize("mode", MODES)
async def test_big_numbers_keep_their_digits(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path, mode: str
) -> None:
    topics = Topics.unique(f"numbers-{mode}")
    await create(kafka_bootstrap, topic(topics.input), topic(topics.output), topic(topics.dlq))
    records: list[Record] = [
        (name.encode(), f'{{"text": "{GOOD_TEXT}", "n": {n}, "deep": {{"list": [{n}]}}}}'.encode())
        for name, n in NUMBERS.items()
    ]
    every = ", ".join(NUMBERS.values())
    records.append((b"all", f'{{"text":"{GOOD_TEXT}","all":[{every}]}}'.encode()))
    inputs = await publish(kafka_bootstrap, topics.input, records)

    arrivals = await run_case(
        "P5. big numbers keep their digits",
        tmp_path,
        kafka_bootstrap,
        fake_llm,
        topics,
        mode,
        inputs,
    )

    assert arrivals.dead == [] and arrivals.errors() == {}
    for name, text in NUMBERS.items():
        output = arrivals.output(name.encode())
        assert output.value is not None and text.encode() in output.value, name
        row = json.loads(output.value, parse_float=decimal.Decimal)
        assert exactly(row["n"], text) and exactly(row["deep"]["list"][0], text), (name, row)
        assert row["llm_response"] == "POSITIVE"
    together = arrivals.output(b"all")
    assert together.value is not None and f"[{every}]".encode() in together.value
    values = json.loads(together.value, parse_float=decimal.Decimal)["all"]
    assert all(exactly(v, t) for v, t in zip(values, NUMBERS.values(), strict=True)), values


# ---- 6. readiness says what is wrong within 5 s --------------------------------------------

OBSERVE = {"lag_interval_s": 0.5, "stuck_partition_after_s": 3}
OUTAGE_S = 10
OUTAGE_RETRY = {
    "max_attempts": 3,
    "initial_backoff_s": 0.05,
    "max_backoff_s": 0.2,
    "window_backoff_max_s": 1,
}


def is_ready(status: int, body: dict[str, Any]) -> bool:
    return status == 200


def has_stuck_partitions(status: int, body: dict[str, Any]) -> bool:
    return status == 503 and bool(body.get("stuck_partitions"))


@pytest.mark.parametrize("mode", MODES)
async def test_readyz_names_a_failing_provider_and_a_stuck_partition_within_5_s(
    kafka_bootstrap: str, tmp_path: Path, mode: str
) -> None:
    topics = Topics.unique(f"ready-{mode}")
    await create(
        kafka_bootstrap, topic(topics.input, 2), topic(topics.output, 2), topic(topics.dlq)
    )
    inputs = await publish(kafka_bootstrap, topics.input, [good(f"a{i}") for i in range(100)])
    with fake_llm_process("--latency-ms", "5") as llm:
        run = start(
            tmp_path,
            kafka_bootstrap,
            llm,
            topics,
            mode,
            observability=OBSERVE,
            window={"max_messages": 10, "max_wait_ms": 200},
            # No row_deadline_s: rows at the edge of the outage wait it out (default 600 s).
            llm={"retry": OUTAGE_RETRY},
        )
        try:
            await until_ready_says(run.port, is_ready, 60)
            llm.configure(outage={"status": 503, "seconds": OUTAGE_S})
            began = time.monotonic()
            inputs += await publish(
                kafka_bootstrap, topics.input, [good(f"b{i}") for i in range(100)]
            )
            provider = await until_ready_says(run.port, mentions("provider"), 10)
            provider_s = time.monotonic() - began
            stuck = await until_ready_says(run.port, has_stuck_partitions, 10)
            stuck_s = time.monotonic() - began
            await until_ready_says(run.port, is_ready, OUTAGE_S + 20)
            ready_s = time.monotonic() - began
            arrivals = await collect(kafka_bootstrap, topics, inputs, timeout_s=30)
            ledger(
                "P6a/c. provider outage 10 s: readyz",
                mode,
                inputs,
                arrivals,
                readyz=f"503 provider @{provider_s:.1f}s, stuck @{stuck_s:.1f}s, "
                f"200 @{ready_s:.1f}s",
            )
            await finish(run, kafka_bootstrap, topics)
        finally:
            run.proc.kill()

    assert provider_s <= 5, provider
    # Stuck has its own threshold (3 s without progress, with lag), then one lag probe (0.5 s).
    assert stuck_s <= OBSERVE["stuck_partition_after_s"] + 3, stuck
    assert set(stuck["stuck_partitions"]) <= {f"{topics.input}/0", f"{topics.input}/1"}
    assert arrivals.errors() == {}, "an outage must not produce error rows"
    assert arrivals.dead == []


@pytest.mark.parametrize("mode", MODES)
async def test_readyz_does_not_blame_the_provider_for_a_row_it_answered(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path, mode: str
) -> None:
    """A row whose answer is malformed (HTTP 200, cut short) fails on its own: the provider
    answered it, and served every other row. Once it is an error row nothing is wrong, so
    /readyz is 200, also past the 2 s after which failures count as a failing provider."""
    topics = Topics.unique(f"answered-{mode}")
    await create(kafka_bootstrap, topic(topics.input), topic(topics.output), topic(topics.dlq))
    records = [good(f"g{i}") for i in range(10)]
    records.append(good("malformed", f"{GOOD_TEXT} [[fake:malformed]]"))  # the last request
    inputs = await publish(kafka_bootstrap, topics.input, records)
    run = start(tmp_path, kafka_bootstrap, fake_llm, topics, mode, llm={"retry": FAST_RETRY})
    try:
        arrivals = await collect(kafka_bootstrap, topics, inputs, timeout_s=45)
        await asyncio.sleep(1)  # with collect's 2 s settle: past ProviderHealth's 2 s
        status, body = await readiness(run.port)
        ledger(
            "P6d. malformed 200 row, then readyz",
            mode,
            inputs,
            arrivals,
            seconds_to_move_on=run.seconds_to(arrivals),
            readyz=await readyz_summary(run.port),
        )
        await finish(run, kafka_bootstrap, topics)
    finally:
        run.proc.kill()

    assert arrivals.errors() == {b"malformed": "retries_exhausted"}
    assert status == 200, body


async def test_readyz_names_an_unreachable_broker_within_5_s(
    fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """Both delivery modes at once, against a broker of the test's own that it then stops."""
    with private_local_broker() as broker:
        bootstrap = broker.bootstrap
        runs: dict[str, tuple[Topics, list[tuple[int, int]], Run]] = {}
        for mode in MODES:
            topics = Topics.unique(f"broker-{mode}")
            await create(bootstrap, topic(topics.input), topic(topics.output), topic(topics.dlq))
            inputs = await publish(bootstrap, topics.input, [good(f"r{i}") for i in range(30)])
            runs[mode] = topics, inputs, start(tmp_path, bootstrap, fake_llm, topics, mode)
        try:
            arrivals = {}
            for mode, (topics, inputs, run) in runs.items():
                arrivals[mode] = await collect(bootstrap, topics, inputs, timeout_s=45)
                committed = await wait_for_commits(bootstrap, topics.group, topics.input)
                assert sum(committed.values()) == len(inputs)
                await until_ready_says(run.port, is_ready, 30)
            stopping = time.monotonic()  # the clock starts before the kill: the strict measure
            stop_local_broker(broker, kill=True)  # SIGKILL, as in a crash
            stop_call_s = time.monotonic() - stopping

            async def names_the_broker(run: Run) -> float:
                await until_ready_says(run.port, mentions("broker"), 10)
                return time.monotonic() - stopping

            took = await asyncio.gather(*(names_the_broker(run) for _, _, run in runs.values()))
            await asyncio.sleep(1)
            alive = [run.alive for _, _, run in runs.values()]
        finally:
            for _, _, run in runs.values():
                run.proc.kill()

    for (mode, (_, inputs, _)), seconds in zip(runs.items(), took, strict=True):
        ledger(
            "P6b. broker stopped: readyz",
            mode,
            inputs,
            arrivals[mode],
            readyz=f"503 broker @{seconds:.1f}s from kill (kill call {stop_call_s:.1f}s)",
        )
    assert all(alive), "the consumer must keep running without its broker"
    assert max(took) <= 5, took
