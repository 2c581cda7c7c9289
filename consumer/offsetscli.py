"""`llm-consumer offsets` and `llm-consumer replay`: the operator's way back to rows already done.

Error rows and dead letters are committed like any other row, so trying them again means
publishing them again: `replay errors` re-publishes the output rows whose `{rf}_error` matches
(reason, time range, template hash) as the input rows they were, `replay dead-letters` the DLQ's
records byte for byte; keys are kept and the origin goes in `replay.*` headers. `offsets` shows
the group's committed offset and lag per partition, and moves them (to the beginning, the end,
an offset or a time) only while no member of the group runs: a running member would overwrite
the new offsets with its own at its next commit.

Both print what they would do and change nothing without `--execute`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.config import Settings
from consumer.topics import Broker, TopicError, admin_client, connected, partition_counts

# Reading a topic to its end gives up after this long without a new record.
_READ_IDLE_S = 10.0
_REPLAY_HEADER = "replay."


def _timestamp_ms(text: str) -> int:
    """ISO 8601 (a date, or date and time; UTC when no zone is given) -> epoch milliseconds."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (e.g. 2026-12-01T07:00:00Z or 2026-12-01)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "what",
        choices=("errors", "dead-letters"),
        help="errors: output rows carrying {rf}_error; dead-letters: the DLQ's records",
    )
    parser.add_argument(
        "--reason",
        action="append",
        metavar="REASON",
        help="only these reasons ({rf}_error.reason, or dlq.reason); repeat for several",
    )
    parser.add_argument(
        "--since", type=_timestamp_ms, metavar="TIME", help="only records written at or after"
    )
    parser.add_argument(
        "--until", type=_timestamp_ms, metavar="TIME", help="only records written before"
    )
    parser.add_argument(
        "--template-hash", metavar="HASH", help="errors only: rows of this {rf}_template_hash"
    )
    parser.add_argument("-n", "--limit", type=int, metavar="N", help="at most N records")
    parser.add_argument(
        "--execute", action="store_true", help="publish them (without: say what would be)"
    )


def add_offsets_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", help="consumer group (default: kafka.group_id of -c)")
    parser.add_argument(
        "--reset",
        metavar="TO",
        help="move the committed offsets to: earliest, latest, an offset, or an ISO 8601 time "
        "(the first record written at or after it); only while the group has no member",
    )
    parser.add_argument(
        "--partition",
        type=int,
        action="append",
        metavar="P",
        help="with --reset: only this partition; repeat for several (default: all)",
    )
    parser.add_argument(
        "--execute", action="store_true", help="with --reset: commit (without: show the plan)"
    )


# ---- replay -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replayed:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    reason: str


def _header(headers: dict[str, bytes], name: str) -> str | None:
    value = headers.get(name)
    return value.decode("utf-8", "replace") if value is not None else None


def _origin(message: Any, headers: dict[str, bytes], reason: str) -> list[tuple[str, bytes]]:
    """Where the replayed record was read from, and the input it came from first."""
    origin = [
        ("replay.topic", message.topic.encode()),
        ("replay.partition", str(message.partition).encode()),
        ("replay.offset", str(message.offset).encode()),
        ("replay.reason", reason.encode()),
    ]
    for name in ("topic", "partition", "offset"):
        if f"source.{name}" in headers:
            origin.append((f"replay.source.{name}", headers[f"source.{name}"]))
    return origin


def select_error_row(
    message: Any, response_field: str, reasons: set[str] | None, template_hash: str | None
) -> Replayed | None:
    """The input row an output row was made from, when it carries a matching error."""
    try:
        row = orjson.loads(message.value) if message.value else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(row, dict):
        return None
    error = row.get(f"{response_field}_error")
    if not isinstance(error, dict):
        return None
    reason = str(error.get("reason"))
    if reasons is not None and reason not in reasons:
        return None
    if template_hash is not None and row.get(f"{response_field}_template_hash") != template_hash:
        return None
    # The consumer adds `{rf}` and `{rf}_*` to the input object: what is left is the input.
    prefix = f"{response_field}_"
    original = {k: v for k, v in row.items() if k != response_field and not k.startswith(prefix)}
    headers = dict(message.headers or ())
    return Replayed(message.key, orjson.dumps(original), _origin(message, headers, reason), reason)


