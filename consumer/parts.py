"""The long-lived pieces a consumer is made of, built once from the settings.

`build_parts` is where each resource is chosen: the delivery mode (idempotent producer or
per-partition transactions), the cache backend (none, memory, or the Kafka-backed table
shared by replicas). Tests and benchmarks can hand in their own limiter or client.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from aiokafka.errors import KafkaError

from consumer.audit import AuditLog
from consumer.config import LLMSettings, Settings
from consumer.enrich.cache import CachedCalls, EntryStore, MemoryStore, request_key
from consumer.enrich.outcome import OutputFields
from consumer.enrich.runner import Caller, WindowEnricher
from consumer.enrich.spend import BudgetedCaller, SpendLedger
from consumer.enrich.template import PromptTemplate
from consumer.enrich.validate import AnswerRules, ValidatedCalls
from consumer.kafka.clients import build_consumer, build_producer
from consumer.kafka.sink import ProducerSink
from consumer.kafka.source import KafkaSource
from consumer.kafka.transactions import TransactionalSink
from consumer.llm.budgets import estimate_prompt_tokens
from consumer.llm.caller import LLMCaller
from consumer.llm.client import ChatClient, Completion
from consumer.llm.fallback import FallbackChain, Route
from consumer.llm.limiter import AIMDLimiter
from consumer.llm.peers import LimiterPeers
from consumer.llm.pricing import Pricing
from consumer.llm.selfhosted import fit_to_server
from consumer.observability import Metrics, PipelineEvents, ProviderHealth
from consumer.pipeline.batch_enrich import build_batch_mode
from consumer.pipeline.chain import Parts
from consumer.pipeline.encode import Encoder
from consumer.pipeline.protocol import Deadline
from consumer.pipeline.report import Tally
from consumer.records import TopicPartition
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


def spend_table(settings: Settings) -> GlobalTable:
    """The budget's compacted topic: each replica's spend per period (two days kept)."""
    topic = settings.llm.budget.topic or f"{settings.kafka.group_id}.llm-spend"
    keep_ms = str(int(max(2 * settings.llm.budget.day_s, 3600.0) * 1000))
    configs = {"cleanup.policy": "compact,delete", "retention.ms": keep_ms}
    return GlobalTable.from_settings(settings.kafka, settings.state, topic, topic_configs=configs)


def peers_table(settings: Settings) -> GlobalTable:
    """The replicas' limits: live state, so kept in memory and in a topic that forgets fast."""
    topic = settings.llm.concurrency.share_topic or f"{settings.kafka.group_id}.llm-limits"
    configs = {"cleanup.policy": "compact,delete", "retention.ms": "600000", "segment.ms": "60000"}
    return GlobalTable(settings.kafka, topic, None, partitions=1, topic_configs=configs)


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
    client.prompt_cache_key = template.template_hash
    pricing = Pricing.from_settings(llm)
    models = [llm.model_name, *(m.model or m.deployment or "" for m in llm.fallbacks)]
    metrics.start_spend(
        template.template_hash,
        [model for model in models if pricing.price(model) is not None],
        ["provider", "prices"] if pricing.provider_cost else ["prices"],
    )
    audit_log = None if llm.audit_topic is None else AuditLog(kafka, llm.audit_topic, pricing)
    if audit_log is not None:
        client.on_attempt = audit_log.attempt
    spend = spend_table(settings) if llm.budget.enabled else None
    ledger = None if spend is None else SpendLedger(spend, llm.budget, template.template_hash)
    if ledger is not None:
        metrics.watch_budget(ledger.periods, ledger.remaining)

    def with_budget(inner: Caller, model: LLMSettings) -> Caller:
        """Each model's requests are admitted by that model's prices and max_tokens."""
        if ledger is None:
            return inner
        return BudgetedCaller(
            inner, ledger, pricing, model.model_name, estimate_prompt_tokens, model.max_tokens or 0
        )

    budgeted = with_budget(caller, llm)

    calls, closers = budgeted, []
    if llm.fallbacks:
        routes = [Route(llm.model_name, budgeted)]
        for index in range(len(llm.fallbacks)):
            fallback = llm.fallback_settings(index)
            fallback_client = ChatClient(fallback)
            if audit_log is not None:
                fallback_client.on_attempt = audit_log.attempt
            closers.append(fallback_client.aclose)
            own_limiter = AIMDLimiter.from_settings(fallback.concurrency)
            fallback_caller = LLMCaller(
                fallback_client,
                own_limiter,
                fallback.retry,
                on_attempt=metrics.attempt_hook(),
                health=provider,
            )
            routes.append(Route(fallback.model_name, with_budget(fallback_caller, fallback)))
        # A held window's rounds fail at least this often while an outage lasts.
        round_gap_s = (
            llm.retry.window_backoff_max_s + llm.retry.max_attempts * llm.request_timeout_s
        )
        calls = FallbackChain(
            routes, llm.fallback_after_s, llm.fallback_probe_s, forget_s=round_gap_s
        )
    accept: Callable[[Completion], Completion | None] | None = None
    if llm.validate_answers is not None:
        rules = AnswerRules(llm.validate_answers)
        calls, accept = ValidatedCalls(calls, rules), rules.accept
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
    peers = None
    if llm.concurrency.share_with_replicas:
        endpoint = f"{llm.provider} {llm.base_url} {llm.deployment} {llm.model_name}"
        peers = LimiterPeers(peers_table(settings), limiter, endpoint)
    return Parts(
        settings=settings,
        tally=Tally(),
        enricher=WindowEnricher(
            template, calls, key_of, cached, pricing, accept=accept, closers=closers
        ),
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
        batch=build_batch_mode(
            settings, template, client.request_body, key_of, metrics, pricing, ledger
        )
        if llm.mode != "live"
        else None,
        spend_state=spend,
        spend_ledger=ledger,
        audit=audit_log,
        peers=peers,
    )


