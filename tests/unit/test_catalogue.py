"""Every real provider shape in tests/data/provider_errors.yaml, through the real ChatClient."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from consumer.config import LLMSettings
from consumer.llm.client import ChatClient, Completion
from consumer.llm.errors import LLMFailure
from tests.support.http_stub import stub_post

CATALOGUE = Path(__file__).resolve().parents[1] / "data" / "provider_errors.yaml"
CASES: list[dict[str, Any]] = yaml.safe_load(CATALOGUE.read_text(encoding="utf-8"))["cases"]
_NOW_MS = re.compile(r"NOW_MS\+(\d+)")
PROVIDERS = {
    "openai",
    "azure",
    "azure-apim",
    "openrouter",
    "litellm",
    "vllm",
    "llama.cpp",
    "ollama",
}


def _now_ms(text: str) -> str:
    """NOW_MS+N becomes an epoch-milliseconds time N ms from now."""
    return _NOW_MS.sub(lambda m: str(int(time.time() * 1000) + int(m.group(1))), text)


def _reply(case: dict[str, Any]) -> httpx.Response:
    headers = {name: _now_ms(str(value)) for name, value in (case.get("headers") or {}).items()}
    if "sse" in case:
        headers["content-type"] = "text/event-stream"
        content = ("\n\n".join(case["sse"]) + "\n\n").encode()
    elif "raw" in case:
        headers["content-type"] = case.get("content_type", "text/plain")
        content = case["raw"].encode()
    else:
        headers["content-type"] = "application/json"
        content = _now_ms(orjson.dumps(case["body"]).decode()).encode()
    return httpx.Response(case["status"], headers=headers, content=content)


async def _outcome(case: dict[str, Any]) -> Completion | LLMFailure:
    settings = LLMSettings(provider="openai", model="gpt-4o-mini", template="{{ row.t }}")
    client = ChatClient(settings, post=stub_post(lambda _: _reply(case)))
    try:
        return await client.complete([{"role": "user", "content": "hi"}])
    except LLMFailure as failure:
        return failure


def test_the_catalogue_covers_every_provider_with_sources() -> None:
    per_provider = Counter(case["provider"] for case in CASES)
    assert set(per_provider) == PROVIDERS
    assert len(CASES) >= 60
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert all(case.get("source") for case in CASES), "every case says where it was seen"


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
async def test_case(case: dict[str, Any]) -> None:
    expect = case["expect"]
    outcome = await _outcome(case)
    if expect.get("ok"):
        assert isinstance(outcome, Completion), outcome
        if "model" in expect:
            assert outcome.model == expect["model"]
        if "content" in expect:
            assert outcome.content == expect["content"]
        if "usage" in expect:
            assert outcome.usage.as_dict() == expect["usage"]
        return
    assert isinstance(outcome, LLMFailure), f"expected a failure, got {outcome!r}"
    assert (str(outcome.kind), outcome.reason) == (expect["kind"], expect["reason"])
    if case["status"] >= 400:
        assert outcome.status_code == case["status"]
    wanted = expect["retry_after_s"]
    if wanted is None:
        assert outcome.retry_after_s is None
    else:
        assert outcome.retry_after_s == pytest.approx(wanted, abs=expect.get("tolerance_s", 1e-6))
