"""The chain of steps, in the order data flows through them: the one place that knows it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from consumer.audit import AuditLog
from consumer.config import Settings
from consumer.decode import RowLimits
from consumer.enrich.runner import WindowEnricher
from consumer.enrich.spend import SpendLedger
from consumer.kafka.sink import ProducerSink
from consumer.kafka.source import KafkaSource
from consumer.kafka.transactions import TransactionalSink
from consumer.llm.limiter import AIMDLimiter
from consumer.llm.peers import LimiterPeers
from consumer.observability import Metrics, PipelineEvents, ProviderHealth
from consumer.pipeline.batch_enrich import BatchEnrichStep, BatchMode, backlog_behind
from consumer.pipeline.commit import CommitStep
from consumer.pipeline.decode import DecodeStep
from consumer.pipeline.deliver import ProduceStep, Replacements, TransactionalProduceStep
from consumer.pipeline.encode import EncodedWindow, Encoder, EncodeStep
from consumer.pipeline.enrich import EnrichStep
from consumer.pipeline.flush import FlushStateStep
from consumer.pipeline.protocol import Step, Wakeup
from consumer.pipeline.report import ReportStep, Tally
from consumer.pipeline.windowing import WindowingStep
from consumer.records import SourceRecord
from consumer.retry import Backoff
from consumer.state import GlobalTable
from consumer.window import WindowAccumulator

_BROKER_BACKOFF = Backoff(0.5, 30.0)
# The first hold of a window waits about this long; later ones double, up to the setting.
_FIRST_HOLD_S = 2.0


@dataclass(frozen=True)
class Parts:
    """The long-lived resources a chain is built from; they outlive every chain."""

    settings: Settings
    enricher: WindowEnricher
    encoder: Encoder
    provider_health: ProviderHealth
    events: PipelineEvents
    metrics: Metrics
    tally: Tally
    limiter: AIMDLimiter
    source: KafkaSource
    # Exactly one of the two: the delivery mode is decided here, once.
    sink: ProducerSink | None
    transactions: TransactionalSink | None
    # State written to compacted topics while enriching (the cache), flushed before delivery.
    shared_state: GlobalTable | None = None
    # The budget's spend table and ledger (issue 15): started with the parts; the ledger's
    # coalesced writes are flushed when the parts stop.
    spend_state: GlobalTable | None = None
    spend_ledger: SpendLedger | None = None
    # The audit trail (llm.audit_topic): flushed before the outputs that depend on it.
    audit: AuditLog | None = None
    # llm.mode batch: windows are answered by provider batch jobs (issue 16).
    batch: BatchMode | None = None
    # llm.concurrency.share_with_replicas: the replicas' limits, told through their own table.
    peers: LimiterPeers | None = None


@dataclass(frozen=True)
class Chain:
    """A chain built for one assignment; the app keeps handles on the steps it must reach."""

    first: Step[SourceRecord]
    windowing: WindowingStep
    enrich: EnrichStep
    tally: Tally
    # The tally when the chain was built: what it consumed and finished since is its own.
    consumed_before: int
    finished_before: int

    def unfinished(self) -> int:
        """Records this chain took and did not finish (dropped for the next owner)."""
        consumed = self.tally.consumed - self.consumed_before
        return max(0, consumed - (self.tally.finished - self.finished_before))


def build_chain(parts: Parts, wakeup: Wakeup) -> Chain:
    """decode -> windowing -> enrich -> encode -> (flush state) -> deliver -> (commit) -> report.

    Built from the last step to the first, since each step is given its next.
    """
    settings = parts.settings
    replacements = Replacements(parts.encoder, settings.delivery.dead_letter_fallback, parts.events)
    report = ReportStep(
        parts.metrics, parts.tally, settings.kafka.dead_letter_topic, lambda: parts.limiter.limit
    )
    deliver: Step[EncodedWindow]
    if parts.transactions is not None:
        deliver = TransactionalProduceStep(
            parts.transactions,
            settings.kafka.group_id,
            replacements,
            parts.events,
            _BROKER_BACKOFF,
            report,
            wakeup,
        )
    else:
        assert parts.sink is not None
        commit = CommitStep(parts.source, parts.events, report, wakeup, _BROKER_BACKOFF)
        deliver = ProduceStep(
            parts.sink, replacements, parts.events, _BROKER_BACKOFF, commit, wakeup
        )
    flushed: Step[EncodedWindow] = deliver
    if parts.shared_state is not None:
        flushed = FlushStateStep(
            parts.shared_state, parts.metrics.cache_write_failures.inc, flushed, wakeup
        )
    if parts.audit is not None:  # its failures are logged by the audit log
        flushed = FlushStateStep(parts.audit, lambda _: None, flushed, wakeup)
    retry = settings.llm.retry
    # llm.mode batch or auto: the batch step, with windows in flight bounded by its setting.
    # Live: more windows while rows sleep out wait hints and the limit idles (see EnrichStep).
    enrich_step: Callable[..., EnrichStep] = partial(
        EnrichStep,
        limit_idle=parts.limiter.idle,
        max_windows_when_idle=settings.window.windows_when_idle,
    )
    max_windows = settings.window.max_pending_windows
    if parts.batch is not None:
        backlog = None
        if settings.llm.mode == "auto":
            backlog = partial(backlog_behind, highwater=parts.source.consumer.highwater)
        enrich_step = partial(BatchEnrichStep, parts.batch.parts, backlog=backlog)
        max_windows = settings.llm.batch.max_pending_batches
    enrich = enrich_step(
        parts.enricher,
        retry,
        parts.provider_health,
        max_windows,
        EncodeStep(parts.encoder, flushed),
        wakeup,
        Backoff(_FIRST_HOLD_S, retry.window_backoff_max_s),
    )
    window = settings.window
    windowing = WindowingStep(
        WindowAccumulator(window.max_messages, window.max_wait_ms / 1000.0), enrich, wakeup
    )

    def consumed() -> None:
        parts.metrics.consumed()
        parts.tally.consume()

    decode = DecodeStep(RowLimits.from_settings(settings.kafka), windowing, consumed)
    tally = parts.tally
    return Chain(decode, windowing, enrich, tally, tally.consumed, tally.finished)