async def start_parts(parts: Parts) -> None:
    """Reach the broker (retrying with backoff for `kafka.connect_timeout_s`), fit the limiter
    to a self-hosted server's announced slots, then the state.

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
    await fit_to_server(parts.settings.llm, parts.limiter)
    if parts.peers is not None:
        parts.peers.start()
    if parts.shared_state is not None:
        await parts.shared_state.start()
    if parts.batch is not None:
        await parts.batch.start()
    if parts.audit is not None:
        await parts.audit.start()
    if parts.spend_state is not None:
        await parts.spend_state.start()
        # What the group spent so far (a replica that died included) before the first request.
        await parts.spend_state.catch_up(parts.settings.llm.cache.catch_up_timeout_s)


async def assign_parts(parts: Parts, assigned: set[TopicPartition]) -> None:
    """Before a new assignment's chain runs: its transactional producers, and the cache
    read to its end, so answers a member that died had paid for are hits here."""
    if parts.transactions is not None:
        await parts.transactions.assign(assigned)
    if parts.shared_state is not None:
        caught = await parts.shared_state.catch_up(parts.settings.llm.cache.catch_up_timeout_s)
        parts.metrics.cache_catch_up_seconds.set(caught.seconds)
        parts.metrics.cache_catch_up_lag.set(caught.lag)


async def stop_parts(parts: Parts) -> None:
    await parts.enricher.aclose()
    if parts.peers is not None:
        await parts.peers.stop()
    if parts.batch is not None:
        await parts.batch.stop()
    if parts.spend_ledger is not None:
        parts.spend_ledger.write()
    if parts.audit is not None:
        await parts.audit.stop()
    if parts.spend_state is not None:
        await parts.spend_state.stop()
    if parts.shared_state is not None:
        await parts.shared_state.stop()
    await parts.source.stop()
    if parts.transactions is not None:
        await parts.transactions.close()
    if parts.sink is not None:
        await parts.sink.stop()
