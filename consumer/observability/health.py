"""What readiness knows beyond the assignment: do the provider, the broker, each partition work?

Each tracker is fed by whoever sees the events (the LLM caller, the commit step, the broker
probe) and is read by `/readyz` and the metrics at request time, so a reason appears as soon as
its threshold passes instead of at the next probe. All of them take the clock they measure
with, so their thresholds are tested without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from consumer.records import TopicPartition

log = logging.getLogger("consumer.observability")


class ProviderHealth:
    """Whether LLM requests keep failing for reasons that are not the rows' own.

    The caller reports every attempt whose outcome says something about the provider (a
    success, or a 429, 5xx, timeout, auth error...); a row that is itself bad reports nothing.
    One failure is not an outage (the next retry may pass), so `failing()` waits for
    `failing_after_s` of failures without a single success in between.
    """

    def __init__(
        self, failing_after_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failing_after_s = failing_after_s
        self._clock = clock
        self._successes = 0
        self._failing_since: float | None = None
        self._reason = ""

    @property
    def successes(self) -> int:
        """Successes since start: compare before and after a round to see if any passed."""
        return self._successes

    def record_success(self) -> None:
        self._successes += 1
        self._failing_since = None

    def record_failure(self, reason: str) -> None:
        if self._failing_since is None:
            self._failing_since = self._clock()
        self._reason = reason

    def undecided_for_s(self) -> float:
        """How long a failure streak in progress has left before it counts as failing; 0 when
        there is none (the last attempt succeeded) or it already counts."""
        if self._failing_since is None:
            return 0.0
        return max(0.0, self.failing_after_s - (self._clock() - self._failing_since))

    def failing(self) -> str | None:
        """Why the provider counts as failing now (latest failure reason), or None."""
        if self._failing_since is None:
            return None
        elapsed = self._clock() - self._failing_since
        if elapsed < self.failing_after_s:
            return None
        return f"LLM provider failing for {elapsed:.1f} s: {self._reason}"


class BrokerHealth:
    """Whether the broker answers: the probe, produces and commits report here.

    Unreachable means the latest operation failed and none succeeded for `unreachable_after_s`,
    so one failed call among working ones (a produce timeout during a leader move) is not an
    outage, and the first success clears it.
    """

    def __init__(
        self, unreachable_after_s: float = 3.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.unreachable_after_s = unreachable_after_s
        self._clock = clock
        self._last_ok = clock()  # a broker never reached counts from start
        self._error: str | None = None

    def record_ok(self) -> None:
        self._last_ok = self._clock()
        self._error = None

    def record_error(self, what: str, error: str) -> None:
        self._error = f"{what}: {error}"

    def unreachable(self) -> str | None:
        """Why the broker counts as unreachable now (the latest error), or None."""
        if self._error is None:
            return None
        elapsed = self._clock() - self._last_ok
        if elapsed < self.unreachable_after_s:
            return None
        return f"broker unreachable for {elapsed:.1f} s: {self._error}"

    async def probe(self, check: Callable[[], Awaitable[object]], timeout_s: float) -> bool:
        """One broker round trip, bounded: a hung broker is an error, not a hung probe."""
        try:
            await asyncio.wait_for(check(), timeout_s)
        except TimeoutError:
            self.record_error("metadata probe", f"no answer within {timeout_s:g} s")
            return False
        except Exception as error:  # whatever the client raises, the broker did not answer
            self.record_error("metadata probe", str(error) or type(error).__name__)
            return False
        self.record_ok()
        return True

    async def run_probe(
        self,
        check: Callable[[], Awaitable[object]],
        interval_s: float,
        timeout_s: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Probe every `interval_s` until cancelled; one log line when the broker becomes
        unreachable and one when it answers again (the libraries' own lines are rate-limited,
        see `consumer.observability.logs`)."""
        lost_at: float | None = None
        while True:
            await self.probe(check, timeout_s)
            reason = self.unreachable()
            if reason is not None and lost_at is None:
                lost_at = self._last_ok  # the outage began after the last answer
                log.warning("broker connection lost", extra={"reason": reason})
            elif reason is None and lost_at is not None:
                down_s = round(self._clock() - lost_at, 1)
                lost_at = None
                log.info("broker connection back", extra={"down_s": down_s})
            await sleep(interval_s)


class PartitionProgress:
    """Which partitions have lag but made no progress for `stuck_after_s`.

    A partition is waiting from the later of its last advance (a commit moved its offset) and
    the moment it was first seen with lag, so a partition idle at lag 0 for an hour is not
    stuck the moment one message arrives. Lag 0 forgets the partition: nothing to wait for.
    """

    def __init__(
        self, stuck_after_s: float = 120.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stuck_after_s = stuck_after_s
        self._clock = clock
        self._waiting_since: dict[TopicPartition, float] = {}

    def advanced(self, tp: tuple[str, int]) -> None:
        """The partition's committed offset moved (or its transaction committed)."""
        self._waiting_since[TopicPartition(tp[0], tp[1])] = self._clock()

    def reset(self) -> None:
        """Partitions were revoked: what was known about them belongs to their next owner."""
        self._waiting_since.clear()

    def stuck(self, lags: Mapping[tuple[str, int], int]) -> list[TopicPartition]:
        """The partitions of `lags` (lag per partition) stuck now, sorted."""
        now = self._clock()
        stuck = []
        for key, lag in lags.items():
            tp = TopicPartition(key[0], key[1])
            if lag <= 0:
                self._waiting_since.pop(tp, None)
                continue
            since = self._waiting_since.setdefault(tp, now)
            if now - since >= self.stuck_after_s:
                stuck.append(tp)
        return sorted(stuck)


__all__ = ["BrokerHealth", "PartitionProgress", "ProviderHealth"]
