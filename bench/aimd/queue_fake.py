"""The limiter against the fake LLM's queue mode, a real process: does it settle at the slots?

    .venv/bin/python bench/aimd/queue_fake.py [--slots 4] [--seconds 30] [--fixed 4,5,6]

The fake serves `--slots` requests at once and queues the rest FIFO (`overload: queue`, never a
429); each request takes `--latency-ms` plus `--per-served-ms` per request being served (CPU
batching). The production caller, limiter and client run with their defaults (the queue probe
is on until a provider sends rate-limit headers), then with fixed limits for reference; each
keeps `--outstanding` rows open. Reported: rows/s, the limit over the second half, and the p50
of the attempts' round trips.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from consumer.config import LLMSettings, RetrySettings  # noqa: E402
from consumer.llm.caller import LLMCaller  # noqa: E402
from consumer.llm.client import ChatClient  # noqa: E402
from consumer.llm.limiter import AIMDLimiter  # noqa: E402
from tests.support.fake_llm_process import fake_llm_process  # noqa: E402


async def run(url: str, fixed: int | None, args: argparse.Namespace) -> dict[str, float]:
    settings = LLMSettings.model_validate(
        {
            "provider": "openai",
            "base_url": f"{url}/v1",
            "model": "bench",
            "api_key": "bench",
            "template": "{{ row.text }}",
            "max_tokens": 16,
            "concurrency": {"initial": 16, "min": 1, "max": 64},
        }
    )
    client = ChatClient(settings)
    if fixed is None:
        limiter = AIMDLimiter.from_settings(settings.concurrency)
    else:
        limiter = AIMDLimiter(fixed, fixed, fixed, latency_signal=False)
    attempts: list[float] = []
    caller = LLMCaller(
        client, limiter, RetrySettings(), on_attempt=lambda _s, secs, _a: attempts.append(secs)
    )
    messages = [{"role": "user", "content": "a great product"}]
    start = time.monotonic()
    stop = start + args.seconds
    done = [0]
    limits: list[float] = []

    async def row() -> None:
        while time.monotonic() < stop:
            result = await caller.call(messages)
            if result.completion is not None and time.monotonic() < stop:
                done[0] += 1

    async def sample() -> None:
        while time.monotonic() < stop:
            if time.monotonic() > start + args.seconds / 2:
                limits.append(limiter.limit)
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(row()) for _ in range(args.outstanding)]
    await sample()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()
    half = attempts[len(attempts) // 2 :]
    return {
        "rows_per_s": done[0] / args.seconds,
        "limit": statistics.mean(limits) if limits else float("nan"),
        "p50_attempt_s": statistics.median(half) if half else float("nan"),
    }


async def main_async(args: argparse.Namespace) -> None:
    server = ["--capacity", str(args.slots), "--overload", "queue"]
    server += ["--latency-ms", str(args.latency_ms), "--jitter-ms", "0"]
    server += ["--latency-per-inflight-ms", str(args.per_served_ms)]
    print("| limiter | rows/s | mean limit, 2nd half | p50 attempt (s) |")
    print("|---|---|---|---|")
    with fake_llm_process(*server) as llm:
        for fixed in [None, *(int(n) for n in args.fixed.split(",") if n)]:
            llm.reset()
            result = await run(llm.base_url, fixed, args)
            name = "ours (defaults)" if fixed is None else f"fixed {fixed}"
            print(
                f"| {name} | {result['rows_per_s']:.1f} | {result['limit']:.1f} | "
                f"{result['p50_attempt_s']:.3f} |",
                flush=True,
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--per-served-ms", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--outstanding", type=int, default=100)
    parser.add_argument("--fixed", default="4,5,6,8")
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
