"""Command line of the fake LLM server; also mountable as a sub-command via `add_arguments`."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from consumer.fake_llm.config import FakeLLMConfig, parse_capacity_schedule
from consumer.fake_llm.server import run


def _optional_seconds(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register every knob of FakeLLMConfig as a --flag (dashes for underscores)."""
    defaults = FakeLLMConfig()
    add = parser.add_argument
    add("--host", default=defaults.host)
    add("--port", type=int, default=defaults.port, help="0 picks a free port")
    add("--api-key", default=None, help="require Bearer KEY or api-key: KEY")
    add("--seed", type=int, default=defaults.seed, help="seed of jitter and random failures")
    add("--answer", choices=("sentiment", "echo"), default=defaults.answer)
    add("--latency-ms", type=float, default=defaults.latency_ms)
    add("--jitter-ms", type=float, default=defaults.jitter_ms, help="uniform extra latency")
    add("--latency-per-inflight-ms", type=float, default=defaults.latency_per_inflight_ms)
    add("--capacity", type=int, default=defaults.capacity, help="max concurrent; 0 = unlimited")
    add(
        "--capacity-schedule",
        type=parse_capacity_schedule,
        default=[],
        help='"cap:secs,cap:secs,..." from start, last holds; overrides --capacity',
    )
    add("--overload", choices=("reject", "queue"), default=defaults.overload)
    add(
        "--announce-slots",
        action="store_true",
        help="GET /props answers total_slots = the capacity, as llama.cpp's server does",
    )
    add(
        "--retry-after-s",
        type=_optional_seconds,
        default=defaults.retry_after_s,
        help='Retry-After hint on 429/503; "none" sends no hint',
    )
    add("--rpm", type=int, default=defaults.rpm, help="requests per sliding minute; 0 = off")
    add("--tpm", type=int, default=defaults.tpm, help="tokens per sliding minute; 0 = off")
    add("--rate-429", type=float, default=defaults.rate_429)
    add("--rate-500", type=float, default=defaults.rate_500)
    add("--rate-503", type=float, default=defaults.rate_503)
    add("--wrong-rate", type=float, default=defaults.wrong_rate, help="share of wrong answers")
    add("--truncate-rate", type=float, default=defaults.truncate_rate, help="share cut answers")
    add(
        "--dialect",
        choices=("auto", "openai", "azure", "openrouter", "litellm"),
        default=defaults.dialect,
        help="whose error shapes to speak; auto: by route",
    )
    add(
        "--models",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        help='"a,b": only these model names answer, others get model-not-found',
    )
    add("--quota-exhausted", action="store_true", help="answer every request insufficient_quota")
    add(
        "--batch-delay-s",
        type=float,
        default=defaults.batch_delay_s,
        help="batch API: seconds from a job's creation to its completion",
    )
    add("--batch-expire-next", type=int, default=0, help="batch API: the next N jobs expire")
    add("--batch-fail-next", type=int, default=0, help="batch API: the next N jobs fail")


def config_from_args(args: argparse.Namespace) -> FakeLLMConfig:
    fields = FakeLLMConfig.model_fields
    return FakeLLMConfig.model_validate(
        {name: value for name, value in vars(args).items() if name in fields}
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fake-llm",
        description="OpenAI-compatible fake LLM server for demos, tests, benchmarks",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        parser.error(str(exc))
    run(config)
    return 0
