"""Settings: one YAML file, `${ENV}` interpolation for secrets, validated by pydantic at start.

The models here are the single source of truth for configuration: `schemas/settings.schema.json`
is exported from them, and every error names the key that is wrong and what it expects.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# o1, o3-mini, o4-mini-2025-04-16, gpt-5, gpt-5-mini, gpt-5.1, openai/o3 ...
_REASONING_MODEL = re.compile(r"(?:^|/)(?:o[1-9]|gpt-5)(?:[-.:]|$)", re.IGNORECASE)


class ConfigError(Exception):
    """A settings file that cannot be used, with one line per problem a person can act on."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Model):
    """Where rows come from and where outputs, dead letters and offsets go."""

    bootstrap_servers: str = Field(description="Comma-separated host:port list.")
    input_topic: str
    output_topic: str
    dlq_topic: str | None = Field(
        default=None, description="Dead-letter topic; defaults to '<input_topic>.dlq'."
    )
    group_id: str
    client_id: str = "llm-consumer"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    group_instance_id: str | None = Field(
        default=None,
        description=(
            "Static membership (KIP-345): a restart with the same id gets its partitions back "
            "without a rebalance. Must be unique per process (e.g. the pod name)."
        ),
    )
    session_timeout_ms: int = Field(default=45_000, ge=6_000, le=300_000)
    rebalance_timeout_ms: int = Field(
        default=60_000,
        ge=6_000,
        description="How long the group waits for members to rejoin; half of it is the budget "
        "to finish in-flight windows of revoked partitions.",
    )
    heartbeat_interval_ms: int = Field(default=3_000, ge=500)
    max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    max_row_bytes: int = Field(
        default=1_000_000, ge=1, description="Input messages larger than this go to the DLQ."
    )
    max_row_depth: int = Field(
        default=64,
        ge=1,
        le=200,
        description="Rows nested deeper than this (objects and arrays) go to the DLQ. At most 200: "
        "the output encoder stops at about 254 levels, and the added fields need room.",
    )
    max_key_bytes: int = Field(
        default=65_536,
        ge=1,
        description="Input messages with a key larger than this go to the DLQ (outputs keep the "
        "key).",
    )
    connect_timeout_s: float = Field(
        default=60.0,
        gt=0.0,
        description="How long start-up keeps trying to reach the broker before it gives up.",
    )
    consumer_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for AIOKafkaConsumer."
    )
    producer_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for AIOKafkaProducer."
    )

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and (
            self.sasl_mechanism is None or self.sasl_username is None or self.sasl_password is None
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, "
                "sasl_username and sasl_password"
            )
        if self.output_topic == self.input_topic:
            raise ValueError("output_topic must differ from input_topic (it would loop)")
        return self

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.input_topic}.dlq"


class WindowSettings(_Model):
    """A window closes on whichever comes first: `max_messages` rows or `max_wait_ms`."""

    max_messages: int = Field(default=100, ge=1, le=100_000)
    max_wait_ms: int = Field(
        default=2_000, ge=1, description="Measured from the window's first message."
    )
    max_pending_windows: int = Field(
        default=8,
        ge=1,
        le=64,
        description=(
            "Windows enriched at the same time (their rows share the limiter, oldest first; "
            "outputs leave in order). Bounds memory: about this many windows of rows are held. "
            "Enough that a row waiting out a provider's wait hint (seconds) holds up only its "
            "own window while the others keep the limit busy."
        ),
    )
    max_pending_windows_when_idle: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description=(
            "While every window in flight waits on rows sleeping out a provider's wait hint "
            "and the limiter has free permits with nothing queued for them, more windows are "
            "started, one at a time, up to this many (never while a window is held back or "
            "the provider is failing). Default: 4 x max_pending_windows. Set it to "
            "max_pending_windows to turn this off."
        ),
    )

    @model_validator(mode="after")
    def _idle_bound_not_below_the_bound(self) -> WindowSettings:
        idle = self.max_pending_windows_when_idle
        if idle is not None and idle < self.max_pending_windows:
            raise ValueError(
                f"window.max_pending_windows_when_idle ({idle}) must be at least "
                f"window.max_pending_windows ({self.max_pending_windows})"
            )
        return self

    @property
    def windows_when_idle(self) -> int:
        """The bound while the limit idles: as configured, else 4 x max_pending_windows."""
        idle = self.max_pending_windows_when_idle
        return 4 * self.max_pending_windows if idle is None else idle