def select_dead_letter(message: Any, reasons: set[str] | None) -> Replayed | str | None:
    """The record as it came, with its own headers; "stub" for a stub (only its first KB)."""
    headers = dict(message.headers or ())
    reason = _header(headers, "dlq.reason")
    if reason is None or (reasons is not None and reason not in reasons):
        return None
    if _header(headers, "dlq.truncated") == "true":
        return "stub"
    own = [
        (k, v)
        for k, v in message.headers or ()
        if not k.startswith(("dlq.", "source.", "window.", _REPLAY_HEADER))
    ]
    value = message.value if message.value is not None else b""
    return Replayed(message.key, value, own + _origin(message, headers, reason), reason)


async def read_to_end(
    broker: Broker,
    topic: str,
    handle: Callable[[Any], bool],
    since_ms: int | None = None,
    idle_s: float = _READ_IDLE_S,
) -> None:
    """Every record of the topic up to its end as it is now, oldest first per partition; from
    the first one at or after `since_ms`. `handle` returns False to stop early. No group."""
    async with connected(admin_client(broker), broker) as admin:
        counts = await partition_counts(admin)
    if topic not in counts:
        raise TopicError(f"topic {topic} does not exist at {broker.bootstrap}")
    tps = [TopicPartition(topic, p) for p in range(counts[topic])]

    def make() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            **broker.options, enable_auto_commit=False, isolation_level="read_committed"
        )

    loop = asyncio.get_running_loop()
    async with connected(make, broker) as consumer:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        # Explicit offsets: seek_to_beginning() is applied lazily, and a position() asked
        # before it was could still answer the default reset (latest).
        for tp, start in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, start)
        if since_ms is not None:
            for tp, found in (
                await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
            ).items():
                consumer.seek(tp, found.offset if found is not None else ends[tp])
        idle_until = loop.time() + idle_s
        while True:
            left = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
            if not left or loop.time() > idle_until:
                return
            batch = await consumer.getmany(*left, timeout_ms=500)
            for tp, messages in batch.items():
                idle_until = loop.time() + idle_s
                for message in messages:
                    if message.offset >= ends[tp]:
                        break
                    if not handle(message):
                        return


async def replay(args: argparse.Namespace, settings: Settings, broker: Broker) -> int:
    kafka = settings.kafka
    errors = args.what == "errors"
    source = kafka.output_topic if errors else kafka.dead_letter_topic
    target: str = args.topic or kafka.input_topic
    reasons = set(args.reason) if args.reason else None
    chosen: list[Replayed] = []
    stubs = 0

    def handle(message: Any) -> bool:
        nonlocal stubs
        if args.until is not None and message.timestamp >= args.until:
            return True
        picked: Replayed | str | None
        if errors:
            picked = select_error_row(
                message, settings.llm.response_field, reasons, args.template_hash
            )
        else:
            picked = select_dead_letter(message, reasons)
        if picked == "stub":
            stubs += 1
        elif isinstance(picked, Replayed):
            chosen.append(picked)
        return args.limit is None or len(chosen) < args.limit

    await read_to_end(broker, source, handle, args.since)
    by_reason = Counter(r.reason for r in chosen)
    listed = ", ".join(f"{reason} {n}" for reason, n in by_reason.most_common()) or "none"
    what = "error rows" if errors else "dead letters"
    print(f"{source}: {len(chosen)} {what} to replay to {target} ({listed})")
    if stubs:
        print(f"  {stubs} stub dead letters skipped: they hold only the first KB of the record")
    if not args.execute or not chosen:
        if chosen:
            print("  nothing published: add --execute to publish them")
        return 0

    def make() -> AIOKafkaProducer:
        return AIOKafkaProducer(**broker.options, acks="all", enable_idempotence=True)

    async with connected(make, broker) as producer:
        sent = [
            await producer.send(target, value=r.value, key=r.key, headers=r.headers) for r in chosen
        ]
        await asyncio.gather(*sent)
    print(f"  published {len(chosen)} to {target}")
    return 0


