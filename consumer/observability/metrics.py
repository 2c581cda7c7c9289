"""Prometheus metrics: one small facade the app calls, one registry per app.

The app calls a handful of methods (`consumed`, `window_done`, `committed`, ...) so that its
own code gains one line per hook; the metric objects, names and labels live here only.
Each `Metrics` owns its `CollectorRegistry` (not the process-global one), so tests can build
several apps in one process. Gauges that mirror live state (the limiter, held-back, provider,
broker and partition health) are read at scrape time through callbacks instead of being pushed.

LLM attempts are recorded by `llm_attempt(provider, status, seconds, attempt)` through
`attempt_hook()`, given to `LLMCaller(on_attempt=...)`. A retry is counted when it is attempted
(`attempt > 1`), so a retry storm shows while it happens, not when its window is done.
Label values known at start are created at 0, so their series exist before the first event.
"""

from __future__ import annotations

import time
from collections import Counter as TallyCounter
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from consumer import __version__
from consumer.enrich.outcome import LOCAL_REASONS
from consumer.records import DEAD_LETTER_REASONS
from consumer.window import CloseReason

if TYPE_CHECKING:
    from consumer.config import Settings
    from consumer.enrich.outcome import RowOutcome
    from consumer.llm.limiter import AIMDLimiter
    from consumer.pipeline.batch_enrich import BatchTracker
    from consumer.window import Window

PREFIX = "llm_consumer"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_WINDOW_ROWS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_WINDOW_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_LLM_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
_COMMIT_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def attempt_status(status_code: int | None, reason: str | None) -> str:
    """The `status` label: the HTTP code, or the failure reason when there was no answer."""
    if status_code is not None:
        return str(status_code)
    return reason or "error"


