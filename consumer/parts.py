"""The long-lived pieces a consumer is made of, built once from the settings.

`build_parts` is where each resource is chosen: the delivery mode (idempotent producer or
per-partition transactions), the cache backend (none, memory, or the Kafka-backed table
shared by replicas). Tests and benchmarks can hand in their own limiter or client.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from aiokafka.errors import KafkaError

from consumer.config import Settings
from consumer.enrich.cache import CachedCalls, EntryStore, MemoryStore, request_key
from consumer.enrich.outcome import OutputFields
from consumer.enrich.runner import WindowEnricher
from consumer.enrich.template import PromptTemplate
from consumer.kafka.clients import build_consumer, build_producer
from consumer.kafka.sink import ProducerSink
from consumer.kafka.source import KafkaSource
from consumer.kafka.transactions import TransactionalSink
from consumer.llm.caller import LLMCaller
from consumer.llm.client import ChatClient
from consumer.llm.limiter import AIMDLimiter
from consumer.observability import Metrics, PipelineEvents, ProviderHealth
from consumer.pipeline.chain import Parts
from consumer.pipeline.encode import Encoder
from consumer.pipeline.protocol import Deadline
from consumer.pipeline.report import Tally
from consumer.retry import Backoff
from consumer.state import GlobalTable

log = logging.getLogger("consumer")


def cache_table(settings: Settings) -> GlobalTable:
    """The cache's compacted topic and local store (kafka backend; also for `cache` CLI)."""
    cache = settings.llm.cache
    configs = {"cleanup.policy": "compact"}
    if cache.retention_ms is not None:
        configs = {"cleanup.policy": "compact,delete", "retention.ms": str(cache.retention_ms)}
    topic = cache.topic or f"{settings.kafka.group_id}.llm-cache"
    return GlobalTable.from_settings(settings.kafka, settings.state, topic, topic_configs=configs)


def build_parts(
    settings: Settings,
    metrics: Metrics,
    limiter: AIMDLimiter,
    client: ChatClient,
    provider: ProviderHealth,
    events: PipelineEvents,
) -> Parts:
    llm, kafka = settings.llm, settings.kafka
    caller = LLMCaller(
        client, limiter, llm.retry, on_attempt=metrics.attempt_hook(), health=provider
    )
    template = PromptTemplate(llm)
    table = cache_table(settings) if llm.cache.backend == "kafka" else None
    store: EntryStore | None = table
    if llm.cache.backend == "memory":
        memory = MemoryStore(llm.cache.max_entries, llm.cache.max_bytes)
        metrics.watch_cache(lambda: len(memory), lambda: memory.bytes)
        store = memory
    elif table is not None:
        metrics.watch_cache(lambda: table.stats().entries, lambda: table.stats().bytes)

    def key_of(messages: list[dict[str, str]]) -> str:
        return request_key(llm.provider, llm.deployment, client.request_body(messages))

    cached = CachedCalls(store, metrics) if store is not None else None
    codec = settings.delivery.output_compression
    compression = None if codec == "none" else codec
    exactly_once = settings.delivery.mode == "exactly_once"
    prefix = settings.delivery.transactional_id_prefix
    return Parts(
        settings=settings,
        tally=Tally(),
        enricher=WindowEnricher(template, caller, key_of, cached),
        encoder=Encoder(
            kafka.output_topic,
            kafka.dead_letter_topic,
            OutputFields(llm.response_field, llm.model_name, template),
            llm.model_name,
            template.template_hash,
        ),
        provider_health=provider,
        events=events,
        metrics=metrics,
        limiter=limiter,
        source=KafkaSource(build_consumer(kafka)),
        sink=None if exactly_once else ProducerSink(lambda: build_producer(kafka, compression)),
        transactions=TransactionalSink(kafka, compression, prefix) if exactly_once else None,
        shared_state=table,
    )


async def start_parts(parts: Parts) -> None:
    """Reach the broker (retrying with backoff for `kafka.connect_timeout_s`), then the state.

    A client that failed to start is stopped again before the next try, so none is left open.
    """
    kafka = parts.settings.kafka
    deadline = Deadline(kafka.connect_timeout_s)
    backoff = Backoff(0.5, 5.0)
    for attempt in itertools.count(1):
        try:
            if parts.sink is not None:
                await parts.sink.start()
            await parts.source.start()
            break
        except KafkaError as error:
            if parts.sink is not None:
                await parts.sink.stop()
            if deadline.expired:
                raise
            delay = min(backoff.delay(attempt), deadline.remaining())
            log.warning(
                "cannot reach the broker yet; retrying",
                extra={
                    "bootstrap": kafka.bootstrap_servers,
                    "error": str(error),
                    "retry_in_s": round(delay, 1),
                },
            )
            await asyncio.sleep(delay)
    if parts.shared_state is not None:
        await parts.shared_state.start()


async def stop_parts(parts: Parts) -> None:
    if parts.shared_state is not None:
        await parts.shared_state.stop()
    await parts.source.stop()
    if parts.transactions is not None:
        await parts.transactions.close()
    if parts.sink is not None:
        await parts.sink.stop()
