"""Every knob of the fake LLM server, shared by the CLI and the `/admin/config` route."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Knobs that only make sense at start-up; `/admin/config` refuses to patch them.
STARTUP_ONLY = frozenset({"host", "port"})


def parse_capacity_schedule(text: str) -> list[tuple[int, float]]:
    """Parse "40:20,15:20" into [(40, 20.0), (15, 20.0)] (capacity:seconds segments)."""
    segments: list[tuple[int, float]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        capacity, sep, seconds = part.partition(":")
        if not sep:
            raise ValueError(f"capacity schedule segment {part!r} is not capacity:seconds")
        segments.append((int(capacity), float(seconds)))
    return segments


class Outage(BaseModel):
    """Answer every chat request with `status` for `seconds` (a provider outage)."""

    model_config = ConfigDict(extra="forbid")

    status: int = Field(default=503, ge=400, le=599)
    seconds: float = Field(ge=0)
    # None: use the server-wide `retry_after_s`.
    retry_after_s: float | None = Field(default=None, ge=0)


class FakeLLMConfig(BaseModel):
    """Knobs of the fake server; all but host/port can be patched at runtime."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8089, ge=0, le=65535)
    # When set, requests need `Authorization: Bearer KEY` or `api-key: KEY`.
    api_key: str | None = None
    seed: int = 0
    # "sentiment" classifies the last user message; "echo" repeats it (longer outputs).
    answer: Literal["sentiment", "echo"] = "sentiment"
    latency_ms: float = Field(default=0.0, ge=0)
    jitter_ms: float = Field(default=0.0, ge=0)
    # Added once per request in flight (this one included) at admission: a vLLM-like knee.
    latency_per_inflight_ms: float = Field(default=0.0, ge=0)
    # Hidden concurrency limit; 0 means unlimited.
    capacity: int = Field(default=0, ge=0)
    # (capacity, seconds) segments from server start; the last one holds. Overrides `capacity`.
    capacity_schedule: list[tuple[int, float]] = Field(default_factory=list)
    # What happens beyond capacity: fast 429 ("reject") or FIFO wait ("queue", like vLLM).
    overload: Literal["reject", "queue"] = "reject"
    # Answer GET /props with total_slots (the capacity), as llama.cpp's server announces its
    # --parallel slots; off, /props is a 404 as on vLLM or a hosted API.
    announce_slots: bool = False
    # Retry-After hint on 429/503; None sends no hint at all.
    retry_after_s: float | None = Field(default=0.5, ge=0)
    # Azure-style quota over a sliding 60 s window; 0 means off.
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    # Seeded random failure rates, for benchmarks.
    rate_429: float = Field(default=0.0, ge=0, le=1)
    rate_500: float = Field(default=0.0, ge=0, le=1)
    rate_503: float = Field(default=0.0, ge=0, le=1)
    # Whose error shapes to speak: "auto" picks by route (/openai/... Azure, /api/v1/...
    # OpenRouter, others OpenAI); "litellm" is only reachable this way.
    dialect: Literal["auto", "openai", "azure", "openrouter", "litellm"] = "auto"
    # When set, only these model (or deployment) names answer; others get the dialect's
    # model-not-found error, as a misspelt name would.
    models: list[str] | None = None
    # Billing exhausted: every request gets the dialect's insufficient-quota error.
    quota_exhausted: bool = False
    # The batch API (fake_llm/batch.py): seconds from a job's creation to its end; the next N
    # jobs expire with only a share of their lines answered; the next N fail validation.
    batch_delay_s: float = Field(default=2.0, ge=0)
    batch_expire_next: int = Field(default=0, ge=0)
    batch_expire_answered: float = Field(default=0.5, ge=0, le=1)
    batch_fail_next: int = Field(default=0, ge=0)
    # A sloppy small model (for answer validation): seeded shares of answers that are wrong
    # (a sentence around the label, `[[fake:wrong]]`) or cut by max_tokens (`[[fake:length]]`).
    wrong_rate: float = Field(default=0.0, ge=0, le=1)
    truncate_rate: float = Field(default=0.0, ge=0, le=1)
    # Prefix caching: a prompt whose first N*k tokens (k >= 1) were seen before reports them as
    # usage.prompt_tokens_details.cached_tokens (OpenAI's automatic caching starts at 1024);
    # 0 means off.
    prefix_cache_min_tokens: int = Field(default=0, ge=0)
    # What the OpenRouter path reports as usage.cost (USD) when the request asks for usage
    # accounting (`usage: {include: true}`); cached tokens cost a quarter.
    usd_per_million_prompt: float = Field(default=0.5, ge=0)
    usd_per_million_completion: float = Field(default=1.5, ge=0)

    @field_validator("capacity_schedule", mode="before")
    @classmethod
    def _schedule_from_text(cls, value: Any) -> Any:
        """Accept the CLI's "cap:secs,..." text in JSON too."""
        if isinstance(value, str):
            return parse_capacity_schedule(value)
        return value

    @field_validator("capacity_schedule")
    @classmethod
    def _schedule_sane(cls, value: list[tuple[int, float]]) -> list[tuple[int, float]]:
        if any(capacity < 0 or seconds < 0 for capacity, seconds in value):
            raise ValueError("capacity schedule needs capacity >= 0 and seconds >= 0")
        return value