class Metrics:
    """Every metric of one consumer process, and the calls the app makes to update them."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.provider = settings.llm.provider if settings is not None else "unknown"
        self._started = time.time()
        self._latency_by_status: dict[tuple[str, str], Histogram] = {}
        self._last_commit = 0.0
        # Labels the spend metrics; set once the template is known (build_parts).
        self.template_hash = ""
        r = self.registry
        self.info = Info(PREFIX, "Version and provider of this consumer.", registry=r)
        self.rows_consumed = Counter(
            f"{PREFIX}_rows_consumed", "Input messages read from the input topic.", registry=r
        )
        self.rows_produced = Counter(
            f"{PREFIX}_rows_produced",
            "Outputs acknowledged by the broker (enriched rows and rows carrying an error).",
            registry=r,
        )
        self.row_errors = Counter(
            f"{PREFIX}_row_errors",
            "Outputs carrying {rf}_error, by reason.",
            ["reason"],
            registry=r,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters",
            "Input messages sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.windows = Counter(
            f"{PREFIX}_windows",
            "Windows processed, by close reason (count, time, shutdown, revoke).",
            ["close_reason"],
            registry=r,
        )
        self.window_rows = Histogram(
            f"{PREFIX}_window_rows",
            "Messages per processed window.",
            buckets=_WINDOW_ROWS_BUCKETS,
            registry=r,
        )
        self.window_seconds = Histogram(
            f"{PREFIX}_window_seconds",
            "Time to enrich, deliver and commit one window (including held-back retries).",
            buckets=_WINDOW_SECONDS_BUCKETS,
            registry=r,
        )
        self.llm_request_seconds = Histogram(
            f"{PREFIX}_llm_request_seconds",
            "Latency of each LLM attempt, by provider and status (HTTP code or failure reason).",
            ["provider", "status"],
            buckets=_LLM_SECONDS_BUCKETS,
            registry=r,
        )
        self.llm_retries = Counter(
            f"{PREFIX}_llm_retries",
            "LLM attempts beyond the first for a row, counted as they are made.",
            ["provider"],
            registry=r,
        )
        self.llm_rate_limited = Counter(
            f"{PREFIX}_llm_rate_limited",
            "LLM attempts answered with HTTP 429.",
            ["provider"],
            registry=r,
        )
        self.tokens = Counter(
            f"{PREFIX}_llm_tokens",
            "Tokens used by successful completions, by model and kind (prompt, completion).",
            ["model", "kind"],
            registry=r,
        )
        self.limiter_limit = Gauge(
            f"{PREFIX}_limiter_limit", "Current AIMD concurrency limit.", registry=r
        )
        self.limiter_in_flight = Gauge(
            f"{PREFIX}_limiter_in_flight", "LLM requests admitted and not finished.", registry=r
        )
        self.limiter_waiting = Gauge(
            f"{PREFIX}_limiter_waiting", "LLM requests queued for admission.", registry=r
        )
        self.limiter_decreases = Gauge(
            f"{PREFIX}_limiter_decreases",
            "Multiplicative decreases of the limit since start (congestion events).",
            registry=r,
        )
        self.limiter_peers = Gauge(
            f"{PREFIX}_limiter_peers",
            "Other replicas pressing on the same provider, as they last told "
            "(llm.concurrency.share_with_replicas).",
            registry=r,
        )
        self.limiter_quota_gates = Gauge(
            f"{PREFIX}_limiter_quota_gates",
            "Times a spent rate quota closed admission for every request until its reset.",
            registry=r,
        )
        self.limiter_learnt_rpm = Gauge(
            f"{PREFIX}_limiter_learnt_rpm",
            "Requests per minute taken from the provider's rate-limit headers (0: none sent).",
            registry=r,
        )
        self.limiter_learnt_tpm = Gauge(
            f"{PREFIX}_limiter_learnt_tpm",
            "Tokens per minute taken from the provider's rate-limit headers (0: none sent).",
            registry=r,
        )
        self.lag = Gauge(
            f"{PREFIX}_consumer_lag",
            "Messages behind: high watermark minus committed offset, per assigned partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            f"{PREFIX}_assigned_partitions", "Input partitions assigned to this member.", registry=r
        )
        self.commit_seconds = Histogram(
            f"{PREFIX}_commit_seconds",
            "Latency of offset commits.",
            buckets=_COMMIT_SECONDS_BUCKETS,
            registry=r,
        )
        self.last_commit_timestamp = Gauge(
            f"{PREFIX}_last_commit_timestamp_seconds",
            "Unix time of the last successful offset commit (0 before the first).",
            registry=r,
        )
        self.seconds_since_last_commit = Gauge(
            f"{PREFIX}_seconds_since_last_commit",
            "Seconds since the last successful commit (since start before the first).",
            registry=r,
        )
        self.seconds_since_last_commit.set_function(
            lambda: time.time() - (self._last_commit or self._started)
        )
        self.held_back = Gauge(
            f"{PREFIX}_held_back",
            "1 while a window is held back because the provider is failing.",
            registry=r,
        )
        self.provider_failing = Gauge(
            f"{PREFIX}_provider_failing",
            "1 while LLM requests keep failing (429, 5xx, timeouts...) with no success between.",
            registry=r,
        )
        self.broker_unreachable = Gauge(
            f"{PREFIX}_broker_unreachable",
            "1 while the broker does not answer (probe, produce or commit keep failing).",
            registry=r,
        )
        self.stuck_partitions = Gauge(
            f"{PREFIX}_stuck_partitions",
            "Assigned partitions with lag and no committed progress for stuck_partition_after_s.",
            registry=r,
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when /readyz answers 200.", registry=r)
        self.cache_lookups = Counter(
            f"{PREFIX}_cache_lookups",
            "Response-cache lookups by result: a hit is a request not paid for again.",
            ["result"],
            registry=r,
        )
        self.cache_writes = Counter(
            f"{PREFIX}_cache_writes", "Answers stored in the response cache.", registry=r
        )
        self.cache_write_failures = Counter(
            f"{PREFIX}_cache_write_failures",
            "Cache writes the broker did not acknowledge (the rows were not affected).",
            registry=r,
        )
        self.cache_entries = Gauge(
            f"{PREFIX}_cache_entries", "Entries in the local cache store.", registry=r
        )
        self.cache_bytes = Gauge(
            f"{PREFIX}_cache_bytes", "Bytes of the local cache store.", registry=r
        )
        self.cache_catch_up_seconds = Gauge(
            f"{PREFIX}_cache_catch_up_seconds",
            "How long the last catch-up of the cache topic took (on partition assignment).",
            registry=r,
        )
        self.cache_catch_up_lag = Gauge(
            f"{PREFIX}_cache_catch_up_lag",
            "Cache records still unread when the last catch-up ended (0: complete).",
            registry=r,
        )
        for result in ("hit", "miss"):
            self.cache_lookups.labels(result)
        # Spend (issue 15): cost by model, template hash and where the figure came from;
        # tokens by kind; the budget left in the current period.
        self.cost_usd = Counter(
            f"{PREFIX}_llm_cost_usd",
            "USD spent on completions (cache hits cost 0), by model, template hash and source "
            "(provider: the provider's own figure; prices: llm.pricing).",
            ["model", "template_hash", "source"],
            registry=r,
        )
        self.priced_rows = Counter(
            f"{PREFIX}_llm_priced_rows",
            "Rows whose cost is known (cache hits included): the denominator of cost per row.",
            ["model", "template_hash"],
            registry=r,
        )
        self.usage_tokens = Counter(
            f"{PREFIX}_llm_usage_tokens",
            "Tokens of successful completions by kind (prompt, cached, completion, reasoning), "
            "model and template hash; cached is part of prompt, reasoning part of completion.",
            ["model", "template_hash", "kind"],
            registry=r,
        )
        self.budget_remaining = Gauge(
            f"{PREFIX}_budget_remaining_usd",
            "USD left in the current period of the tightest llm.budget cap, by period.",
            ["period"],
            registry=r,
        )
        self.event_loop_lag = Gauge(
            f"{PREFIX}_event_loop_lag_seconds",
            "How late the last 1 s heartbeat sleep woke up (a blocked event loop shows here).",
            registry=r,
        )
        for reason in CloseReason:
            self.windows.labels(reason.value)
        self.llm_retries.labels(self.provider)
        self.llm_rate_limited.labels(self.provider)
        self.llm_request_seconds.labels(self.provider, "200")
        for letter in DEAD_LETTER_REASONS:
            self.dead_letters.labels(letter)
        # Row errors have an open set of reasons (the provider's); the local ones are enough
        # for `sum(rate(...))` to be 0 rather than "No data" before the first error.
        for error in sorted(LOCAL_REASONS):
            self.row_errors.labels(error)
        if settings is not None:
            for kind in ("prompt", "completion"):
                self.tokens.labels(settings.llm.model_name, kind)
            self.info.info(
                {
                    "version": __version__,
                    "provider": settings.llm.provider,
                    "model": settings.llm.model_name,
                    "input_topic": settings.kafka.input_topic,
                    "group": settings.kafka.group_id,
                }
            )

    # ---- live state read at scrape time ---------------------------------------------------

    def watch_limiter(self, limiter: AIMDLimiter) -> None:
        self.limiter_limit.set_function(lambda: limiter.state().limit)
        self.limiter_in_flight.set_function(lambda: limiter.state().in_flight)
        self.limiter_waiting.set_function(lambda: limiter.state().waiting)
        self.limiter_decreases.set_function(lambda: limiter.state().decreases)
        self.limiter_quota_gates.set_function(lambda: limiter.state().quota_gates)
        self.limiter_peers.set_function(lambda: limiter.state().peers)
        self.limiter_learnt_rpm.set_function(lambda: limiter.state().learnt_rpm or 0.0)
        self.limiter_learnt_tpm.set_function(lambda: limiter.state().learnt_tpm or 0.0)

    def watch_held_back(self, held_back: Callable[[], bool]) -> None:
        self.held_back.set_function(lambda: 1.0 if held_back() else 0.0)

    def watch_health(
        self,
        provider_failing: Callable[[], bool],
        broker_unreachable: Callable[[], bool],
        stuck_partitions: Callable[[], int],
    ) -> None:
        self.provider_failing.set_function(lambda: 1.0 if provider_failing() else 0.0)
        self.broker_unreachable.set_function(lambda: 1.0 if broker_unreachable() else 0.0)
        self.stuck_partitions.set_function(lambda: float(stuck_partitions()))

    # ---- the app's hooks ------------------------------------------------------------------

    def consumed(self, count: int = 1) -> None:
        self.rows_consumed.inc(count)

    def window_done(self, window: Window, outcomes: Sequence[RowOutcome], seconds: float) -> None:
        """A window's outputs and dead letters were acknowledged: count everything in it."""
        self.windows.labels(str(window.close_reason or "unknown")).inc()
        self.window_rows.observe(len(window.items))
        self.window_seconds.observe(seconds)
        for item in window.items:
            if item.dead_letter is not None:
                self.dead_letter(item.dead_letter.reason)
        self.rows_produced.inc(len(outcomes))
        # Summed per window first: a labels() lookup per row would cost more than the counting.
        errors: TallyCounter[str] = TallyCounter()
        tokens: dict[str, list[int]] = {}
        for outcome in outcomes:
            if outcome.error is not None:
                errors[outcome.error.reason] += 1
            completion = outcome.completion
            if completion is not None:
                used = tokens.setdefault(completion.model, [0, 0])
                used[0] += completion.usage.prompt_tokens
                used[1] += completion.usage.completion_tokens
        for reason, count in errors.items():
            self.row_errors.labels(reason).inc(count)
        for model, (prompt, answer) in tokens.items():
            self.tokens_used(model, prompt, answer)
        self._spend(outcomes, self.template_hash)

    def cache_lookup(self, hit: bool) -> None:
        self.cache_lookups.labels("hit" if hit else "miss").inc()

    def cache_write(self) -> None:
        self.cache_writes.inc()

    def start_spend(
        self, template_hash: str, models: Iterable[str], sources: Iterable[str]
    ) -> None:
        """Labels the spend series by the template and creates them at 0 for the priced models,
        so cost-per-row panels read 0, not "No data", before the first answer."""
        self.template_hash = template_hash
        kinds = ("prompt", "cached", "completion", "reasoning")
        for model in models:
            self.priced_rows.labels(model, template_hash)
            for source in sources:
                self.cost_usd.labels(model, template_hash, source)
            for kind in kinds:
                self.usage_tokens.labels(model, template_hash, kind)

    def watch_budget(
        self, periods: Iterable[str], remaining: Callable[[str], float | None]
    ) -> None:
        def left(period: str) -> Callable[[], float]:
            return lambda: remaining(period) or 0.0

        for period in periods:
            self.budget_remaining.labels(period).set_function(left(period))

    def _spend(self, outcomes: Sequence[RowOutcome], template_hash: str) -> None:
        cost: dict[tuple[str, str], float] = {}
        rows: TallyCounter[str] = TallyCounter()
        kinds: TallyCounter[tuple[str, str]] = TallyCounter()
        for outcome in outcomes:
            # a paid answer that failed validation cost as much as one that passed
            completion = outcome.completion or outcome.rejected
            if completion is None:
                continue
            if outcome.cost.usd is not None and outcome.cost.source is not None:
                key = (completion.model, outcome.cost.source)
                cost[key] = cost.get(key, 0.0) + outcome.cost.usd
                rows[completion.model] += 1
            if outcome.cache == "hit":
                continue  # tokens not paid for this time
            usage = completion.usage
            kinds[(completion.model, "prompt")] += usage.prompt_tokens
            kinds[(completion.model, "cached")] += usage.cached_tokens or 0
            kinds[(completion.model, "completion")] += usage.completion_tokens
            kinds[(completion.model, "reasoning")] += usage.reasoning_tokens or 0
        for (model, source), usd in cost.items():
            self.cost_usd.labels(model, template_hash, source).inc(usd)
        for model, count in rows.items():
            self.priced_rows.labels(model, template_hash).inc(count)
        for (model, kind), count in kinds.items():
            self.usage_tokens.labels(model, template_hash, kind).inc(count)

    def watch_cache(self, entries: Callable[[], float], size: Callable[[], float]) -> None:
        self.cache_entries.set_function(entries)
        self.cache_bytes.set_function(size)

    def watch_batches(self, tracker: BatchTracker) -> None:
        """Batch mode (issue 16): jobs in flight by state, rows in them, the oldest's age, and
        submit and poll errors; the series exist only when batch mode is on."""
        from consumer.llm.batch import STATUSES

        r = self.registry
        in_flight = Gauge(
            f"{PREFIX}_batch_jobs", "Batch jobs in flight, by status.", ["state"], registry=r
        )
        for state in ("submitting", *STATUSES):
            in_flight.labels(state).set_function(partial(tracker.by_state, state))
        Gauge(
            f"{PREFIX}_batch_rows_waiting", "Rows waiting in batch jobs in flight.", registry=r
        ).set_function(tracker.rows_waiting)
        Gauge(
            f"{PREFIX}_batch_oldest_age_seconds",
            "Age of the oldest batch job in flight.",
            registry=r,
        ).set_function(tracker.oldest_age_s)
        self._batch_submit_errors = Counter(
            f"{PREFIX}_batch_submit_errors",
            "Batch jobs that could not be created (upload or create refused or failed).",
            registry=r,
        )
        self._batch_windows = Counter(
            f"{PREFIX}_batch_mode_windows",
            "Windows by the mode that answered them (live or batch; mode auto chooses).",
            ["mode"],
            registry=r,
        )
        for mode in ("live", "batch"):
            self._batch_windows.labels(mode)
        self._batch_poll_errors = Counter(
            f"{PREFIX}_batch_poll_errors",
            "Failed status polls or file downloads of batch jobs (tried again).",
            registry=r,
        )

    def batch_submit_error(self) -> None:
        self._batch_submit_errors.inc()

    def batch_window_mode(self, mode: str) -> None:
        self._batch_windows.labels(mode).inc()

    def batch_poll_error(self) -> None:
        self._batch_poll_errors.inc()

    def dead_letter(self, reason: str) -> None:
        self.dead_letters.labels(reason).inc()

    def tokens_used(self, model: str, prompt: int, completion: int) -> None:
        self.tokens.labels(model, "prompt").inc(prompt)
        self.tokens.labels(model, "completion").inc(completion)

    def committed(self, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        self._last_commit = time.time()
        self.last_commit_timestamp.set(self._last_commit)

    def llm_attempt(self, provider: str, status: str, seconds: float, attempt: int) -> None:
        """One attempt finished; `attempt` is 1-based, so anything above 1 is a retry."""
        latency = self._latency_by_status.get((provider, status))
        if latency is None:
            latency = self._latency_by_status[(provider, status)] = self.llm_request_seconds.labels(
                provider, status
            )
        latency.observe(seconds)
        if attempt > 1:
            self.llm_retries.labels(provider).inc()
        if status == "429":
            self.llm_rate_limited.labels(provider).inc()

    def attempt_hook(self) -> Callable[[str, float, int], None]:
        """For `LLMCaller(on_attempt=...)`: called per attempt with (status, seconds, attempt)."""
        provider = self.provider

        def on_attempt(status: str, seconds: float, attempt: int) -> None:
            self.llm_attempt(provider, status, seconds, attempt)

        return on_attempt

    def set_lag(self, lags: Iterable[tuple[str, int, int]]) -> None:
        """Replace the per-partition lag series with (topic, partition, lag) of the assignment."""
        self.lag.clear()
        count = 0
        for topic, partition, lag in lags:
            self.lag.labels(topic, str(partition)).set(lag)
            count += 1
        self.assigned_partitions.set(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def parse_exposition(text: str) -> dict[str, float]:
    """`name{labels}` -> value of a scrape (for tests and quick checks); labels sorted."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


__all__ = ["CONTENT_TYPE", "Metrics", "attempt_status", "parse_exposition"]
