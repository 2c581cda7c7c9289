"""The one backoff policy: per-row LLM retries, window hold-backs and broker retries use it.

Exponential with "equal jitter" (half the delay fixed, half random), capped, so retries of many
rows or replicas spread out instead of arriving together; the random source is injected so
tests and simulations are deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    initial_s: float
    max_s: float
    rng: Callable[[], float] = field(default=random.random, compare=False)

    def delay(self, attempt: int) -> float:
        """The wait after the `attempt`-th failure (1-based)."""
        ceiling = min(self.max_s, self.initial_s * 2.0 ** (max(1, attempt) - 1))
        return ceiling * (0.5 + 0.5 * self.rng())