# ---- offsets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupState:
    state: str
    members: list[str]  # client id @ host


async def describe_group(admin: Any, group: str) -> GroupState:
    for response in await admin.describe_consumer_groups([group]):
        for described in response.groups:
            _, group_id, state, _, _, members, *_ = described
            if group_id == group:
                # The broker gives the host as "/10.0.0.7" (Java's InetAddress.toString).
                return GroupState(state, [f"{m[1]}@{str(m[2]).lstrip('/')}" for m in members])
    return GroupState("Dead", [])


def reset_target(text: str) -> str | int:
    """earliest, latest, an offset (int), or a time; a bad one is a usage error."""
    if text in ("earliest", "latest"):
        return text
    if text.lstrip("-").isdigit():
        if int(text) < 0:
            raise argparse.ArgumentTypeError(f"--reset takes an offset >= 0, got {text}")
        return int(text)
    _timestamp_ms(text)  # raises with the accepted forms
    return text


async def offsets(args: argparse.Namespace, settings: Settings | None, broker: Broker) -> int:
    group: str | None = args.group or (settings.kafka.group_id if settings else None)
    topic: str | None = args.topic or (settings.kafka.input_topic if settings else None)
    if group is None or topic is None:
        print("error: offsets needs -c settings.yaml, or --group and -t", file=sys.stderr)
        return 2
    target = reset_target(args.reset) if args.reset is not None else None
    async with connected(admin_client(broker), broker) as admin:
        counts = await partition_counts(admin)
        if topic not in counts:
            raise TopicError(f"topic {topic} does not exist at {broker.bootstrap}")
        described = await describe_group(admin, group)
        committed = {
            tp.partition: meta.offset
            for tp, meta in (await admin.list_consumer_group_offsets(group)).items()
            if tp.topic == topic
        }
    tps = [TopicPartition(topic, p) for p in range(counts[topic])]

    def make() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(**broker.options, group_id=group, enable_auto_commit=False)

    async with connected(make, broker) as consumer:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        members = ", ".join(described.members) or "none"
        print(f"group {group} ({described.state}; members: {members}), topic {topic}")
        print(f"{'partition':>9}  {'start':>10}  {'committed':>10}  {'end':>10}  {'lag':>8}")
        total = 0
        for tp in tps:
            done = committed.get(tp.partition, -1)
            lag = ends[tp] - (done if done >= 0 else starts[tp])
            total += lag
            shown = str(done) if done >= 0 else "-"
            print(f"{tp.partition:>9}  {starts[tp]:>10}  {shown:>10}  {ends[tp]:>10}  {lag:>8}")
        print(f"{'total':>9}  {'':>10}  {'':>10}  {'':>10}  {total:>8}")
        if target is None:
            return 0
        chosen = [tp for tp in tps if args.partition is None or tp.partition in args.partition]
        if isinstance(target, str) and target not in ("earliest", "latest"):
            found = await consumer.offsets_for_times(dict.fromkeys(chosen, _timestamp_ms(target)))
            plan = {tp: (f.offset if f is not None else ends[tp]) for tp, f in found.items()}
        elif target == "earliest":
            plan = {tp: starts[tp] for tp in chosen}
        elif target == "latest":
            plan = {tp: ends[tp] for tp in chosen}
        else:
            assert isinstance(target, int)
            plan = {tp: min(max(target, starts[tp]), ends[tp]) for tp in chosen}
        for tp, offset in sorted(plan.items()):
            print(
                f"  reset partition {tp.partition}: {committed.get(tp.partition, '-')} -> {offset}"
            )
        if not args.execute:
            print("  nothing committed: add --execute to reset (with the group stopped)")
            return 0
        if described.members:
            print(
                f"error: group {group} has {len(described.members)} active member(s) "
                f"({members}): stop them first, or they commit over the reset",
                file=sys.stderr,
            )
            return 1
        await consumer.commit(plan)
    print(f"  committed for group {group}")
    return 0
