"""The response cache: the key, the bounded memory store, hits, and one call per request."""

from __future__ import annotations

import asyncio

import pytest

from consumer.enrich.cache import (
    CachedCalls,
    MemoryStore,
    decode_entry,
    encode_entry,
    request_key,
)
from consumer.llm.caller import CallResult
from consumer.llm.client import Completion, Usage
from consumer.llm.errors import FailureKind, LLMFailure

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


class Events:
    def __init__(self) -> None:
        self.hits = self.misses = self.writes = 0

    def cache_lookup(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def cache_write(self) -> None:
        self.writes += 1


def answered(content: str = "POSITIVE") -> CallResult:
    return CallResult(
        Completion(content, "m-2024", Usage(5, 1, 6, reasoning_tokens=2), "stop"), None, 1
    )


def failed() -> CallResult:
    return CallResult(None, LLMFailure(FailureKind.TRANSIENT, "server_error", "boom", 500), 6)


class Calls:
    """A provider that counts its calls and answers when told to."""

    def __init__(self, result: CallResult | None = None) -> None:
        self.count = 0
        self.release = asyncio.Event()
        self.result = result or answered()
        if result is not None:
            self.release.set()

    async def __call__(self) -> CallResult:
        self.count += 1
        await self.release.wait()
        return self.result


def test_the_key_is_the_canonical_request_so_key_order_does_not_matter() -> None:
    shuffled = {"temperature": 0, "messages": BODY["messages"], "model": "m"}
    assert request_key("openai", None, BODY) == request_key("openai", None, shuffled)
    assert len(request_key("openai", None, BODY)) == 64


def test_anything_that_decides_the_answer_changes_the_key() -> None:
    base = request_key("openai", None, BODY)
    assert request_key("openrouter", None, BODY) != base
    assert request_key("azure", "deployment-b", BODY) != request_key("azure", "deployment-a", BODY)
    assert request_key("openai", None, {**BODY, "temperature": 0.7}) != base
    assert request_key("openai", None, {**BODY, "max_tokens": 10}) != base


def test_an_entry_keeps_the_answer_its_model_and_its_usage() -> None:
    completion = answered().completion
    assert completion is not None
    back = decode_entry(encode_entry(completion, 1_700_000_000.0))
    assert back == completion


def test_an_entry_this_version_cannot_read_is_a_miss_not_an_error() -> None:
    assert decode_entry(b"not json") is None
    assert decode_entry(b'{"content": "x"}') is None


def test_the_memory_store_keeps_at_most_its_entries_and_bytes_dropping_the_oldest() -> None:
    store = MemoryStore(max_entries=2, max_bytes=1_000)
    store.put(b"a", b"1")
    store.put(b"b", b"2")
    assert store.get(b"a") == b"1"  # a is now the newest
    store.put(b"c", b"3")
    assert store.get(b"b") is None and store.get(b"a") == b"1" and len(store) == 2
    small = MemoryStore(max_entries=100, max_bytes=10)
    small.put(b"x", b"12345678")
    small.put(b"y", b"12345678")
    assert small.get(b"x") is None and small.bytes == 8


async def test_a_second_equal_request_is_a_hit_and_is_not_paid_again() -> None:
    events = Events()
    cache = CachedCalls(MemoryStore(10, 10_000), events, clock=lambda: 1.0)
    calls = Calls(answered())
    first = await cache.answer("k", calls)
    second = await cache.answer("k", calls)
    assert (first.hit, second.hit) == (False, True)
    assert calls.count == 1
    assert second.result.completion == first.result.completion
    assert second.result.attempts == 0
    assert (events.hits, events.misses, events.writes) == (1, 1, 1)


async def test_equal_requests_in_flight_at_once_share_one_call() -> None:
    cache = CachedCalls(MemoryStore(10, 10_000), Events())
    calls = Calls()
    waiting = [asyncio.ensure_future(cache.answer("k", calls)) for _ in range(5)]
    await asyncio.sleep(0)
    calls.release.set()
    answers = await asyncio.gather(*waiting)
    assert calls.count == 1
    assert [a.hit for a in answers].count(False) == 1


async def test_failures_are_not_stored_and_a_waiter_of_a_failed_call_tries_itself() -> None:
    events = Events()
    cache = CachedCalls(MemoryStore(10, 10_000), events)
    calls = Calls(failed())
    first, second = await asyncio.gather(cache.answer("k", calls), cache.answer("k", calls))
    assert first.result.failure is not None and second.result.failure is not None
    assert calls.count == 2
    assert events.writes == 0
    third = await cache.answer("k", Calls(answered()))
    assert third.hit is False


async def test_a_waiter_of_a_call_whose_row_was_cancelled_makes_its_own_call() -> None:
    cache = CachedCalls(MemoryStore(10, 10_000), Events())
    stuck = Calls()
    owner = asyncio.ensure_future(cache.answer("k", stuck))
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(cache.answer("k", Calls(answered("other"))))
    await asyncio.sleep(0)
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    answer = await waiter
    assert answer.hit is False and answer.result.completion is not None
    assert answer.result.completion.content == "other"
