"""The limiter's scenarios in virtual time: seconds to run, for tuning and comparing limiters.

    .venv/bin/python bench/aimd/simulate.py                      # capacity, the bench's schedule
    .venv/bin/python bench/aimd/simulate.py --retry-after-s 1,5,30 --schedule 25:30,70:30,10:30
    .venv/bin/python bench/aimd/simulate.py --mode quota --rpm 1200
    .venv/bin/python bench/aimd/simulate.py --mode queue --slots 4
    .venv/bin/python bench/aimd/simulate.py --strategies ours,aimd,gradient2,vegas,oracle

The production `LLMCaller` and `AIMDLimiter` run unchanged on an event loop whose clock jumps
to the next timer instead of waiting for it; the provider is modelled in-process:

- `capacity`: a hidden concurrency capacity schedule, a fixed service time, a fast 429 with a
  fixed Retry-After beyond capacity (a capacity overload: no quota signal), and a client-side
  overhead per attempt (request building and parsing, which the limit counts but the server
  does not), calibrated so that the oracle (a limit that always equals the capacity) gets what
  it gets in `run.py` on this machine, about 0.94 of nominal;
- `quota`: R requests per minute over a sliding 60 s window (as the fake LLM and Azure count),
  OpenAI's x-ratelimit-* headers on every answer, a quota 429 (remaining 0, the wait until it
  fits as Retry-After) beyond it; no budget is configured;
- `queue`: a server with a fixed number of slots that queues the rest (vLLM, llama.cpp), each
  request slowing by `--batch-slowdown` per request being served, as CPU batching does.

Strategies: `ours` (the limiter with its defaults), `aimd` (plain AIMD: +1 per round trip,
x0.8 per event), `gradient2` and `vegas` (Netflix's, bench/aimd/netflix.py), `fixed-N` (a
pinned limit), `oracle` (the capacity; in queue mode a fixed limit at the slot count; in quota
mode the RPM configured as a budget). This is a model, not a measurement: `run.py` against
the real fake server process is the benchmark of record for capacity. The simulation is
deterministic (seeded).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import selectors
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.aimd.netflix import Gradient2, SampledLimiter, Vegas  # noqa: E402
from consumer.config import ConcurrencySettings, RetrySettings  # noqa: E402
from consumer.fake_llm.config import parse_capacity_schedule  # noqa: E402
from consumer.llm.budgets import RetryBudget  # noqa: E402
from consumer.llm.caller import LLMCaller  # noqa: E402
from consumer.llm.client import Completion, Usage  # noqa: E402
from consumer.llm.errors import FailureKind, LLMFailure  # noqa: E402
from consumer.llm.limiter import AIMDLimiter  # noqa: E402
from consumer.llm.ratelimit import Quota, RateLimits  # noqa: E402

SCHEDULE = [(40, 20.0), (15, 20.0), (60, 20.0)]
STRATEGIES = ("ours", "aimd", "gradient2", "vegas", "oracle")
QUOTA_WINDOW_S = 60.0
# Replicas tell each other their limits this often (as consumer/llm/peers.py does).
TELL_EVERY_S = 0.5


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


def capacity_at(t: float, schedule: list[tuple[int, float]]) -> int:
    for cap, secs in schedule:
        if t < secs:
            return cap
        t -= secs
    return schedule[-1][0]


@dataclass
class Provider:
    """The modelled server: capacity with 429s, a request quota with headers, or a queue."""

    loop: VirtualTimeLoop
    args: argparse.Namespace
    schedule: list[tuple[int, float]]
    rng: random.Random
    in_flight: int = 0
    requests: int = 0
    rejected: int = 0
    admitted: deque[float] = field(default_factory=deque)
    # Server-side round trips of the answered requests (queue wait included).
    served: list[float] = field(default_factory=list)
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)

    def capacity(self) -> int:
        return capacity_at(self.loop.time(), self.schedule)

    def _headers(self, now: float) -> RateLimits:
        rpm = self.args.rpm
        reset = self.admitted[0] + QUOTA_WINDOW_S - now if self.admitted else 0.0
        return RateLimits(Quota(rpm, max(0, rpm - len(self.admitted)), max(0.0, reset)))

    def _quota(self) -> RateLimits | None:
        """Charge the sliding window or raise its 429 (remaining 0, wait until it fits)."""
        now = self.loop.time()
        while self.admitted and self.admitted[0] <= now - QUOTA_WINDOW_S:
            self.admitted.popleft()
        if len(self.admitted) >= self.args.rpm:
            self.rejected += 1
            wait = self.admitted[len(self.admitted) - self.args.rpm] + QUOTA_WINDOW_S - now
            failure = LLMFailure(FailureKind.BACKPRESSURE, "rate_limited", "RPM", 429, wait)
            failure.rate_limits = self._headers(now)
            failure.quota = True
            raise failure
        self.admitted.append(now)
        return self._headers(now)

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        args = self.args
        await asyncio.sleep(args.up_ms / 1000)
        self.requests += 1
        limits = None
        if args.mode == "quota":
            try:
                limits = self._quota()
            except LLMFailure:
                await asyncio.sleep(args.down_ms / 1000)
                raise
        elif args.mode == "capacity" and self.in_flight >= self.capacity():
            self.rejected += 1
            await asyncio.sleep(args.down_ms / 1000)
            raise LLMFailure(FailureKind.BACKPRESSURE, "rate_limited", "429", 429, args.hint)
        arrived = self.loop.time()
        if args.mode == "queue" and self.in_flight >= args.slots:
            slot = self.loop.create_future()
            self.waiting.append(slot)
            await slot  # handed over already counted in in_flight
        else:
            self.in_flight += 1
        try:
            spread = 1.0 + args.service_jitter * (2.0 * self.rng.random() - 1.0)
            slowdown = 1.0 + args.batch_slowdown * self.in_flight if args.mode == "queue" else 1.0
            await asyncio.sleep(args.latency_ms / 1000 * spread * slowdown)
        finally:
            if self.waiting:
                self.waiting.popleft().set_result(None)
            else:
                self.in_flight -= 1
        self.served.append(self.loop.time() - arrived)
        await asyncio.sleep(args.down_ms / 1000)
        return Completion("ok", "sim", Usage(10, 2, 12), "stop", rate_limits=limits)


@dataclass
class Outcome:
    done_at: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    limits: list[tuple[float, float, int]] = field(default_factory=list)
    requests: int = 0
    rejected: int = 0
    decreases: int = 0
    served: list[float] = field(default_factory=list)
    per_replica: list[int] = field(default_factory=list)
    # (time, replica) of each row answered, for the shares within each capacity segment.
    answered_by: list[tuple[float, int]] = field(default_factory=list)


def make_limiter(
    args: argparse.Namespace,
    strategy: str,
    loop: VirtualTimeLoop,
    schedule: list[tuple[int, float]],
) -> AIMDLimiter:
    rng = random.Random(args.seed).random
    initial = args.initial
    if strategy == "ours":
        knobs = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
        settings = ConcurrencySettings.model_validate(
            {"initial": initial, "min": 1, "max": args.max, **knobs}
        )
        return AIMDLimiter.from_settings(settings, clock=loop.time, rng=rng)
    if strategy == "aimd":
        return AIMDLimiter(
            initial,
            1,
            args.max,
            clock=loop.time,
            rng=rng,
            probe_step=None,
            fast_climb=False,
            latency_signal=False,
        )
    if strategy.startswith("fixed-"):
        n = int(strategy.removeprefix("fixed-"))
        return AIMDLimiter(n, n, n, clock=loop.time, rng=rng, latency_signal=False)
    if strategy == "gradient2":
        return SampledLimiter(Gradient2(), initial, args.max, clock=loop.time, rng=rng)
    if strategy == "vegas":
        return SampledLimiter(Vegas(), initial, args.max, clock=loop.time, rng=rng)
    if strategy == "oracle" and args.mode == "queue":
        return make_limiter(args, f"fixed-{args.slots}", loop, schedule)
    if strategy == "oracle":
        start = schedule[0][0]
        rpm = args.rpm if args.mode == "quota" else None
        start = min(start, args.max)
        return AIMDLimiter(
            start,
            1,
            args.max,
            clock=loop.time,
            rng=rng,
            probe_step=None,
            fast_climb=False,
            latency_signal=False,
            requests_per_minute=rpm,
        )
    raise ValueError(strategy)


async def scenario(
    args: argparse.Namespace, strategy: str, schedule: list[tuple[int, float]]
) -> Outcome:
    """One strategy against one provider; with `--replicas N`, N limiters (each with its own
    caller, retry budget and `outstanding / N` rows) share it, as replicas share a provider."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop)
    duration = args.duration if args.mode != "capacity" else sum(s for _, s in schedule)
    provider = Provider(loop, args, schedule, random.Random(args.seed + 2))
    retry = RetrySettings(initial_backoff_s=0.05, max_backoff_s=1.0, max_retry_after_s=60.0)
    outcome = Outcome()
    outcome.per_replica = [0] * args.replicas
    messages = [{"role": "user", "content": "a great product"}]
    limiters = []
    tasks = []
    for replica in range(args.replicas):
        replica_args = argparse.Namespace(**{**vars(args), "seed": args.seed + 10 * replica})
        limiter = make_limiter(replica_args, strategy, loop, schedule)
        limiters.append(limiter)
        budget = RetryBudget(
            retry.budget_ratio, retry.budget_min_per_s, retry.budget_window_s, clock=loop.time
        )
        caller = LLMCaller(
            provider,  # type: ignore[arg-type]  # duck-typed: only complete() is used
            limiter,
            retry,
            rng=random.Random(replica_args.seed + 1).random,
            clock=loop.time,
            retry_budget=budget,
        )

        async def row_loop(caller: LLMCaller = caller, replica: int = replica) -> None:
            while loop.time() < duration:
                started = loop.time()
                while True:
                    result = await caller.call(messages)
                    if result.completion is not None or loop.time() >= duration:
                        break
                if loop.time() < duration:
                    outcome.done_at.append(loop.time())
                    outcome.latencies.append(loop.time() - started)
                    outcome.per_replica[replica] += 1
                    outcome.answered_by.append((loop.time(), replica))

        tasks += [asyncio.create_task(row_loop()) for _ in range(args.outstanding // args.replicas)]

    told_at = -math.inf
    cuts = [0] * len(limiters)

    async def follow() -> None:
        nonlocal told_at, cuts
        while loop.time() < duration:
            if args.replicas > 1 and not args.no_share and loop.time() - told_at >= TELL_EVERY_S:
                # as consumer/llm/peers.py tells them (pressing is not modelled: all press)
                told_at = loop.time()
                told = [limiter.limit for limiter in limiters]
                answered = [limiter.answered_within(2.0) for limiter in limiters]
                cut = [limiter.cuts > seen for limiter, seen in zip(limiters, cuts, strict=True)]
                cuts = [limiter.cuts for limiter in limiters]
                for me, limiter in enumerate(limiters):
                    others = [i for i in range(len(limiters)) if i != me]
                    limiter.peers_told(
                        [told[i] for i in others],
                        any(answered[i] for i in others),
                        any(cut[i] for i in others),
                    )
            if strategy == "oracle" and args.mode == "capacity":
                share = float(min(args.max, provider.capacity())) / args.replicas
                for limiter in limiters:
                    limiter._limit = max(1.0, share)  # bench-only oracle
                    limiter._wake()
            states = [limiter.state() for limiter in limiters]
            outcome.limits.append(
                (loop.time(), sum(s.limit for s in states), sum(s.in_flight for s in states))
            )
            await asyncio.sleep(0.01)

    await follow()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    outcome.requests, outcome.rejected = provider.requests, provider.rejected
    outcome.served = provider.served
    outcome.decreases = sum(limiter.state().decreases for limiter in limiters)
    return outcome


def run(args: argparse.Namespace, strategy: str, schedule: list[tuple[int, float]]) -> Outcome:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(scenario(args, strategy, schedule))
    finally:
        loop.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def settle_after_changes(
    outcome: Outcome, schedule: list[tuple[int, float]], band: float = 0.2
) -> list[float | None]:
    """Per segment after the first: seconds until the limit enters +-band of the capacity and
    stays there for the rest of the segment (None: never)."""
    out: list[float | None] = []
    start = schedule[0][1]
    for cap, secs in schedule[1:]:
        end = start + secs
        samples = [(t, limit) for t, limit, _ in outcome.limits if start <= t < end]
        settled: float | None = None
        for t, limit in samples:
            inside = abs(limit - cap) <= band * cap
            if inside and settled is None:
                settled = t - start
            elif not inside:
                settled = None
        out.append(settled)
        start = end
    return out


def jain(values: list[int]) -> float:
    return sum(values) ** 2 / (len(values) * sum(n * n for n in values) or 1)


def segment_jains(
    outcome: Outcome, schedule: list[tuple[int, float]], replicas: int
) -> list[float]:
    """Jain's index of the replicas' rows within each capacity segment after the first: a
    whole-run index hides a replica that took one segment and another that took the next."""
    out, start = [], schedule[0][1]
    for _, secs in schedule[1:]:
        counts = [0] * replicas
        for t, replica in outcome.answered_by:
            counts[replica] += start <= t < start + secs
        out.append(jain(counts))
        start += secs
    return out


def summarise(
    args: argparse.Namespace, strategy: str, outcome: Outcome, schedule: list[tuple[int, float]]
) -> dict[str, Any]:
    latency = args.latency_ms / 1000
    if args.mode == "capacity":
        nominal = sum(cap / latency * secs for cap, secs in schedule)
    elif args.mode == "quota":
        nominal = args.rpm / 60.0 * args.duration
    else:
        best = args.slots / (latency * (1 + args.batch_slowdown * args.slots))
        nominal = best * args.duration
    duration = args.duration if args.mode != "capacity" else sum(s for _, s in schedule)
    limits = [limit for t, limit, _ in outcome.limits if t >= duration / 2]
    return {
        "strategy": strategy,
        "goodput": len(outcome.done_at) / nominal,
        "share_429": outcome.rejected / max(1, outcome.requests),
        "decreases": outcome.decreases,
        "settle": settle_after_changes(outcome, schedule) if args.mode == "capacity" else [],
        "p50": percentile(outcome.latencies, 0.5),
        "p99": percentile(outcome.latencies, 0.99),
        "p50_request": percentile(outcome.served, 0.5),
        "limit_2nd_half": sum(limits) / len(limits) if limits else float("nan"),
        "jain": jain(outcome.per_replica),
        "segment_jain": segment_jains(outcome, schedule, args.replicas)
        if args.mode == "capacity" and len(schedule) > 1
        else [],
    }


def fmt_settle(values: list[float | None]) -> str:
    return " / ".join("never" if v is None else f"{v:.1f}" for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("capacity", "quota", "queue"), default="capacity")
    parser.add_argument("--strategies", default="ours")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument(
        "--retry-after-s", default="0.1", help="comma list of hints (capacity mode); none: no hint"
    )
    parser.add_argument("--up-ms", type=float, default=3.0)
    parser.add_argument("--down-ms", type=float, default=3.5)
    parser.add_argument("--outstanding", type=int, default=150)
    parser.add_argument("--initial", type=int, default=16)
    parser.add_argument("--max", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--service-jitter", type=float, default=0.1)
    parser.add_argument("--schedule", help='"cap:secs,..." instead of the bench\'s (capacity)')
    parser.add_argument("--rpm", type=int, default=1200, help="quota mode: requests a minute")
    parser.add_argument("--slots", type=int, default=4, help="queue mode: the server's slots")
    parser.add_argument("--batch-slowdown", type=float, default=0.05)
    parser.add_argument("--duration", type=float, default=180.0, help="quota and queue modes")
    parser.add_argument("--replicas", type=int, default=1, help="limiters sharing the provider")
    parser.add_argument(
        "--no-share",
        action="store_true",
        help="replicas do not tell each other their limits (share_with_replicas: false)",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="KEY=VALUE of llm.concurrency for `ours`"
    )
    parser.add_argument("--trace", action="store_true", help="print the limit every 0.5 s")
    args = parser.parse_args()
    schedule = parse_capacity_schedule(args.schedule) if args.schedule else list(SCHEDULE)
    hints = [None if h == "none" else float(h) for h in args.retry_after_s.split(",")]
    if args.mode != "capacity":
        hints = hints[:1]
    print(
        f"mode {args.mode}  schedule {','.join(f'{c}:{s:g}' for c, s in schedule)}  "
        f"rpm {args.rpm}  slots {args.slots}  outstanding {args.outstanding}"
    )
    print(
        "| hint (s) | strategy | goodput/nominal | 429 share | decreases | limit settle after "
        "each change (s) | mean limit, 2nd half | p50 row (s) | p99 row (s) | p50 request (s) "
        "| Jain | Jain per segment |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for hint in hints:
        args.hint = hint
        for strategy in args.strategies.split(","):
            outcome = run(args, strategy, schedule)
            s = summarise(args, strategy, outcome, schedule)
            print(
                f"| {hint} | {strategy} | {s['goodput']:.3f} | {s['share_429']:.4f} | "
                f"{s['decreases']} | {fmt_settle(s['settle'])} | {s['limit_2nd_half']:.1f} | "
                f"{s['p50']:.3f} | {s['p99']:.3f} | {s['p50_request']:.3f} | {s['jain']:.3f} | "
                f"{' / '.join(f'{j:.3f}' for j in s['segment_jain'])} |",
                flush=True,
            )
            if args.trace:
                for t, limit, in_flight in outcome.limits[::50]:
                    print(f"    {t:6.1f} limit {limit:6.1f} in flight {in_flight:3d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
