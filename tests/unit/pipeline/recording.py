"""Shared helpers for the pipeline step tests: a recording next step, and small fakes.

`Recording` stands in for whatever step comes next: it keeps what it took, can be told to
reject, and counts the protocol calls it received. The other helpers build records, items,
windows and row outcomes, and fake the clock, `sleep`, the wakeup and the provider's health,
so no test sleeps, talks to Kafka or makes an HTTP call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Generic, Literal, TypeVar

import orjson

from consumer.config import LLMSettings
from consumer.decode import RowLimits, decode_row
from consumer.enrich.outcome import OutputFields, RowOutcome
from consumer.enrich.template import PromptTemplate
from consumer.llm.client import Completion, Usage
from consumer.llm.errors import FailureKind, RowError
from consumer.pipeline.encode import Encoder
from consumer.pipeline.protocol import Deadline, Rejected, Wakeup
from consumer.records import DeadLetter, Item, SourceRecord, TopicPartition
from consumer.window import CloseReason, Window

T = TypeVar("T")

IN = "in"
OUT = "out"
DLQ = "dlq"
MODEL = "gpt-test"
TP0 = TopicPartition(IN, 0)
TP1 = TopicPartition(IN, 1)
LIMITS = RowLimits(max_bytes=1_000_000, max_depth=64, max_key_bytes=1024)


class Recording(Generic[T]):
    """A next step that records everything: what was offered, taken, and every protocol call.

    `rejecting = True` rejects every submit until cleared; `reject_next = n` rejects only the
    next n submits. A rejected value is in `offered` but not in `submitted`.
    """

    def __init__(self, *, rejecting: bool = False, reject_next: int = 0) -> None:
        self.rejecting = rejecting
        self.reject_next = reject_next
        self.offered: list[T] = []
        self.submitted: list[T] = []
        self.events: list[str] = []
        self.join_deadlines: list[Deadline] = []

    def submit(self, value: T) -> None:
        self.offered.append(value)
        if self.rejecting or self.reject_next > 0:
            self.reject_next = max(0, self.reject_next - 1)
            self.events.append("rejected")
            raise Rejected
        self.submitted.append(value)
        self.events.append("submit")

    def poll(self) -> None:
        self.events.append("poll")

    def close(self) -> None:
        self.events.append("close")

    async def join(self, deadline: Deadline) -> None:
        self.join_deadlines.append(deadline)
        self.events.append("join")

    def terminate(self) -> None:
        self.events.append("terminate")

    @property
    def polls(self) -> int:
        return self.events.count("poll")

    @property
    def closes(self) -> int:
        return self.events.count("close")

    @property
    def joins(self) -> int:
        return self.events.count("join")

    @property
    def terminates(self) -> int:
        return self.events.count("terminate")

    @property
    def rejections(self) -> int:
        return self.events.count("rejected")


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptedClock:
    """Returns the given readings one per call, then repeats the last one."""

    def __init__(self, *readings: float) -> None:
        self._readings = list(readings)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        if len(self._readings) > 1:
            return self._readings.pop(0)
        return self._readings[0]


class SimulatedWakeup(Wakeup):
    """A wakeup whose timed wait passes simulated time on a fake clock instead of real time."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self._clock = clock
        self._flag = False
        self.sets = 0
        self.waits = 0

    def set(self) -> None:
        self.sets += 1
        self._flag = True

    async def wait(self, at_most_s: float) -> None:
        self.waits += 1
        if not self._flag:
            self._clock.advance(at_most_s)
        await asyncio.sleep(0)
        self._flag = False


class RecordingSleep:
    """An injected `sleep`: records each delay; returns at once, or waits until `wake()`."""

    def __init__(self, *, blocking: bool = False) -> None:
        self.blocking = blocking
        self.delays: list[float] = []
        self._waiting: list[asyncio.Future[None]] = []
        self.on_sleep: Callable[[float], None] | None = None

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(seconds)
        if not self.blocking:
            await asyncio.sleep(0)
            return
        waiting = asyncio.get_running_loop().create_future()
        self._waiting.append(waiting)
        await waiting

    @property
    def sleeping(self) -> int:
        return sum(1 for f in self._waiting if not f.done())

    def wake(self) -> None:
        for waiting in self._waiting:
            if not waiting.done():
                waiting.set_result(None)
        self._waiting.clear()


class FakeHealth:
    """Provider health as the enrich step sees it: a count of successful requests, and
    whether the provider is failing for everyone right now."""

    def __init__(self) -> None:
        self.successes = 0
        self.down: str | None = None
        # Seconds left before a failure streak counts (ProviderHealth.undecided_for_s); each
        # call reports one step of `undecided_steps`, then 0.
        self.undecided_steps: list[float] = []

    def failing(self) -> str | None:
        return self.down

    def undecided_for_s(self) -> float:
        return self.undecided_steps.pop(0) if self.undecided_steps else 0.0


