"""The wiring: builds the chain of steps, runs the fetch loop, handles rebalances and signals.

Data flows one way (`consumer/pipeline/`): decode -> windowing -> enrich -> encode ->
deliver -> commit -> report. Each step hands finished work on when polled, and every task a
step finishes wakes this loop, so work moves at once rather than on the fetch cadence. A step
that is full rejects; the loop keeps the record and pauses the partitions (while still calling
`getmany()`, so the member stays in its group) until the chain has room again.

Revocation and shutdown take one path: close -> join within one deadline -> terminate. Every
rebalance revokes every partition (aiokafka's eager protocol), so the chain is rebuilt on the
next assignment and its records are fetched again from the committed offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import deque

from consumer.config import Settings
from consumer.llm.client import ChatClient
from consumer.llm.limiter import AIMDLimiter
from consumer.observability import (
    BrokerHealth,
    Metrics,
    Observability,
    PartitionProgress,
    PipelineEvents,
    ProviderHealth,
)
from consumer.parts import assign_parts, build_parts, start_parts, stop_parts
from consumer.pipeline import Chain, Deadline, Rejected, Wakeup, build_chain
from consumer.progress import with_progress
from consumer.records import SourceRecord, TopicPartition
from consumer.topics import check_topics, start_broker
from consumer.window import CloseReason

log = logging.getLogger("consumer")

_FETCH_WAIT_S = 0.5
_FETCH_MAX_RECORDS = 500
_LONG_PROVIDER_WAIT_S = 10.0


class ConsumerApp:
    """One consumer process. `await run()` until `request_stop()` (SIGTERM/SIGINT)."""

    def __init__(
        self,
        settings: Settings,
        limiter: AIMDLimiter | None = None,
        client: ChatClient | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(settings)
        self.limiter = limiter or AIMDLimiter.from_settings(settings.llm.concurrency)
        self._client = client or ChatClient(settings.llm)
        provider, broker = ProviderHealth(), BrokerHealth()
        progress = PartitionProgress(settings.observability.stuck_partition_after_s)
        events = PipelineEvents(self.metrics, broker, progress)
        self._parts = build_parts(
            settings, self.metrics, self.limiter, self._client, provider, events
        )
        self._tally = self._parts.tally
        self._source = self._parts.source
        self._progress = progress
        self._wakeup = Wakeup()
        self._chain: Chain | None = None
        self._records: deque[SourceRecord] = deque()
        self._fetch: asyncio.Task[list[SourceRecord]] | None = None
        self._stopping = asyncio.Event()
        self.observability = Observability(
            settings,
            self.metrics,
            self,
            self._source.consumer,
            provider=provider,
            broker=broker,
            progress=progress,
        )

    @property
    def held_back(self) -> bool:
        return self.held_back_reason is not None

    @property
    def held_back_reason(self) -> str | None:
        """Why a window is waiting out a provider failure (readiness reports it)."""
        return self._chain.enrich.held_back_reason if self._chain is not None else None

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info(
                "stop requested: finishing the windows in flight (no new one starts), "
                "then committing"
            )
            self._stopping.set()
            self._wakeup.set()

    async def run(self) -> int:
        """Consume until asked to stop; returns the process exit code."""
        kafka = self.settings.kafka
        await self.observability.start()
        failed = False
        try:
            await start_parts(self._parts)
            # Subscribed only once the input topic exists: subscribing to a missing one would
            # create it with the broker's defaults (1 partition).
            await check_topics(
                self.settings, start_broker(kafka), self.observability.beat, self._stopping
            )
            self._source.subscribe(kafka.input_topic, self._on_assigned, self._on_revoked)
            log.info(
                "consuming",
                extra={
                    "input": kafka.input_topic,
                    "output": kafka.output_topic,
                    "dlq": kafka.dead_letter_topic,
                    "group": kafka.group_id,
                },
            )
            try:
                await self._loop()
            except Exception:
                log.exception("processing failed; stopping without committing what is in flight")
                failed = True
            await self._release(CloseReason.SHUTDOWN, abandon=failed)
        finally:
            await stop_parts(self._parts)
            await self._client.aclose()
            await self.observability.stop()
        log.info("stopped", extra=self._tally.exit_line())
        return 1 if failed else 0

    async def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self.observability.beat()
                chain = self._chain
                if chain is not None:
                    chain.first.poll()
                    self._feed(chain)
                self._apply_backpressure()
                fetch = self._fetch
                if fetch is None:
                    fetch = self._fetch = asyncio.create_task(
                        self._source.fetch(_FETCH_WAIT_S, _FETCH_MAX_RECORDS)
                    )
                woken = asyncio.ensure_future(self._wakeup.wait(_FETCH_WAIT_S))
                await asyncio.wait([fetch, woken], return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if fetch.done() and fetch is self._fetch:
                    self._fetch = None
                    self._records.extend(fetch.result())
        finally:
            if self._fetch is not None:
                self._fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._fetch
                self._fetch = None

    def _feed(self, chain: Chain) -> None:
        """Submit fetched records in order until the chain is full (then they wait here)."""
        with contextlib.suppress(Rejected):
            while self._records:
                chain.first.submit(self._records[0])
                self._records.popleft()

    def _apply_backpressure(self) -> None:
        """Pause while records wait for room, or while the provider asked for a long wait."""
        provider_wait = self.limiter.state().not_before_in_s > _LONG_PROVIDER_WAIT_S
        if self._records or self._stopping.is_set() or provider_wait:
            self._source.pause_all()
        else:
            self._source.resume_all()

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        if self._chain is not None:  # eager rebalances revoke first; never run two chains
            await self._release(CloseReason.REVOKE)
        await assign_parts(self._parts, assigned)
        self._chain = build_chain(self._parts, self._wakeup)
        self._wakeup.set()
        log.info("partitions assigned", extra={"partitions": sorted(map(tuple, assigned))})

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Finish what fits in half the rebalance timeout (the group waits that long for us
        to rejoin; committing and rejoining need the rest), let the rest go."""
        if self._chain is None:
            return
        abandoned = await self._release(CloseReason.REVOKE)
        log.info(
            "partitions revoked",
            extra={"partitions": sorted(map(tuple, revoked)), "rows_left": abandoned},
        )

    async def _release(self, reason: CloseReason, abandon: bool = False) -> int:
        """close -> join -> terminate the chain within one deadline; the rows it dropped."""
        chain, self._chain = self._chain, None
        self._records.clear()
        budget = (
            self.settings.delivery.shutdown_grace_s
            if reason is CloseReason.SHUTDOWN
            else self.settings.kafka.rebalance_timeout_ms / 1000.0 * 0.5
        )
        deadline = Deadline(0.0 if abandon else budget)
        dropped = 0
        if self._fetch is not None and self._fetch.done():
            self._fetch = None  # fetched for the old assignment: read again after the next one
        if chain is not None:
            if reason is CloseReason.SHUTDOWN:
                # A stop starts no new window: only the windows already being enriched finish.
                chain.windowing.drop_unstarted()
            chain.windowing.close_reason(reason)
            chain.first.close()
            try:
                await chain.first.join(deadline)
            except Exception:
                log.exception("finishing the windows in flight failed")
            chain.first.terminate()
            dropped = chain.unfinished()
        if dropped:
            log.warning(
                "rows left unfinished: their offsets stay uncommitted for the next owner",
                extra={"reason": str(reason), "rows": dropped},
            )
        if self._parts.transactions is not None:
            # The same deadline, with a floor: a new owner fences a producer left behind.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._parts.transactions.close(), max(deadline.remaining(), 1.0)
                )
        self._progress.reset()
        return dropped


async def run_app(settings: Settings, progress: bool = False) -> int:
    """Run with SIGTERM/SIGINT wired to a graceful stop; `progress`: the live line on stderr
    and the run's summary at exit (`consumer/progress.py`)."""
    app = ConsumerApp(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    return await (with_progress(app.run(), app.metrics.registry) if progress else app.run())
