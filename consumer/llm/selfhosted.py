"""Self-hosted servers that queue instead of refusing, and say how many requests they serve.

llama.cpp's server serves `--parallel` requests at once and queues the rest; it never answers
429, so the only congestion signal is latency. On a CPU-bound server that signal is poor: each
request slows by a large share per request served even without a queue, and the latency is
as noisy as the machine. The server states its slot count, though: `GET /props` answers
`total_slots`. Known slots are a better limit than any latency estimate: the limit is capped
at slots + 1 (one request waits, so no slot idles while the client turns a request around)
and the latency probe stops, since nothing is left to find. vLLM and Ollama announce no slot
count this way; they keep the probe.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import httpx

from consumer.config import LLMSettings
from consumer.llm.client import request_headers
from consumer.llm.limiter import AIMDLimiter

log = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 2.0
# Hosted APIs have no /props: asking them would be a wasted request at every start.
_HOSTED = ("api.openai.com", "openrouter.ai", ".openai.azure.com")


def props_url(base_url: str) -> str:
    """llama.cpp serves /props at its root; the OpenAI-compatible API sits under /v1."""
    root = base_url.rstrip("/")
    return f"{root.removesuffix('/v1')}/props"


def slots_of(props: object) -> int | None:
    """`total_slots` of a /props answer, when it is a positive integer."""
    slots = props.get("total_slots") if isinstance(props, Mapping) else None
    if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0:
        return slots
    return None


async def announced_slots(llm: LLMSettings) -> int | None:
    """The server's slot count, if it announces one (None for anything else: a hosted API, a
    gateway answering 404, a server that is down; the latency probe then decides)."""
    if llm.provider != "openai" or llm.base_url is None:
        return None
    if any(host in llm.base_url for host in _HOSTED):
        return None
    url = props_url(llm.base_url)
    headers = {k: v for k, v in request_headers(llm).items() if k not in ("content-type", "accept")}
    try:
        async with httpx.AsyncClient(timeout=_PROBE_TIMEOUT_S) as client:
            response = await client.get(url, headers=headers)
        if response.status_code != 200:
            return None
        return slots_of(response.json())
    except (httpx.HTTPError, ValueError):
        return None


async def fit_to_server(llm: LLMSettings, limiter: AIMDLimiter) -> int | None:
    """Cap the limiter at the server's slots + 1: `llm.concurrency.server_slots` as
    configured, or, with `auto`, as the server announces them. Returns the slots used."""
    configured = llm.concurrency.server_slots
    if configured is None:
        return None
    slots = configured if isinstance(configured, int) else await announced_slots(llm)
    if slots is None:
        return None
    limiter.fit_slots(slots, keep_latency_signal=llm.concurrency.latency_signal is True)
    log.info(
        "the server serves a fixed number of requests at once: the limit is capped above it",
        extra={
            "server_slots": slots,
            "announced": not isinstance(configured, int),
            "limit_cap": slots + 1,
        },
    )
    return slots