class ConcurrencySettings(_Model):
    """The process-wide AIMD limit on concurrent LLM requests."""

    initial: int = Field(default=16, ge=1)
    min: int = Field(default=1, ge=1)
    max: int = Field(default=64, ge=1, le=4096)
    decrease_factor: float = Field(
        default=0.9,
        gt=0.0,
        lt=1.0,
        description=(
            "Multiplicative decrease per congestion event (a 429/503/529 at capacity; a spent "
            "rate quota gates admission instead of cutting)."
        ),
    )
    increase_step: float = Field(
        default=1.0, gt=0.0, description="Added to the limit per round trip while it is used."
    )
    probe_step: float | None = Field(
        default=0.2,
        gt=0.0,
        description=(
            "Increase per round trip just below the level of the last congestion, where the "
            "limit rides (a flat sawtooth: few 429s and Retry-After pauses), divided by the "
            "replicas sharing the provider; below that level the limit recovers half the way "
            "per round trip. null: increase_step always."
        ),
    )
    fast_climb: bool = Field(
        default=True,
        description=(
            "Above the last congestion level, or before any, the increase doubles every round "
            "trip from increase_step (exponential growth, as in BIC and TCP slow start), so a "
            "capacity jump is found in a few round trips. false: increase_step always (with "
            "probe_step null: plain AIMD)."
        ),
    )
    retry_after_jitter: float = Field(
        default=0.2,
        ge=0.0,
        le=2.0,
        description="Retry-After gates get up to this fraction added, then a ramp as long.",
    )
    latency_signal: bool | None = Field(
        default=None,
        description=(
            "Find the slot count of servers that queue instead of answering 429 (vLLM, "
            "llama.cpp, Ollama) from the shape of latency against the requests in flight: a "
            "level that adds less than 1/latency_tolerance of one more parallel request's "
            "throughput only queues, and the limit steps below it. null (default): on until "
            "the provider sends rate-limit headers (hosted APIs meter by quota); true: always; "
            "false: never."
        ),
    )
    latency_tolerance: float = Field(
        default=2.0,
        gt=1.0,
        description=(
            "Latency that grows faster than (in-flight ratio)^(1/latency_tolerance) reads as "
            "a queue."
        ),
    )
    share_with_replicas: bool = Field(
        default=True,
        description=(
            "Share the provider fairly with the other replicas of the consumer group: each "
            "tells its limit in a compacted topic (share_topic, kept in memory), and a replica "
            "whose congestion level is below 0.9 of the mean limit of the replicas pressing on "
            "theirs climbs back to that mean. Without it, the replica that first finds freed "
            "capacity keeps it, and the others' partitions lag. The primary model's limit "
            "only. When the topic cannot be created or read, each replica runs alone (a "
            "warning says so)."
        ),
    )
    share_topic: str | None = Field(
        default=None,
        description="The topic of share_with_replicas; null: <kafka.group_id>.llm-limits.",
    )
    server_slots: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default="auto",
        description=(
            "A self-hosted server's parallel slots (llama.cpp's --parallel): the limit is "
            "capped at server_slots + 1 and the latency probe is off (unless latency_signal is "
            "true). auto (default): with provider openai and a base_url that is not a hosted "
            "API, ask GET <root>/props once at start, where llama.cpp's server announces "
            "total_slots; servers that announce none keep the latency probe. null: never ask."
        ),
    )
    requests_per_minute: int | None = Field(
        default=None, ge=1, description="Optional RPM budget beside the concurrency limit."
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Optional TPM budget: charged prompt estimate (chars/4) + max_tokens at admission, "
            "reconciled with the reported usage."
        ),
    )

    @model_validator(mode="after")
    def _check_order(self) -> ConcurrencySettings:
        if not self.min <= self.initial <= self.max:
            raise ValueError(
                f"need min <= initial <= max, got min={self.min} initial={self.initial} "
                f"max={self.max}"
            )
        return self


class RetrySettings(_Model):
    """Per-row retries of retryable failures (429, 5xx, timeouts), with backoff and jitter."""

    max_attempts: int = Field(default=6, ge=1, le=100)
    initial_backoff_s: float = Field(default=0.5, gt=0.0)
    max_backoff_s: float = Field(default=30.0, gt=0.0)
    max_retry_after_s: float = Field(
        default=60.0, gt=0.0, description="Longer Retry-After hints are capped to this."
    )
    partial_window_retries: int = Field(
        default=2,
        ge=0,
        description=(
            "Times a window is held back and its failed rows tried again when only some rows ran "
            "out of retries; after that they get a retries_exhausted error. A window whose rows "
            "all fail is held back for as long as that lasts."
        ),
    )
    row_deadline_s: float = Field(
        default=600.0,
        gt=0.0,
        description=(
            "A row that has failed for this long since it was first sent ends as "
            "retries_exhausted, even below max_attempts and partial_window_retries (rows that "
            "hang or always fail end). Only windows failing as a whole (an outage, a bad key) "
            "are held for longer."
        ),
    )
    window_backoff_max_s: float = Field(
        default=60.0,
        gt=0.0,
        description="Cap on the wait before a window that failed systemically is tried again.",
    )
    budget_ratio: float = Field(
        default=0.2,
        ge=0.0,
        description="Retry budget: retries may be at most this share of recent requests...",
    )
    budget_min_per_s: float = Field(
        default=2.0, ge=0.0, description="...plus this many retries per second."
    )
    budget_window_s: float = Field(
        default=10.0, gt=0.0, description="What 'recent' means for the retry budget."
    )


