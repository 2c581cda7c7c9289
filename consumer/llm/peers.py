"""The replicas of a group tell each other their limits, so they share one provider fairly.

Each replica's limiter sees only its own 429s, and against one shared capacity that is not
enough to share it: whoever first finds capacity freed keeps it (consumer/llm/limiter.py).
So every replica writes its limit, how often the provider made it cut, whether traffic
fills it, and whether the provider answered it lately (so a replica held at the floor by the
others knows its 429s are contention, not an outage: consumer/llm/caller.py), under its own
key of a state table (a compacted topic every replica reads, kept in memory: a limit is worth
nothing after its process), every `_TELL_EVERY_S`; and reads the others' at the same pace, for
its limiter (`peers_told`: their limits, and whether one cut since). Keys start with a hash of
the endpoint and model, so replicas that call different models do not count each other. An
entry older than `_FRESH_S` (a replica that died or stalled) or of a replica whose traffic
does not fill its limit (it needs no more) is left out. A replica that stops deletes its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import orjson
from aiokafka.errors import KafkaError

from consumer.llm.caller import ANSWERING_WITHIN_S
from consumer.state import StateTopicError, StateUnavailable

log = logging.getLogger(__name__)

_TELL_EVERY_S = 0.5
# Entries of replicas not heard from for longer are left out (a replica that died, or stalled).
_FRESH_S = 3.0


class PeerTable(Protocol):
    """What the peers need of a GlobalTable."""

    topic: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]: ...


class SharedLimiter(Protocol):
    """What the peers need of an AIMDLimiter."""

    @property
    def limit(self) -> float: ...

    @property
    def cuts(self) -> int: ...

    def pressed_within(self, seconds: float) -> bool: ...

    def answered_within(self, seconds: float) -> bool: ...

    def peers_told(
        self, limits: list[float], answering: bool = False, cut: bool = False
    ) -> None: ...


class LimiterPeers:
    """This replica's limit, told to the others; theirs, told to its limiter."""

    def __init__(
        self,
        table: PeerTable,
        limiter: SharedLimiter,
        endpoint: str,
        *,
        member: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._table = table
        self._limiter = limiter
        self._prefix = hashlib.sha256(endpoint.encode()).hexdigest()[:16].encode() + b"/"
        self._key = self._prefix + (member or uuid.uuid4().hex).encode()
        self._wall_clock = wall_clock
        self._told_lately = 0
        # Each peer's count of cuts as last read: one that grew is a cut since then.
        self._cuts_seen: dict[bytes, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._started = False

    def tick(self) -> None:
        """Tell this replica's limit; read the others'."""
        now_ms = int(self._wall_clock() * 1000)
        told = {
            "limit": round(self._limiter.limit, 2),
            "pressing": self._limiter.pressed_within(2 * _TELL_EVERY_S),
            "answered": self._limiter.answered_within(ANSWERING_WITHIN_S),
            "cuts": self._limiter.cuts,
            "at_ms": now_ms,
        }
        self._table.put(self._key, orjson.dumps(told))
        peers, told_lately, answering, cut = [], 0, False, False
        cuts_seen: dict[bytes, int] = {}
        for key, value in self._table.scan(self._prefix):
            if key == self._key:
                continue
            try:
                entry = orjson.loads(value)
                limit, pressing = float(entry["limit"]), entry["pressing"] is True
                answered = entry["answered"] is True
                lately = now_ms - int(entry["at_ms"]) <= _FRESH_S * 1000
                cuts = int(entry.get("cuts", 0))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                continue  # not an entry of this version: it says nothing to count on
            told_lately += lately
            answering |= lately and answered
            cuts_seen[key] = cuts
            if lately and pressing:
                peers.append(limit)
                cut |= cuts > self._cuts_seen.get(key, cuts)
        self._cuts_seen = cuts_seen
        if told_lately != self._told_lately:
            # the replicas, not how many press: that changes with every window's tail
            log.info("replicas sharing the provider", extra={"other_replicas": told_lately})
            self._told_lately = told_lately
        self._limiter.peers_told(peers, answering, cut)

    def start(self) -> None:
        """Start the table and the telling in the background: no row waits for it, since
        sharing makes the replicas' shares fair and no row needs it to be answered."""
        self._task = asyncio.create_task(self._tell_forever(), name="limiter-peers")

    async def _tell_forever(self) -> None:
        try:
            await self._table.start()
        except (StateTopicError, StateUnavailable, KafkaError) as error:
            log.warning(
                "cannot share the provider with the other replicas: each runs its own limit",
                extra={"topic": self._table.topic, "error": str(error)},
            )
            return
        self._started = True
        while True:
            self.tick()
            await asyncio.sleep(_TELL_EVERY_S)

    async def stop(self) -> None:
        """Stop telling, delete this replica's entry so the others stop counting it, and
        stop the table."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._started:
            self._table.delete(self._key)
            self._started = False
        await self._table.stop()
