"""The wiring: records in -> windows -> enriched outcomes -> records out -> commits.

Two tasks share one event loop:
- the poller keeps calling `getmany()` at all times (so the member stays in its group, even
  while a long window runs or the provider is down), decodes records, fills the open window,
  closes it on count or time, and pauses every partition while closed windows wait;
- the processor takes closed windows in order, enriches their rows concurrently, produces one
  output or dead letter per record, waits for the broker's acknowledgements, and commits the
  contiguous finished prefix of each partition.
Memory stays flat: at most one window in the processor, `max_pending_windows` waiting, one
filling, and one closed window held while the partitions are paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import orjson
from aiokafka import ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from consumer import failpoints
from consumer.config import Settings
from consumer.decode import decode_row
from consumer.enrich.outcome import OutputFields, RowOutcome
from consumer.enrich.runner import WindowEnricher, window_failed_systemically
from consumer.enrich.template import PromptTemplate
from consumer.kafka.clients import build_consumer, build_producer
from consumer.kafka.offsets import OffsetTracker
from consumer.kafka.sink import Sink
from consumer.kafka.transactions import TransactionalSink
from consumer.llm.caller import LLMCaller
from consumer.llm.client import ChatClient
from consumer.llm.limiter import AIMDLimiter
from consumer.observability import Metrics, Observability
from consumer.records import DeadLetter, Item, OutgoingRecord, SourceRecord, TopicPartition
from consumer.window import CloseReason, Window, WindowAccumulator

log = logging.getLogger("consumer")

_MAX_POLL_WAIT_S = 0.5
_LONG_PROVIDER_WAIT_S = 10.0


def _tp(tp: Any) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _header(value: object) -> bytes:
    return str(value).encode("utf-8")


def _source_headers(record: SourceRecord) -> list[tuple[str, bytes]]:
    return [
        ("source.topic", _header(record.topic)),
        ("source.partition", _header(record.partition)),
        ("source.offset", _header(record.offset)),
    ]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, app: ConsumerApp) -> None:
        self._app = app

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._app.on_partitions_revoked({_tp(tp) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._app.on_partitions_assigned({_tp(tp) for tp in assigned})


class ConsumerApp:
    """One consumer process. `await run()` until `request_stop()` (SIGTERM/SIGINT)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        llm = settings.llm
        self._consumer = build_consumer(settings.kafka)
        compression = settings.delivery.output_compression
        codec = None if compression == "none" else compression
        exactly_once = settings.delivery.mode == "exactly_once"
        # Exactly-once produces only through the per-partition transactional producers, so the
        # shared idempotent producer is not even started then.
        self._transactions = (
            TransactionalSink(settings.kafka, codec, settings.delivery.transactional_id_prefix)
            if exactly_once
            else None
        )
        self._producer = None if exactly_once else build_producer(settings.kafka, codec)
        self._sink = Sink(self._producer) if self._producer is not None else None
        self._client = ChatClient(llm)
        self.metrics = Metrics(settings)
        self.limiter = AIMDLimiter.from_settings(llm.concurrency)
        template = PromptTemplate(llm)
        caller = LLMCaller(
            self._client, self.limiter, llm.retry, on_attempt=self.metrics.attempt_hook()
        )
        self._enricher = WindowEnricher(template, caller)
        self._fields = OutputFields(llm.response_field, llm.model_name, template)
        self._template_hash = _header(template.template_hash)
        self._model_header = _header(llm.model_name)
        self._tracker = OffsetTracker()
        self._accumulator = WindowAccumulator(
            settings.window.max_messages, settings.window.max_wait_ms / 1000.0
        )
        self._closed: deque[Window] = deque()
        self._ready: deque[Window] = deque()
        self._ready_changed = asyncio.Event()
        self._processing: asyncio.Task[None] | None = None
        self._enrichments: dict[str, asyncio.Task[list[RowOutcome]]] = {}
        self._not_revoking = asyncio.Event()
        self._not_revoking.set()
        self._input_done = False
        self._failed = False
        self._stopping = asyncio.Event()
        self._holding: set[str] = set()
        self.stats: dict[str, int] = {
            "consumed": 0,
            "produced": 0,
            "dead_lettered": 0,
            "row_errors": 0,
            "windows": 0,
            "commits": 0,
        }
        self.observability = Observability(settings, self.metrics, self, self._consumer)

    @property
    def held_back(self) -> bool:
        """A window is waiting out a provider outage (readiness reports it)."""
        return bool(self._holding)

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info("stop requested: finishing the open window, then committing")
            self._stopping.set()
            self._ready_changed.set()

    async def run(self) -> int:
        """Consume until asked to stop; returns the process exit code."""
        kafka = self.settings.kafka
        await self.observability.start()
        if self._producer is not None:
            await self._producer.start()
        try:
            await self._consumer.start()
            try:
                self._consumer.subscribe([kafka.input_topic], listener=_Rebalance(self))
                log.info(
                    "consuming",
                    extra={
                        "input": kafka.input_topic,
                        "output": kafka.output_topic,
                        "dlq": kafka.dead_letter_topic,
                        "group": kafka.group_id,
                    },
                )
                processor = asyncio.create_task(self._process_loop(), name="processor")
                processor.add_done_callback(self._on_processor_done)
                try:
                    await self._poll_loop()
                    await self._drain(processor)
                finally:
                    if not processor.done():
                        processor.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await processor
                    for task in self._enrichments.values():
                        task.cancel()
            finally:
                await self._commit()
                await self._consumer.stop()
        finally:
            if self._transactions is not None:
                await self._transactions.close()
            if self._producer is not None:
                await self._producer.stop()
            await self._client.aclose()
            await self.observability.stop()
        log.info("stopped", extra=self.stats)
        return 1 if self._failed else 0

    def _on_processor_done(self, task: asyncio.Task[None]) -> None:
        """A processor that died must stop the process: polling on without it would stall."""
        if not task.cancelled() and task.exception() is not None:
            log.error("processing failed; stopping", exc_info=task.exception())
            self._failed = True
            self._stopping.set()

    # ---- poller -------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while not self._stopping.is_set():
            self.observability.beat()
            self._apply_backpressure()
            deadline = self._accumulator.deadline()
            wait = _MAX_POLL_WAIT_S
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            batch = await self._consumer.getmany(
                timeout_ms=int(wait * 1000), max_records=max(1, self._accumulator.room)
            )
            for records in batch.values():
                for record in records:
                    self._accept(record)
            window = self._accumulator.close_if_due()
            if window is not None:
                self._closed.append(window)
            self._hand_over(self.settings.window.max_pending_windows)
        window = self._accumulator.close(CloseReason.SHUTDOWN)
        if window is not None:
            self._closed.append(window)

    def _accept(self, raw: Any) -> None:
        record = SourceRecord(
            topic=raw.topic,
            partition=raw.partition,
            offset=raw.offset,
            key=raw.key,
            value=raw.value,
            timestamp=raw.timestamp,
            headers=tuple(raw.headers or ()),
        )
        decoded = decode_row(record.value, self.settings.kafka.max_row_bytes)
        item = (
            Item(record, dead_letter=decoded)
            if isinstance(decoded, DeadLetter)
            else Item(record, row=decoded)
        )
        self.stats["consumed"] += 1
        self.metrics.consumed()
        self._tracker.track(record.tp, record.offset)
        window = self._accumulator.add(item)
        if window is not None:
            self._closed.append(window)

    def _hand_over(self, capacity: int) -> None:
        while self._closed and len(self._ready) < capacity:
            window = self._closed.popleft()
            self._ready.append(window)
            self._start_enrichment(window)
            self._ready_changed.set()

    def _start_enrichment(self, window: Window) -> None:
        """Waiting windows are enriched early, so no limiter slot idles at a window's tail.

        Their rows queue in the limiter behind the current window's (admission is FIFO), so they
        only take the slots its slowest rows leave free; outputs are still produced in order.
        """
        if window.id not in self._enrichments:
            self._enrichments[window.id] = asyncio.create_task(self._enrich(window))

    def _cancel_enrichment(self, window: Window) -> None:
        task = self._enrichments.pop(window.id, None)
        if task is not None:
            task.cancel()

    def _apply_backpressure(self) -> None:
        """Pause every partition while a closed window waits for the processor, or while the
        provider asked for a long wait (Retry-After): fetching more would only fill memory."""
        assigned = self._consumer.assignment()
        provider_wait = self.limiter.state().not_before_in_s > _LONG_PROVIDER_WAIT_S
        if self._closed or self._stopping.is_set() or provider_wait:
            if assigned - self._consumer.paused():
                self._consumer.pause(*assigned)
        elif self._consumer.paused():
            self._consumer.resume(*self._consumer.paused())

    async def _drain(self, processor: asyncio.Task[None]) -> None:
        """Shutdown: hand the last windows over and keep the membership alive while they run."""
        grace_ends = time.monotonic() + self.settings.delivery.shutdown_grace_s
        self._hand_over(len(self._closed) + len(self._ready))
        self._input_done = True
        self._ready_changed.set()
        while not processor.done() and time.monotonic() < grace_ends:
            self._apply_backpressure()
            await self._consumer.getmany(timeout_ms=100)
        if not processor.done():
            log.warning("shutdown grace elapsed: unfinished windows stay uncommitted")
            processor.cancel()

    # ---- processor ----------------------------------------------------------------------

    async def _process_loop(self) -> None:
        while True:
            while not self._ready:
                if self._input_done:
                    return
                self._ready_changed.clear()
                await self._ready_changed.wait()
            if not self._not_revoking.is_set():
                await self._not_revoking.wait()
                continue
            window = self._ready.popleft()
            self._processing = asyncio.create_task(self._process_window(window))
            await asyncio.wait([self._processing])
            task, self._processing = self._processing, None
            if task.cancelled():
                log.warning("window abandoned", extra={"window_id": window.id})
            elif task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _process_window(self, window: Window) -> None:
        started = time.monotonic()
        row_items = [item for item in window.items if item.row is not None]
        self._start_enrichment(window)
        try:
            outcomes = await self._enrichments[window.id]
        finally:
            self._enrichments.pop(window.id, None)
        by_item = {id(item): outcome for item, outcome in zip(row_items, outcomes, strict=True)}
        records = [self._outgoing(window, item, by_item.get(id(item))) for item in window.items]
        if self._transactions is not None:
            await self._deliver_transactions(window, records)
        else:
            await self._deliver(window, records)
            failpoints.reach("after_produce")
            for item in window.items:
                self._tracker.finish(item.record.tp, item.record.offset)
        errors = sum(1 for o in outcomes if o.error is not None)
        dead = len(window.items) - len(row_items)
        self.stats["windows"] += 1
        self.stats["produced"] += len(row_items)
        self.stats["dead_lettered"] += dead
        self.stats["row_errors"] += errors
        self.metrics.window_done(window, outcomes, time.monotonic() - started)
        await self._commit()
        log.info(
            "window done",
            extra={
                "window_id": window.id,
                "close_reason": str(window.close_reason),
                "rows": len(row_items),
                "row_errors": errors,
                "dead_letters": dead,
                "seconds": round(time.monotonic() - started, 3),
                "partitions": _offset_ranges(window.items),
                "limit": round(self.limiter.limit, 1),
            },
        )

    async def _enrich(self, window: Window) -> list[RowOutcome]:
        """Enrich the window's rows; while the provider (not the rows) fails, wait and retry.

        A round in which every row that reached the provider failed is an outage: the window
        waits (offsets uncommitted) for as long as it lasts. When only some rows ran out of
        retries, the window is held back `partial_window_retries` times before those rows get
        their error, so the edge of an outage does not turn into error rows either.
        """
        rows: list[dict[str, Any]] = [item.row for item in window.items if item.row is not None]
        retry = self.settings.llm.retry
        outcomes = await self._enricher.enrich(rows)
        round_outcomes = outcomes
        holds = partial_holds = 0
        while any(o.needs_retry_later for o in outcomes):
            if not window_failed_systemically(round_outcomes):
                if partial_holds >= retry.partial_window_retries:
                    break
                partial_holds += 1
            holds += 1
            self._holding.add(window.id)
            first = next(o.error for o in outcomes if o.needs_retry_later)
            delay = min(retry.window_backoff_max_s, 2.0**holds) * (0.5 + 0.5 * random.random())
            log.warning(
                "window held back: the provider is failing, offsets stay uncommitted",
                extra={
                    "window_id": window.id,
                    "reason": first.reason if first else "",
                    "status_code": first.status_code if first else None,
                    "failed_rows": sum(1 for o in outcomes if o.needs_retry_later),
                    "retry_in_s": round(delay, 1),
                },
            )
            await self._sleep_unless_stopping(delay)
            if self._stopping.is_set():
                raise asyncio.CancelledError("stopping while the provider is failing")
            todo = [i for i, o in enumerate(outcomes) if o.needs_retry_later]
            round_outcomes = await self._enricher.enrich([rows[i] for i in todo])
            for index, outcome in zip(todo, round_outcomes, strict=True):
                outcomes[index] = outcome
        self._holding.discard(window.id)
        return outcomes

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _outgoing(self, window: Window, item: Item, outcome: RowOutcome | None) -> OutgoingRecord:
        record = item.record
        headers = _source_headers(record)
        headers.append(("window.id", _header(window.id)))
        if item.dead_letter is not None or outcome is None:
            letter = item.dead_letter or DeadLetter("internal", "no outcome")
            return OutgoingRecord(
                topic=self.settings.kafka.dead_letter_topic,
                key=record.key,
                value=record.value,
                headers=[
                    *record.headers,
                    ("dlq.reason", _header(letter.reason)),
                    ("dlq.message", _header(letter.message)),
                    *headers,
                    ("source.timestamp", _header(record.timestamp)),
                ],
            )
        assert item.row is not None
        headers.append(("llm.model", self._model_header))
        headers.append(("llm.template_hash", self._template_hash))
        value = orjson.dumps(self._fields.apply(item.row, outcome), option=orjson.OPT_NON_STR_KEYS)
        return OutgoingRecord(
            topic=self.settings.kafka.output_topic, key=record.key, value=value, headers=headers
        )

    async def _deliver(self, window: Window, records: list[OutgoingRecord]) -> None:
        """Produce until the broker acknowledged everything; never commit around a failure."""
        assert self._sink is not None
        attempt = 0
        while True:
            try:
                await self._sink.deliver(records)
                return
            except KafkaError as error:
                attempt += 1
                await self._broker_backoff(
                    window, attempt, error, "produce failed, retrying (outputs may repeat)"
                )

    async def _broker_backoff(
        self, window: Window, attempt: int, error: Exception, what: str
    ) -> None:
        """Wait before trying the broker again; the offsets stay uncommitted meanwhile."""
        delay = min(30.0, 0.5 * 2**attempt)
        log.warning(what, extra={"window_id": window.id, "error": repr(error), "retry_in_s": delay})
        await asyncio.sleep(delay)

    async def _deliver_transactions(self, window: Window, records: list[OutgoingRecord]) -> None:
        """Exactly-once: per input partition, produce its records and commit its offset in one
        transaction; retried (aborting first) until it commits or the partition is fenced."""
        assert self._transactions is not None
        by_partition: dict[TopicPartition, list[tuple[Item, OutgoingRecord]]] = {}
        for item, record in zip(window.items, records, strict=True):
            by_partition.setdefault(item.record.tp, []).append((item, record))
        for tp, pairs in by_partition.items():
            next_offset = max(item.record.offset for item, _ in pairs) + 1
            started = time.monotonic()
            if await self._transact(window, tp, [r for _, r in pairs], next_offset):
                self.metrics.committed(time.monotonic() - started)
                for item, _ in pairs:
                    self._tracker.finish(tp, item.record.offset)
                self._tracker.committed({tp: next_offset})
        self.stats["commits"] += len(by_partition)

    async def _transact(
        self, window: Window, tp: TopicPartition, records: list[OutgoingRecord], next_offset: int
    ) -> bool:
        """True once committed; False if fenced (the partition has a new owner)."""
        assert self._transactions is not None
        attempt = 0
        while True:
            try:
                await self._transactions.deliver(
                    tp, records, next_offset, self.settings.kafka.group_id
                )
                return True
            except ProducerFenced:
                log.warning(
                    "fenced: another member owns this partition now; its work is dropped",
                    extra={"window_id": window.id, "partition": tuple(tp)},
                )
                self._tracker.forget([tp])
                return False
            except KafkaError as error:
                attempt += 1
                await self._broker_backoff(window, attempt, error, "transaction failed, retrying")
                await self._transactions.reset(tp)

    async def _commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        if self._transactions is not None:
            return
        assigned = {_tp(tp) for tp in self._consumer.assignment()}
        wanted = set(only) if only is not None else assigned
        offsets = {
            tp: o for tp, o in self._tracker.committable().items() if tp in wanted & assigned
        }
        if not offsets:
            return
        started = time.monotonic()
        try:
            await self._consumer.commit(
                {KafkaTopicPartition(tp.topic, tp.partition): o for tp, o in offsets.items()}
            )
        except KafkaError as error:
            log.warning("commit failed; will retry with the next one", extra={"error": repr(error)})
            return
        self._tracker.committed(offsets)
        self.stats["commits"] += 1
        self.metrics.committed(time.monotonic() - started)

    # ---- rebalance ----------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Finish (or abandon) in-flight work within a budget, commit it, let the rest go.

        The budget is half the group's rebalance timeout: the group waits that long for this
        member to rejoin, and committing plus rejoining needs the rest.
        """
        if not revoked:
            return
        self._not_revoking.clear()
        try:
            await self._release(revoked)
        finally:
            self._not_revoking.set()

    async def _release(self, revoked: set[TopicPartition]) -> None:
        budget = self.settings.kafka.rebalance_timeout_ms / 1000.0 * 0.5
        processing = self._processing
        if processing is not None and not processing.done():
            done, _ = await asyncio.wait([processing], timeout=budget)
            if not done:
                processing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await processing
        await self._commit(revoked)
        abandoned = processing is not None and processing.cancelled()
        self._rewind(revoked, include_assigned=abandoned)
        if self._transactions is not None:
            await self._transactions.release(revoked)
        log.info(
            "partitions revoked",
            extra={"partitions": sorted(map(tuple, revoked)), "abandoned_window": abandoned},
        )

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self._transactions is not None:
            await self._transactions.assign(assigned)
        log.info("partitions assigned", extra={"partitions": sorted(map(tuple, assigned))})

    def _rewind(self, revoked: set[TopicPartition], include_assigned: bool) -> None:
        """Drop unfinished work of revoked partitions: their next owner reads it again.

        After an abandoned window, partitions that stay assigned lose their unfinished work
        too and are seeked back to their first unfinished offset, so it is read again in order.
        """
        assigned = {_tp(tp) for tp in self._consumer.assignment()}
        dropped = revoked | assigned if include_assigned else revoked
        self._accumulator.drop_partitions(dropped)
        for queue in (self._closed, self._ready):
            for window in list(queue):
                kept = [i for i in window.items if i.record.tp not in dropped]
                if len(kept) == len(window.items):
                    continue
                self._cancel_enrichment(window)
                window.items = kept
                if not kept:
                    queue.remove(window)
                elif queue is self._ready:
                    self._start_enrichment(window)
        for tp in dropped - revoked:
            first = self._tracker.first_pending(tp)
            if first is not None:
                self._consumer.seek(KafkaTopicPartition(tp.topic, tp.partition), first)
        self._tracker.forget(dropped)


def _offset_ranges(items: list[Item]) -> dict[str, str]:
    ranges: dict[str, list[int]] = {}
    for item in items:
        key = f"{item.record.topic}/{item.record.partition}"
        bounds = ranges.setdefault(key, [item.record.offset, item.record.offset])
        bounds[0] = min(bounds[0], item.record.offset)
        bounds[1] = max(bounds[1], item.record.offset)
    return {key: f"{low}-{high}" for key, (low, high) in ranges.items()}


async def run_app(settings: Settings) -> int:
    """Run with SIGTERM/SIGINT wired to a graceful stop."""
    app = ConsumerApp(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    return await app.run()