class CacheSettings(_Model):
    """The response cache: a request already answered is never paid for again."""

    backend: Literal["off", "memory", "kafka"] = Field(
        default="memory",
        description=(
            "memory: a bounded LRU in this process (dedupe within a run). kafka: a compacted "
            "topic every replica reads into a local store (state.directory), so answers "
            "survive crashes and rebalances and are shared by replicas: the choice for "
            "production. off: every row is a request."
        ),
    )
    topic: str | None = Field(
        default=None, description="kafka: the cache topic; defaults to '<group_id>.llm-cache'."
    )
    max_entries: int = Field(default=100_000, ge=1, description="memory: entries kept.")
    max_bytes: int = Field(
        default=268_435_456, ge=1, description="memory: bytes of answers kept (about)."
    )
    retention_ms: int | None = Field(
        default=None,
        ge=60_000,
        description=(
            "kafka: entries older than this may be dropped by the broker (the topic is created "
            "with cleanup.policy compact,delete); null: kept until purged."
        ),
    )
    catch_up_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description=(
            "kafka: on partition assignment, read the cache topic to its end for at most this "
            "long first, so answers a dead member paid for are hits here; then go on."
        ),
    )


class ModelPrice(_Model):
    """What one model costs, in USD (issue 15); a provider-reported cost wins over it."""

    input_per_million: float = Field(ge=0.0, description="USD per million prompt tokens.")
    output_per_million: float = Field(
        ge=0.0, description="USD per million completion tokens (reasoning tokens included)."
    )
    cached_input_per_million: float | None = Field(
        default=None,
        ge=0.0,
        description="USD per million cached prompt tokens; null: priced as input.",
    )
    per_request: float = Field(default=0.0, ge=0.0, description="USD charged per request.")
    batch_factor: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description=(
            "llm.mode batch: the share of these prices a batch answer costs (OpenAI, Azure "
            "Global Batch and OpenRouter charge half)."
        ),
    )


class PricingSettings(_Model):
    """Prices per model name, so each row's `{rf}_cost_usd` is known (null when unpriced)."""

    models: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description=(
            "Model name -> prices. An answered snapshot name (gpt-4o-mini-2024-07-18) is priced "
            "by the longest name here it starts with."
        ),
    )
    source: str | None = Field(
        default=None, description="Where the prices come from (a URL and a date): for readers."
    )
    provider_cost: bool = Field(
        default=True,
        description=(
            "openrouter: ask for usage accounting (usage.include) and take the cost the "
            "provider reports (usage.cost) over the prices here."
        ),
    )


class BudgetLimits(_Model):
    usd_per_hour: float | None = Field(default=None, gt=0.0)
    usd_per_day: float | None = Field(default=None, gt=0.0)


class BudgetSettings(_Model):
    """Spend caps shared by every replica (a compacted topic holds each replica's spend)."""

    usd_per_hour: float | None = Field(default=None, gt=0.0)
    usd_per_day: float | None = Field(default=None, gt=0.0)
    per_template: dict[str, BudgetLimits] = Field(
        default_factory=dict,
        description="Template hash ({rf}_template_hash) -> caps on the spend of that template.",
    )
    topic: str | None = Field(
        default=None, description="The spend topic; defaults to '<group_id>.llm-spend'."
    )
    hour_s: float = Field(
        default=3600.0, ge=1.0, description="Length of an 'hour' period (shorten for tests only)."
    )
    day_s: float = Field(
        default=86400.0, ge=1.0, description="Length of a 'day' period (shorten for tests only)."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.usd_per_hour or self.usd_per_day or self.per_template)


