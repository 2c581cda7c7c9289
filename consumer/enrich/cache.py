"""The response cache: a request already paid for is answered from here, never paid again.

The key is the request as sent (`request_key`): a sha256 of the canonical JSON of everything
that decides the answer (provider, deployment, and the whole body: model, messages,
temperature, token limit, response format, extra_body), not the key or identifying headers.
Only successful completions are stored, with when they were bought (with answer
validation on, only valid ones: see `consumer/enrich/validate.py`). A lookup comes before the
limiter, so a hit takes no permit, no rate budget and no retry budget; identical requests in
flight at once share one call.

Backends: `MemoryStore` (a bounded LRU in the process) and the Kafka-backed global table of
`consumer/state/` (shared by every replica, surviving crashes); both behind `EntryStore`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from consumer.llm.caller import CallResult
from consumer.llm.client import Completion, Usage

log = logging.getLogger(__name__)


def request_key(provider: str, deployment: str | None, body: dict[str, Any]) -> str:
    """sha256 of the canonical request: the same request always has the same key."""
    canonical = orjson.dumps(
        {"provider": provider, "deployment": deployment, "body": body},
        option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def encode_entry(completion: Completion, bought_at: float) -> bytes:
    usage = completion.usage
    return orjson.dumps(
        {
            "content": completion.content,
            "model": completion.model,
            "usage": usage.as_dict(),
            "finish_reason": completion.finish_reason,
            "bought_at": bought_at,
        }
    )


def decode_entry(raw: bytes) -> Completion | None:
    """The stored completion, or None for an entry this version cannot read (a miss)."""
    try:
        entry = orjson.loads(raw)
        usage = entry["usage"]
        return Completion(
            entry["content"],
            str(entry["model"]),
            Usage(
                int(usage["prompt_tokens"]),
                int(usage["completion_tokens"]),
                int(usage["total_tokens"]),
                usage.get("reasoning_tokens"),
                usage.get("cached_tokens"),
            ),
            entry.get("finish_reason"),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class EntryStore(Protocol):
    """Where entries live: get is local and instant; put never fails the row."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...


class MemoryStore:
    """A bounded LRU: at most `max_entries` entries and about `max_bytes` of values."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> bytes | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._entries[key] = value
        self.bytes += len(value)
        while self._entries and (
            len(self._entries) > self._max_entries or self.bytes > self._max_bytes
        ):
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= len(dropped)


class CacheEvents(Protocol):
    def cache_lookup(self, hit: bool) -> None: ...

    def cache_write(self) -> None: ...


@dataclass(frozen=True)
class Answer:
    """What the enricher gets back: the call's result, and whether the cache answered it."""

    result: CallResult
    hit: bool


class CachedCalls:
    """Answers a request from the store, or makes the call once and stores its success."""

    def __init__(
        self,
        store: EntryStore,
        events: CacheEvents,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._events = events
        self._clock = clock
        self._in_flight: dict[str, asyncio.Future[CallResult]] = {}

    async def answer(
        self,
        key: str,
        call: Callable[[], Awaitable[CallResult]],
        accept: Callable[[Completion], Completion | None] | None = None,
    ) -> Answer:
        """`call()` is awaited only on a miss, and only once for concurrent equal keys.

        `accept` (answer validation) checks a stored answer again: it returns the answer as
        served, or None for one that is not valid under the current rules, which is a miss and
        is replaced by the new call's answer when that one is valid (invalid answers come back
        as failures, so they are never stored).
        """
        raw = self._store.get(key.encode())
        completion = decode_entry(raw) if raw is not None else None
        if completion is not None and accept is not None:
            completion = accept(completion)
        if completion is not None:
            self._events.cache_lookup(hit=True)
            return Answer(CallResult(completion, None, 0), hit=True)
        shared = self._in_flight.get(key)
        if shared is not None:
            result = await _outcome_of(shared)
            if result is not None and result.completion is not None:
                self._events.cache_lookup(hit=True)
                return Answer(result, hit=True)
            # The first call failed or was dropped: this row makes its own attempts.
        self._events.cache_lookup(hit=False)
        future: asyncio.Future[CallResult] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            result = await call()
        except BaseException:
            future.cancel()
            raise
        finally:
            if self._in_flight.get(key) is future:
                del self._in_flight[key]
        future.set_result(result)
        if result.completion is not None:
            # Stored at once, not at the window's end: a window abandoned halfway keeps
            # every answer it paid for.
            self._store.put(key.encode(), encode_entry(result.completion, self._clock()))
            self._events.cache_write()
        return Answer(result, hit=False)


async def _outcome_of(shared: asyncio.Future[CallResult]) -> CallResult | None:
    """The shared call's result; None if it was dropped (its window was terminated)."""
    try:
        return await asyncio.shield(shared)
    except asyncio.CancelledError:
        if shared.cancelled():
            return None
        raise  # this row itself is being cancelled
