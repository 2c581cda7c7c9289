"""The AIMD benchmark's scenario in virtual time: seconds to run, for tuning the limiter.

    .venv/bin/python bench/aimd/simulate.py                 # the bench's schedule and defaults
    .venv/bin/python bench/aimd/simulate.py --retry-after-s 0.5 --probe-step 0.05

The production `LLMCaller` and `AIMDLimiter` run unchanged on an event loop whose clock jumps
to the next timer instead of waiting for it; the provider is modelled in-process: a hidden
capacity schedule, a fixed service time, a fast 429 with a fixed Retry-After beyond capacity,
and a client-side overhead per attempt (request building and parsing, which the limit counts
but the server does not). The overhead is calibrated so that the oracle (a limit that always
equals the capacity) gets what it gets in `run.py` on this machine, about 0.94 of nominal.

This is a model, not a measurement: `run.py` against the real fake server process is the
benchmark of record. The simulation is deterministic (seeded), so two limiter variants can be
compared exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import selectors
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from consumer.config import ConcurrencySettings, RetrySettings  # noqa: E402
from consumer.fake_llm.config import parse_capacity_schedule  # noqa: E402
from consumer.llm.budgets import RetryBudget  # noqa: E402
from consumer.llm.caller import LLMCaller  # noqa: E402
from consumer.llm.client import Completion, Usage  # noqa: E402
from consumer.llm.errors import FailureKind, LLMFailure  # noqa: E402
from consumer.llm.limiter import AIMDLimiter  # noqa: E402

SCHEDULE = [(40, 20.0), (15, 20.0), (60, 20.0)]


class _InstantSelector(selectors.SelectSelector):
    """Never waits: a select with a timeout moves the loop's virtual clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        if self.loop is not None and timeout is not None and timeout > 0:
            self.loop.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose time advances only when everything is waiting on a timer."""

    def __init__(self) -> None:
        selector = _InstantSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0

    def time(self) -> float:
        return self.now


@dataclass
class Provider:
    """A concurrency-capped provider with a capacity schedule and a fixed Retry-After."""

    loop: VirtualTimeLoop
    service_s: float
    retry_after_s: float | None
    up_s: float
    down_s: float
    schedule: list[tuple[int, float]]
    rng: random.Random = field(default_factory=random.Random)
    service_jitter: float = 0.0
    in_flight: int = 0
    requests: int = 0
    rejected: int = 0

    def capacity(self) -> int:
        t = self.loop.time()
        for cap, secs in self.schedule:
            if t < secs:
                return cap
            t -= secs
        return self.schedule[-1][0]

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        await asyncio.sleep(self.up_s)
        self.requests += 1
        if self.in_flight >= self.capacity():
            self.rejected += 1
            await asyncio.sleep(self.down_s)
            raise LLMFailure(
                FailureKind.BACKPRESSURE, "rate_limited", "429", 429, self.retry_after_s
            )
        self.in_flight += 1
        try:
            spread = 1.0 + self.service_jitter * (2.0 * self.rng.random() - 1.0)
            await asyncio.sleep(self.service_s * spread)
        finally:
            self.in_flight -= 1
        await asyncio.sleep(self.down_s)
        return Completion("ok", "sim", Usage(10, 2, 12), "stop")


@dataclass
class Outcome:
    done_at: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    limits: list[tuple[float, float, int]] = field(default_factory=list)
    requests: int = 0
    rejected: int = 0
    decreases: int = 0


async def scenario(args: argparse.Namespace, strategy: str) -> Outcome:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop)
    duration = sum(secs for _, secs in SCHEDULE)
    provider = Provider(
        loop,
        args.latency_ms / 1000,
        args.retry_after_s,
        args.up_ms / 1000,
        args.down_ms / 1000,
        SCHEDULE,
        random.Random(args.seed + 2),
        args.service_jitter,
    )
    concurrency = ConcurrencySettings(
        initial=16,
        min=1,
        max=128,
        decrease_factor=args.decrease_factor,
        probe_step=args.probe_step,
        fast_climb=not args.no_fast_climb,
        retry_after_jitter=args.jitter,
    )
    if strategy == "oracle":
        limiter = AIMDLimiter(
            SCHEDULE[0][0], 1, 128, clock=loop.time, probe_step=None, fast_climb=False
        )
    else:
        limiter = AIMDLimiter.from_settings(
            concurrency, clock=loop.time, rng=random.Random(args.seed).random
        )
    retry = RetrySettings(initial_backoff_s=0.05, max_backoff_s=1.0)
    budget = RetryBudget(
        retry.budget_ratio, retry.budget_min_per_s, retry.budget_window_s, clock=loop.time
    )
    caller = LLMCaller(
        provider,  # type: ignore[arg-type]  # duck-typed: only complete() is used
        limiter,
        retry,
        rng=random.Random(args.seed + 1).random,
        clock=loop.time,
        retry_budget=budget,
    )
    outcome = Outcome()
    messages = [{"role": "user", "content": "a great product"}]

    async def row_loop() -> None:
        while loop.time() < duration:
            started = loop.time()
            while True:
                result = await caller.call(messages)
                if result.completion is not None or loop.time() >= duration:
                    break
            if loop.time() < duration:
                outcome.done_at.append(loop.time())
                outcome.latencies.append(loop.time() - started)

    async def follow() -> None:
        while loop.time() < duration:
            if strategy == "oracle":
                limiter._limit = float(provider.capacity())
                limiter._wake()
            state = limiter.state()
            outcome.limits.append((loop.time(), state.limit, state.in_flight))
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(row_loop()) for _ in range(args.outstanding)]
    await follow()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    outcome.requests, outcome.rejected = provider.requests, provider.rejected
    outcome.decreases = limiter.state().decreases
    return outcome


def run(args: argparse.Namespace, strategy: str) -> Outcome:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(scenario(args, strategy))
    finally:
        loop.close()


def segment_rows(outcome: Outcome) -> list[int]:
    counts = []
    start = 0.0
    for _, secs in SCHEDULE:
        counts.append(sum(1 for t in outcome.done_at if start <= t < start + secs))
        start += secs
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--retry-after-s", type=float, default=0.1)
    parser.add_argument("--up-ms", type=float, default=3.0)
    parser.add_argument("--down-ms", type=float, default=3.5)
    parser.add_argument("--outstanding", type=int, default=150)
    parser.add_argument("--decrease-factor", type=float, default=0.8)
    parser.add_argument("--probe-step", type=float, default=ConcurrencySettings().probe_step)
    parser.add_argument("--no-fast-climb", action="store_true")
    parser.add_argument("--jitter", type=float, default=ConcurrencySettings().retry_after_jitter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--service-jitter", type=float, default=0.1, help="service time varies +- this share"
    )
    parser.add_argument("--schedule", help='"cap:secs,..." instead of the bench\'s')
    parser.add_argument("--trace", action="store_true", help="print the limit every 0.1 s")
    args = parser.parse_args()
    if args.schedule:
        SCHEDULE[:] = parse_capacity_schedule(args.schedule)
    latency = args.latency_ms / 1000
    nominal = [cap / latency * secs for cap, secs in SCHEDULE]
    oracle = segment_rows(run(args, "oracle"))
    aimd = run(args, "aimd")
    rows = segment_rows(aimd)
    print(
        f"goodput/nominal {sum(rows) / sum(nominal):.3f}  goodput/oracle "
        f"{sum(rows) / sum(oracle):.3f}  (oracle/nominal {sum(oracle) / sum(nominal):.3f})  "
        f"429 share {aimd.rejected / max(1, aimd.requests):.3f}  decreases {aimd.decreases}"
    )
    for (cap, _), got, best, ideal in zip(SCHEDULE, rows, oracle, nominal, strict=True):
        print(f"  cap {cap:3d}: nominal {got / ideal:.3f}  oracle {got / best:.3f}")
    if args.trace:
        for t, limit, in_flight in aimd.limits[::10]:
            print(f"  {t:6.2f} limit {limit:6.1f} in flight {in_flight:3d}")
    latencies = sorted(aimd.latencies)
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    print(f"  row latency p50 {p(0.5):.3f}s p99 {p(0.99):.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