class ValidateSettings(_Model):
    """Checks an answer against what the prompt asked for (issue 12): an answer that fails is
    asked again `retries` times, then the row gets the `invalid_answer` error."""

    allowed: list[str] | None = Field(
        default=None,
        min_length=1,
        description=(
            "The answer must be one of these, e.g. [POSITIVE, NEGATIVE, NEUTRAL]. Compared after "
            "stripping surrounding whitespace, ignoring case unless case_sensitive; the answer "
            "is written as the allowed value it matched, spelled as here."
        ),
    )
    pattern: str | None = Field(
        default=None,
        description=(
            "A regular expression the whole answer (stripped of surrounding whitespace) must "
            "match; case-insensitive unless case_sensitive."
        ),
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description=(
            "A JSON Schema the answer must fit (the parsed object with a JSON response_format), "
            "checked like llm.json_schema. With response_format json_schema, answers that do "
            "not fit llm.json_schema (or are not JSON) are invalid answers too."
        ),
    )
    case_sensitive: bool = Field(
        default=False, description="Compare allowed values and the pattern case-sensitively."
    )
    retries: int = Field(
        default=1,
        ge=0,
        le=5,
        description="Times an invalid answer is asked again with the same prompt (each is paid).",
    )
    reject_truncated: bool = Field(
        default=True,
        description=(
            "An answer cut by max_tokens (finish_reason length) is invalid. It is not asked "
            "again: the same prompt and token budget end the same way."
        ),
    )

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a valid regular expression: {error}") from None
        return value


class FallbackSettings(_Model):
    """One model of the fallback chain: what it changes of the primary `llm` settings.

    Unset fields are the primary's. Setting `provider` or `base_url` means another endpoint:
    the connection fields (base_url, api_key, headers, deployment, api_version,
    azure_api_style, azure_ad_token*) are then not taken from the primary.
    """

    provider: Literal["openrouter", "azure", "openai"] | None = None
    model: str | None = None
    deployment: str | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_version: str | None = None
    azure_api_style: Literal["deployments", "v1"] | None = None
    headers: dict[str, str] | None = None
    extra_body: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    token_parameter: Literal["auto", "max_tokens", "max_completion_tokens"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    request_timeout_s: float | None = Field(default=None, gt=0.0)
    concurrency: ConcurrencySettings | None = Field(
        default=None, description="This model's own limiter; default: the primary's settings."
    )


# The connection of a model: not inherited by a fallback that names another endpoint.
_CONNECTION_FIELDS = frozenset(
    {
        "base_url",
        "api_key",
        "headers",
        "deployment",
        "api_version",
        "azure_api_style",
        "azure_ad_token",
        "azure_ad_token_env",
        "azure_ad_token_file",
        "azure_ad_token_command",
    }
)


class BatchSettings(_Model):
    """Batch mode (llm.mode batch): each window is one provider batch job at the batch price."""

    max_pending_batches: int = Field(
        default=4,
        ge=1,
        le=64,
        description=(
            "Windows whose batch jobs may run at once; beyond it the partitions are paused, so "
            "memory and the number of open jobs stay bounded."
        ),
    )
    max_requests_per_file: int = Field(
        default=50_000,
        ge=1,
        le=50_000,
        description="Requests in one input file (the providers' limit is 50,000); more split.",
    )
    max_bytes_per_file: int = Field(
        default=200_000_000,
        ge=1_000,
        le=200_000_000,
        description="Bytes of one JSONL input file (the providers' limit is 200 MB); more split.",
    )
    poll_initial_s: float = Field(
        default=2.0, gt=0.0, description="First wait between two status polls of a job."
    )
    poll_max_s: float = Field(
        default=60.0, gt=0.0, description="Longest wait between two status polls (backoff)."
    )
    retry_rows: Literal["next_batch", "live"] = Field(
        default="next_batch",
        description=(
            "Where rows whose line failed retryably (429, 5xx, a cancelled job) are tried "
            "again: in another batch job, or as live requests."
        ),
    )
    topic: str | None = Field(
        default=None,
        description=(
            "The compacted topic of the job records; defaults to '<group_id>.llm-batches'."
        ),
    )
    auto_backlog_rows: int = Field(
        default=10_000,
        ge=0,
        description=(
            "mode auto: a window goes to a batch job while more rows than this wait behind it "
            "in its partitions (the backlog), as live requests otherwise."
        ),
    )
    auto_row_deadline_s: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "mode auto: how long after it was published a row may be answered. A window whose "
            "oldest row can still wait auto_batch_turnaround_s within it goes to a batch job "
            "(half the price) even without a backlog; null: the backlog alone decides."
        ),
    )
    auto_batch_turnaround_s: float = Field(
        default=3600.0,
        gt=0.0,
        description=(
            "mode auto: how long a batch job is expected to take (providers promise 24 h and "
            "usually answer in minutes); with auto_row_deadline_s."
        ),
    )
    catch_up_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description=(
            "On partition assignment, read the job records to their end for at most this long "
            "first, so jobs a member that died started are found and awaited, not paid again."
        ),
    )