def fixed_rng() -> float:
    """Jitter at its top: Backoff.delay(n) is exactly its ceiling."""
    return 1.0


async def spin(condition: Callable[[], bool], *, poll: Callable[[], None] | None = None) -> None:
    """Yield to the event loop (never sleeping) until `condition()` holds, polling meanwhile."""
    for _ in range(2000):
        if poll is not None:
            poll()
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held within 2000 event-loop turns")


async def turns(n: int = 20) -> None:
    """Let the event loop run `n` turns, no time passing."""
    for _ in range(n):
        await asyncio.sleep(0)


# --- records, items and windows ---


def record(
    offset: int,
    value: bytes | Literal["row"] | None = "row",
    *,
    tp: TopicPartition = TP0,
    key: bytes | None = b"k",
    headers: Iterable[tuple[str, bytes]] = (),
    timestamp: int = 1_700_000_000_000,
) -> SourceRecord:
    if value == "row":
        value = orjson.dumps({"id": offset, "t": f"row {offset}"})
    return SourceRecord(tp.topic, tp.partition, offset, key, value, timestamp, tuple(headers))


def item_of(source: SourceRecord) -> Item:
    """The item the decode step makes of a record."""
    decoded = decode_row(source.key, source.value, LIMITS)
    if isinstance(decoded, DeadLetter):
        return Item(source, dead_letter=decoded)
    return Item(source, row=decoded)


def row_item(offset: int, *, tp: TopicPartition = TP0, **extra: Any) -> Item:
    """A decoded row `{"id": offset, "t": ..., **extra}` from partition `tp`."""
    body = {"id": offset, "t": f"row {offset}", **extra}
    item = item_of(record(offset, orjson.dumps(body), tp=tp))
    assert item.row is not None
    return item


def dead_item(offset: int, *, tp: TopicPartition = TP0, value: bytes = b"not json") -> Item:
    item = item_of(record(offset, value, tp=tp))
    assert item.dead_letter is not None
    return item


_window_ids = iter(range(1, 1_000_000))


def window(*items: Item, window_id: str | None = None) -> Window:
    return Window(
        id=window_id or f"w-{next(_window_ids)}",
        items=list(items),
        opened_at=0.0,
        close_reason=CloseReason.COUNT,
    )


def row_ids(rows: Iterable[dict[str, Any]]) -> list[Any]:
    return [row["id"] for row in rows]


# --- row outcomes ---

VARS_HASH = "ab" * 32


def success(content: Any = "an answer") -> RowOutcome:
    return RowOutcome(
        Completion(content, "gpt-test-2024", Usage(11, 7, 18), "stop"), None, None, VARS_HASH
    )


def retryable_failure(kind: FailureKind = FailureKind.TRANSIENT) -> RowOutcome:
    """A row that ran out of per-row retries (what the runner makes of a retryable failure)."""
    error = RowError("retries_exhausted", "server_error: HTTP 500", 500, 6, True)
    return RowOutcome(None, error, kind, VARS_HASH)


def systemic_failure() -> RowOutcome:
    return RowOutcome(
        None,
        RowError("unauthorized", "bad key", 401, 1, False),
        FailureKind.SYSTEMIC,
        VARS_HASH,
    )


def row_failure(reason: str = "content_filter") -> RowOutcome:
    return RowOutcome(None, RowError(reason, "no", 400, 1, False), FailureKind.ROW, VARS_HASH)


def local_failure(reason: str = "template_error") -> RowOutcome:
    """A row that failed before any request: its template, or an internal error."""
    return RowOutcome(None, RowError(reason, "local", None, 0, False), FailureKind.ROW, VARS_HASH)


# --- the encoder ---


def template() -> PromptTemplate:
    return PromptTemplate(LLMSettings(provider="openai", model=MODEL, template="{{ row.t }}"))


def encoder() -> Encoder:
    tpl = template()
    return Encoder(OUT, DLQ, OutputFields("llm", MODEL, tpl), MODEL, tpl.template_hash)


class FakeEvents:
    """Delivery and commit events, recorded."""

    def __init__(self) -> None:
        self.dead_letters: list[str] = []
        self.ok = 0
        self.errors: list[tuple[str, BaseException]] = []
        self.advanced: list[TopicPartition] = []
        self.commit_seconds: list[float] = []

    def dead_lettered(self, reason: str) -> None:
        self.dead_letters.append(reason)

    def broker_ok(self) -> None:
        self.ok += 1

    def broker_error(self, what: str, error: BaseException) -> None:
        self.errors.append((what, error))

    def partition_advanced(self, tp: TopicPartition) -> None:
        self.advanced.append(tp)

    def committed(self, seconds: float) -> None:
        self.commit_seconds.append(seconds)
