"""Netflix concurrency-limits' Gradient2 and Vegas limits, re-implemented for the simulator.

From the published algorithms (`concurrency-limits-core/.../limit/Gradient2Limit.java` and
`VegasLimit.java`, HEAD 78a74b9, as summarised in /work/shared/reference): each completed
request is a sample (rtt, in flight, dropped) and the limit is updated per sample. They run
under our admission machinery (FIFO queue, retries first) and the same caller, so only the
limit arithmetic differs. Their minimum limits (20) are lowered to 1: our capacities go down to
a few requests. A 429 at capacity is their "drop"; Gradient2 ignores drops, as the original.
"""

from __future__ import annotations

import math
from typing import Protocol

from consumer.llm.limiter import AIMDLimiter, Ticket
from consumer.llm.ratelimit import RateLimits


def _log10(limit: float) -> float:
    """Netflix's Log10RootFunction: log10 of the limit, at least 1."""
    return max(1.0, math.log10(max(1.0, limit)))


class Limit(Protocol):
    def update(self, limit: float, rtt: float, in_flight: int, dropped: bool) -> float: ...


class Gradient2:
    """L <- 0.8 L + 0.2 (L * clamp(1.5 * longRtt / rtt, 0.5, 1) + 4), app-limited guard."""

    def __init__(self, smoothing: float = 0.2, queue: float = 4.0, tolerance: float = 1.5) -> None:
        self.smoothing = smoothing
        self.queue = queue
        self.tolerance = tolerance
        self.long_rtt: float | None = None
        self.samples = 0
        self.window = 600

    def update(self, limit: float, rtt: float, in_flight: int, dropped: bool) -> float:
        if dropped:
            return limit  # Gradient2 ignores drops (issue #176)
        self.samples += 1
        if self.long_rtt is None:
            self.long_rtt = rtt
        else:
            # ExpAvgMeasurement: a plain average over the first 10 samples, then an EWMA
            factor = 1.0 / self.samples if self.samples <= 10 else 2.0 / (self.window + 1)
            self.long_rtt += factor * (rtt - self.long_rtt)
        if self.long_rtt / rtt > 2.0:
            self.long_rtt *= 0.95
        if in_flight < limit / 2:
            return limit
        gradient = max(0.5, min(1.0, self.tolerance * self.long_rtt / rtt))
        new = limit * gradient + self.queue
        return limit * (1 - self.smoothing) + new * self.smoothing


class Vegas:
    """queue = ceil(L (1 - rtt_noload / rtt)); <= log10 L: +6 log10 L; < 3 log10 L: +log10 L;
    > 6 log10 L: -log10 L; a drop: -log10 L. rtt_noload re-probed every ~30 L samples."""

    def __init__(self, smoothing: float = 1.0, probe_multiplier: int = 30) -> None:
        self.smoothing = smoothing
        self.probe_multiplier = probe_multiplier
        self.rtt_noload = 0.0
        self.probes = 0

    def update(self, limit: float, rtt: float, in_flight: int, dropped: bool) -> float:
        self.probes += 1
        if self.probes > self.probe_multiplier * limit:
            self.probes = 0
            self.rtt_noload = rtt
            return limit
        if not dropped and (self.rtt_noload == 0 or rtt < self.rtt_noload):
            self.rtt_noload = rtt
            return limit
        log = _log10(limit)
        if dropped:
            new = limit - log
        elif in_flight * 2 < limit:
            return limit
        else:
            queue = math.ceil(limit * (1 - self.rtt_noload / rtt))
            if queue <= log:
                new = limit + 6 * log
            elif queue < 3 * log:
                new = limit + log
            elif queue > 6 * log:
                new = limit - log
            else:
                return limit
        new = max(1.0, min(1000.0, new))
        return (1 - self.smoothing) * limit + self.smoothing * new


class SampledLimiter(AIMDLimiter):
    """Our admission machinery with a Netflix limit deciding the limit on every sample."""

    def __init__(self, algorithm: Limit, initial: int, maximum: int, **kwargs: object) -> None:
        super().__init__(initial, 1, maximum, probe_step=None, fast_climb=False, **kwargs)  # type: ignore[arg-type]
        self.algorithm = algorithm

    def _apply(self, ticket: Ticket, dropped: bool) -> None:
        rtt = max(1e-6, self._clock() - ticket.admitted_at)
        new = self.algorithm.update(self._limit, rtt, self._in_flight + 1, dropped)
        self._limit = max(1.0, min(float(self._max), new))

    def on_success(
        self, ticket: Ticket, used_tokens: int | None = None, rate_limits: RateLimits | None = None
    ) -> None:
        self._apply(ticket, False)
        self._in_flight -= 1
        self.observe(ticket, rate_limits, self._clock())
        self._wake()

    def on_congestion(self, ticket: Ticket, rate_limits: RateLimits | None = None) -> None:
        self._apply(ticket, True)
        self._decreases += 1
        self._in_flight -= 1
        self._wake()
