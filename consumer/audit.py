"""The audit trail (`llm.audit_topic`): one record per paid call attempt, failed ones too.

What a finance or compliance reader asks for, and what the plan this product grew from calls
its record of external calls: request hash, source topic/partition/offset, window id, attempt
number, model, HTTP status, latency, usage, cost and error reason, one record per attempt
(unique by `call_id` = request hash + window id + attempt, and the source position).

Which row an attempt belongs to travels in context variables, not through every signature: the
enrich step names the window's rows (`enter_window`), the enricher the row being called
(`enter_row`), and the client reports each attempt (`ChatClient.on_attempt`). Each row runs in
its own task, so its context is its own. Records are produced without waiting; the chain
flushes them (`flush`) before the outputs, and so the offsets, that depend on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumer.config import KafkaSettings
from consumer.kafka.clients import build_producer
from consumer.llm.client import Completion
from consumer.llm.errors import LLMFailure
from consumer.llm.pricing import Pricing

log = logging.getLogger("consumer")


class WindowItem(Protocol):
    """What `enter_window` reads of a window's items."""

    @property
    def row(self) -> dict[str, Any] | None: ...

    @property
    def record(self) -> Any: ...


@dataclass
class _Row:
    window_id: str | None
    source: tuple[str, int, int] | None
    request_hash: str
    attempts: int = 0


# The window being enriched: its id, and each row's (topic, partition, offset) by identity.
_WINDOW: ContextVar[tuple[str, dict[int, tuple[str, int, int]]] | None] = ContextVar(
    "audit_window", default=None
)
_ROW: ContextVar[_Row | None] = ContextVar("audit_row", default=None)


def enter_window(window_id: str, items: Sequence[WindowItem]) -> None:
    """Called by the enrich step before it enriches the window (its row tasks inherit it)."""
    sources = {
        id(item.row): (item.record.topic, item.record.partition, item.record.offset)
        for item in items
        if item.row is not None
    }
    _WINDOW.set((window_id, sources))


def enter_row(row: dict[str, Any], request_hash: str) -> None:
    """Called by the enricher in the row's own task, once its request is known."""
    window = _WINDOW.get()
    window_id, source = (window[0], window[1].get(id(row))) if window else (None, None)
    _ROW.set(_Row(window_id, source, request_hash))


class AuditLog:
    """Produces one record per attempt to the audit topic, never waiting; `flush` waits."""

    def __init__(self, kafka: KafkaSettings, topic: str, pricing: Pricing) -> None:
        self.topic = topic
        self._kafka = kafka
        self._pricing = pricing
        self._producer: AIOKafkaProducer | None = None
        self._pending: set[Any] = set()
        self._failed = 0
        self.records = 0

    async def start(self) -> None:
        self._producer = build_producer(self._kafka, compression=None)
        await self._producer.start()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        if self._producer is not None:
            with contextlib.suppress(KafkaError):
                await self._producer.stop()
            self._producer = None

    def attempt(
        self,
        model: str,
        seconds: float,
        completion: Completion | None,
        failure: LLMFailure | None,
    ) -> None:
        """One attempt ended (ChatClient's hook): its record goes out without waiting."""
        row = _ROW.get()
        if row is None:
            row = _Row(None, None, "")
        row.attempts += 1
        cost = self._pricing.cost(completion) if completion is not None else None
        status = 200 if completion is not None else failure.status_code if failure else None
        source = row.source
        record = {
            "call_id": f"{row.request_hash}:{row.window_id}:{row.attempts}",
            "request_hash": row.request_hash or None,
            "source_topic": source[0] if source else None,
            "source_partition": source[1] if source else None,
            "source_offset": source[2] if source else None,
            "window_id": row.window_id,
            "attempt": row.attempts,
            "model": completion.model if completion is not None else model,
            "status_code": status,
            "latency_ms": round(seconds * 1000, 1),
            "usage": completion.usage.as_dict() if completion is not None else None,
            "cost_usd": cost.usd if cost is not None else None,
            "cost_source": cost.source if cost is not None else None,
            "error_reason": failure.reason if failure is not None else None,
            "at": time.time(),
        }
        key = f"{source[0]}/{source[1]}/{source[2]}".encode() if source else None
        self._send(key, orjson.dumps(record))

    def _send(self, key: bytes | None, value: bytes) -> None:
        producer = self._producer
        if producer is None:
            self._failed += 1
            return
        # send() only queues; a task so the caller does not wait for the batch to be handed over
        task = asyncio.ensure_future(producer.send(self.topic, value=value, key=key))
        self._pending.add(task)
        self.records += 1

    async def flush(self) -> int:
        """Wait until every record so far is acknowledged; how many failed since the last."""
        while self._pending:
            tasks, self._pending = self._pending, set()
            for task in tasks:
                try:
                    delivered = await task
                    await delivered
                except (KafkaError, asyncio.CancelledError) as error:
                    self._failed += 1
                    log.debug("audit record not delivered", extra={"error": repr(error)})
        failed, self._failed = self._failed, 0
        if failed:
            log.warning(
                "audit records were not delivered", extra={"topic": self.topic, "failed": failed}
            )
        return failed