class LLMSettings(_Model):
    """Which provider to call, with what prompt, and how hard."""

    provider: Literal["openrouter", "azure", "openai"]
    model: str | None = Field(default=None, description="Model name; for Azure, optional.")
    deployment: str | None = Field(default=None, description="Azure deployment name.")
    base_url: str | None = Field(
        default=None,
        description=(
            "API root. Defaults: openrouter https://openrouter.ai/api/v1, openai "
            "https://api.openai.com/v1; for azure the resource endpoint "
            "(https://NAME.openai.azure.com)."
        ),
    )
    api_version: str = Field(
        default="2024-10-21", description="Azure api-version; unused by other providers."
    )
    azure_api_style: Literal["deployments", "v1"] = "deployments"
    api_key: SecretStr | None = None
    azure_ad_token: SecretStr | None = Field(
        default=None, description="Azure: an Entra ID bearer token (instead of api_key)."
    )
    azure_ad_token_env: str | None = Field(
        default=None, description="Azure: read the Entra ID token from this variable."
    )
    azure_ad_token_file: Path | None = Field(
        default=None, description="Azure: read the Entra ID token from this file."
    )
    azure_ad_token_command: list[str] | None = Field(
        default=None,
        description=(
            "Azure: run this command for the Entra ID token, e.g. [az, account, "
            "get-access-token, --resource, https://cognitiveservices.azure.com, --query, "
            "accessToken, -o, tsv]. Token sources are read again once on a 401."
        ),
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers, e.g. HTTP-Referer and X-Title."
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Merged into every request body, e.g. OpenRouter 'provider' or 'models'.",
    )
    template: str | None = Field(default=None, description="Inline Jinja2 prompt template.")
    template_file: Path | None = None
    system_prompt: str | None = None
    lookup: dict[str, Any] | None = Field(
        default=None, description="Inline lookup table, available as 'lookup' in the template."
    )
    lookup_file: Path | None = Field(default=None, description="YAML or JSON lookup table.")
    response_field: str = "llm_response"
    response_format: Literal["text", "json_object", "json_schema"] = Field(
        default="text",
        description="json_object / json_schema: the answer is parsed (and validated) into rf.",
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description=(
            "The JSON Schema for response_format json_schema; answers are checked against its "
            "type, required, properties, additionalProperties, items and enum keywords."
        ),
    )
    json_schema_name: str = "response"
    json_schema_strict: bool = True
    temperature: float | None = Field(
        default=0.0,
        ge=0.0,
        le=2.0,
        description=(
            "null: not sent. Left unset, it is not sent to reasoning models (OpenAI o-series and "
            "gpt-5 names), which reject any but their default."
        ),
    )
    max_tokens: int | None = Field(
        default=256, ge=1, description="The answer's token budget, sent as token_parameter."
    )
    token_parameter: Literal["auto", "max_tokens", "max_completion_tokens"] = Field(
        default="auto",
        description=(
            "The request field max_tokens is sent as. auto: max_completion_tokens for reasoning "
            "models (OpenAI o-series and gpt-5 names, which reject max_tokens), max_tokens "
            "otherwise (what vLLM, llama.cpp, Ollama and older models read)."
        ),
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        default=None, description="Sent as reasoning_effort when set (reasoning models only)."
    )
    request_timeout_s: float = Field(default=60.0, gt=0.0)
    concurrency: ConcurrencySettings = Field(default_factory=ConcurrencySettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    mode: Literal["live", "batch", "auto"] = Field(
        default="live",
        description=(
            "live: one request per row. batch: each window becomes one provider batch job "
            "(OpenAI, Azure), answered within the provider's 24 h window at its batch price. "
            "auto: batch while more than batch.auto_backlog_rows rows wait behind a window, "
            "live otherwise."
        ),
    )
    batch: BatchSettings = Field(default_factory=BatchSettings)
    pricing: PricingSettings = Field(default_factory=PricingSettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    audit_topic: str | None = Field(
        default=None,
        description=(
            "A topic for the audit trail: one record per LLM attempt (failed ones too) with "
            "request hash, source position, window id, attempt, model, status, latency, usage, "
            "cost and error reason; flushed before the offsets that depend on it are committed."
        ),
    )
    validate_answers: ValidateSettings | None = Field(
        default=None,
        alias="validate",
        description="Answer validation (allowed values, a pattern, a JSON schema); off when unset.",
    )
    fallbacks: list[FallbackSettings] = Field(
        default_factory=list,
        description=(
            "Models tried in order when the one before is over quota, has been failing "
            "systemically for fallback_after_s, or rejects a row as too long for its context."
        ),
    )
    fallback_after_s: float = Field(
        default=60.0,
        ge=0.0,
        description=(
            "A model failing for everyone (outage, auth, wrong name) this long sends rows to "
            "the next model; until then its windows are held back as without fallbacks."
        ),
    )
    fallback_probe_s: float = Field(
        default=30.0,
        gt=0.0,
        description="While rows go past a failing model, one row every this often tries it.",
    )

    @field_validator("response_field")
    @classmethod
    def _check_field_name(cls, value: str) -> str:
        if not _FIELD_NAME.match(value):
            raise ValueError("must be an identifier (letters, digits, underscore)")
        return value

    @model_validator(mode="after")
    def _check_provider(self) -> LLMSettings:
        if (self.template is None) == (self.template_file is None):
            raise ValueError("set exactly one of 'template' and 'template_file'")
        if self.lookup is not None and self.lookup_file is not None:
            raise ValueError("set at most one of 'lookup' and 'lookup_file'")
        if self.mode != "live" and self.provider == "openrouter":
            raise ValueError(
                "modes batch and auto support providers openai and azure (OpenRouter's batch "
                "API takes inline requests, not files, and is not supported yet)"
            )
        if self.provider == "azure":
            if self.base_url is None:
                raise ValueError("provider azure needs base_url (https://NAME.openai.azure.com)")
            if self.azure_api_style == "deployments" and self.deployment is None:
                raise ValueError("provider azure needs 'deployment'")
            if self.azure_api_style == "v1" and self.model is None and self.deployment is None:
                raise ValueError("azure v1 needs 'model' (the deployment name)")
        elif self.model is None:
            raise ValueError(f"provider {self.provider} needs 'model'")
        if (self.response_format == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format json_schema and json_schema go together")
        token_sources = [
            self.azure_ad_token,
            self.azure_ad_token_env,
            self.azure_ad_token_file,
            self.azure_ad_token_command,
        ]
        sources = sum(source is not None for source in token_sources)
        if sources and self.provider != "azure":
            raise ValueError("azure_ad_token* settings are for provider azure only")
        if sources > 1 or (sources and self.api_key is not None):
            raise ValueError("set one of api_key and the azure_ad_token* settings")
        self._check_pricing()
        return self

    @model_validator(mode="after")
    def _check_validate(self) -> LLMSettings:
        rules = self.validate_answers
        text_rules = rules is not None and (rules.allowed is not None or rules.pattern is not None)
        if text_rules and self.response_format != "text":
            raise ValueError(
                "validate.allowed and validate.pattern check text answers; with response_format"
                f" {self.response_format} use validate.json_schema"
            )
        return self

    @model_validator(mode="after")
    def _check_fallbacks(self) -> LLMSettings:
        for index, _ in enumerate(self.fallbacks):
            try:
                self.fallback_settings(index)
            except ValidationError as error:
                problems = "; ".join(
                    (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "")
                    + e["msg"].removeprefix("Value error, ")
                    for e in error.errors()
                )
                raise ValueError(f"fallbacks.{index}: {problems}") from None
        return self

    def fallback_settings(self, index: int) -> LLMSettings:
        """The whole settings of fallback `index`: the primary's, with the fallback's changes."""
        fallback = self.fallbacks[index]
        changes = fallback.model_dump(exclude_unset=True, by_alias=True)
        base = self.model_dump(exclude_unset=True, by_alias=True)
        for key in ("fallbacks", "validate", "pricing", "budget"):
            base.pop(key, None)
        if "provider" in changes or "base_url" in changes:
            base = {k: v for k, v in base.items() if k not in _CONNECTION_FIELDS}
        return LLMSettings.model_validate({**base, **changes})

    def _check_pricing(self) -> None:
        """Prices for models not in use are typos; a budget cannot admit without prices."""
        in_use = self.model_name
        # the fallback chain's models are in use too (issue 12)
        names = [in_use, *(f.model or f.deployment or in_use for f in self.fallbacks)]
        for name in self.pricing.models:
            if not any(used.startswith(name) for used in names):
                raise ValueError(
                    f"llm.pricing.models.{name}: unknown model (the model in use is {in_use!r})"
                )
        if not self.budget.enabled:
            return
        for used in dict.fromkeys(names):
            if not any(used.startswith(n) for n in self.pricing.models):
                raise ValueError(
                    f"llm.budget needs llm.pricing.models.{used}: a budget admits requests by "
                    "their estimated cost, which needs the prices of every model it may call"
                )

    @property
    def model_name(self) -> str:
        """The name recorded in outputs: the model, or the Azure deployment."""
        return self.model or self.deployment or ""

    @property
    def is_reasoning_model(self) -> bool:
        """An OpenAI reasoning model by its name (with or without an OpenRouter prefix)."""
        return _REASONING_MODEL.search(self.model_name) is not None

    @property
    def token_parameter_name(self) -> str:
        if self.token_parameter != "auto":
            return self.token_parameter
        return "max_completion_tokens" if self.is_reasoning_model else "max_tokens"

    @property
    def sends_temperature(self) -> bool:
        """Sent when set; the default is left out for reasoning models, which reject it."""
        if self.temperature is None:
            return False
        return "temperature" in self.model_fields_set or not self.is_reasoning_model


class DeliverySettings(_Model):
    """Delivery guarantees and shutdown behaviour."""

    mode: Literal["at_least_once", "exactly_once"] = Field(
        default="at_least_once",
        description=(
            "exactly_once: outputs, dead letters and input offsets are written in one Kafka "
            "transaction per input partition; readers must use isolation.level=read_committed."
        ),
    )
    transactional_id_prefix: str | None = Field(
        default=None,
        description="exactly_once: prefix of the per-partition transactional ids; defaults to "
        "the group id. Stable across restarts, so a new owner fences a zombie.",
    )
    shutdown_grace_s: float = Field(
        default=30.0, gt=0.0, description="Time to finish the open window on SIGTERM."
    )
    output_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    dead_letter_fallback: Literal["stub", "stop"] = Field(
        default="stub",
        description=(
            "When the dead-letter topic refuses a dead letter (too large for it): stub writes a "
            "small one instead, with the first KB of the value, the source coordinates and the "
            "reason; stop ends the consumer with an error, the record uncommitted."
        ),
    )


class LoggingSettings(_Model):
    """`run --log-level` and `--log-format` override `level` and `format`."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="auto: text on a terminal, JSON otherwise. JSON timestamps are UTC with "
        "milliseconds (2026-12-01T07:26:32.123Z).",
    )
    library_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="WARNING",
        description="The least level logged by the libraries (aiokafka, aiohttp), never below "
        "`level`; their ERROR lines (retried connection attempts) are shown as WARNING.",
    )
    library_repeat_s: float = Field(
        default=60.0,
        ge=0.0,
        description="A library message repeated within this many seconds is dropped; the next "
        "one shown counts them in `repeats_hidden`. 0 shows every one.",
    )


class ObservabilitySettings(_Model):
    """The HTTP endpoints for operators: /metrics (Prometheus), /healthz and /readyz."""

    host: str = Field(
        default="0.0.0.0",
        description="Address the metrics and health server listens on; the environment "
        "variable LLM_CONSUMER_METRICS_HOST overrides it.",
    )
    port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="0 turns the metrics and health server off; the environment variable "
        "LLM_CONSUMER_METRICS_PORT overrides it.",
    )
    stale_after_s: float = Field(
        default=60.0,
        gt=0.0,
        description="/healthz fails when the poll loop made no progress for this long; keep it "
        "above half of kafka.rebalance_timeout_ms (the revoke budget).",
    )
    lag_interval_s: float = Field(
        default=10.0, gt=0.0, description="How often consumer lag per partition is measured."
    )
    broker_probe_interval_s: float = Field(
        default=1.0,
        gt=0.0,
        description="How often a metadata request checks that the broker answers; /readyz "
        "reports the broker unreachable after about 3 s without an answer.",
    )
    stuck_partition_after_s: float = Field(
        default=120.0,
        gt=0.0,
        description="/readyz reports a partition stuck when it has lag and its committed offset "
        "did not move for this long (found within lag_interval_s more).",
    )


class StateSettings(_Model):
    """State kept in compacted topics (cache, spend, batch jobs), read into local files."""

    directory: Path = Field(
        default=Path(".llm-consumer-state"),
        description="Where each state table keeps its local SQLite file (one per topic). On a "
        "volume that outlives the container, a restart reads only what is new in the topics; "
        "otherwise it reads them whole. One process per directory (a lock file says so).",
    )
    partitions: int = Field(
        default=3,
        ge=1,
        le=1_000,
        description="Partitions of a state topic when this process creates it. Every replica "
        "reads every partition, so more do not spread the reading; they spread the topic's "
        "leaders and log cleaning over brokers. Do not add partitions later: a key's partition "
        "comes from its hash, so its old and new values would sit in different partitions.",
    )
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        description="Replicas of a state topic when this process creates it; null: the "
        "broker's default.replication.factor.",
    )


class TopicSettings(_Model):
    """What `run` checks before it subscribes. The input topic is never created: a missing one
    is waited for (a consumer started before its topic picks it up within seconds)."""

    create_missing: bool = Field(
        default=False,
        description="Create a missing output or dead-letter topic at start, with the settings "
        "below. Off: a missing one is reported, and the broker's auto.create.topics.enable "
        "decides what the first write to it does.",
    )
    partitions: int | None = Field(
        default=None, ge=1, description="Partitions of a topic created here; null: the input's."
    )
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        description="Replicas of a topic created here; null: the broker's "
        "default.replication.factor.",
    )
    configs: dict[str, str | int | float] = Field(
        default_factory=dict,
        description="Topic configs of a topic created here, e.g. retention.ms: 604800000.",
    )
    input_wait_s: float | None = Field(
        default=None,
        gt=0.0,
        description="How long start-up waits for a missing input topic before it exits 1; "
        "null: for ever (logged every minute; the process is live but not ready).",
    )


class Settings(_Model):
    """The whole configuration of one consumer process."""

    kafka: KafkaSettings
    window: WindowSettings = Field(default_factory=WindowSettings)
    llm: LLMSettings
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    state: StateSettings = Field(default_factory=StateSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)


def interpolate_env(
    value: Any, environ: dict[str, str], path: str = "", *, source: str | None = None
) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree.

    `source` (the settings file) leads the error, so a person knows which file to open.
    """
    if isinstance(value, dict):
        return {
            k: interpolate_env(v, environ, f"{path}.{k}" if path else str(k), source=source)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            interpolate_env(v, environ, f"{path}[{i}]", source=source) for i, v in enumerate(value)
        ]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        where = f"{source}: {path}" if source else path
        raise ConfigError(
            f"{where}: environment variable {name} is not set (used as ${{{name}}}); "
            f"export it, or give a default in the file: ${{{name}:-value}}"
        )

    return _ENV_PATTERN.sub(substitute, value)


def _keys_at(loc: tuple[int | str, ...]) -> list[str] | None:
    """The keys the settings allow at `loc` (a path of section names), None below the models."""
    model: type[BaseModel] = Settings
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        nested = [
            kind
            for kind in (field.annotation, *get_args(field.annotation))
            if isinstance(kind, type) and issubclass(kind, BaseModel)
        ]
        if not nested:
            return None
        model = nested[0]
    return list(model.model_fields)


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """'unknown key', with the close key a typo most likely meant, or the keys allowed."""
    keys = _keys_at(loc[:-1])
    if not keys:
        return "unknown key"
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean `{close[0]}`?"
    return f"unknown key; the keys here are {', '.join(keys)}"


def _format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: {error.error_count()} problem(s) in the settings:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: {_unknown_key(item['loc'])}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        shown = "" if isinstance(got, dict) or item["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {where}: {message}{shown}")
    return "\n".join(lines)


def _resolve_relative(settings: dict[str, Any], base: Path) -> None:
    """Template and lookup files are relative to the settings file, not the working directory."""
    llm = settings.get("llm")
    if not isinstance(llm, dict):
        return
    for key in ("template_file", "lookup_file", "azure_ad_token_file"):
        if isinstance(llm.get(key), str) and not Path(llm[key]).is_absolute():
            llm[key] = str(base / llm[key])


def _validate(data: dict[str, Any], source: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error)) from None


def _interpolated_mapping(data: Any, source: str, environ: dict[str, str] | None) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    resolved: dict[str, Any] = interpolate_env(
        data, dict(os.environ) if environ is None else environ, source=source
    )
    return resolved


def parse_settings(
    data: Any, source: str = "settings", environ: dict[str, str] | None = None
) -> Settings:
    """Interpolate `${ENV}` in an already parsed YAML tree and validate it."""
    return _validate(_interpolated_mapping(data, source, environ), source)


def load_settings(path: Path, environ: dict[str, str] | None = None) -> Settings:
    """Read, interpolate and validate a settings file.

    Interpolation comes before relative paths are resolved, so `${DIR}/prompt.j2` with an
    absolute DIR stays absolute. LLM_CONSUMER_METRICS_HOST and LLM_CONSUMER_METRICS_PORT
    override `observability.host` and `.port`, so a second instance (a demo beside a real one,
    two members on one host) can move its port without a second settings file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the settings file: {error.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    data = _interpolated_mapping(raw, str(path), environ)
    _resolve_relative(data, path.parent)
    env = os.environ if environ is None else environ
    for variable, key in (
        ("LLM_CONSUMER_METRICS_HOST", "host"),
        ("LLM_CONSUMER_METRICS_PORT", "port"),
    ):
        if variable not in env:
            continue
        value = env[variable]
        if key == "port" and not (value.isdigit() and int(value) <= 65535):
            raise ConfigError(
                f"{variable}: expected a port number 0-65535 (0 turns the metrics server off), "
                f"got {value!r}"
            )
        if data.get("observability") is None:
            data["observability"] = {}
        if isinstance(data["observability"], dict):
            data["observability"][key] = value
    return _validate(data, str(path))


def settings_json_schema() -> dict[str, Any]:
    """The JSON Schema of the settings file, exported into `schemas/`."""
    schema = Settings.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llm-consumer settings"
    return schema
