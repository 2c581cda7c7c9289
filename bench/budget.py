"""The spend budget (issue 15): how far past its budget the group goes, per period.

Each scenario publishes distinct rows, runs N consumer processes (own state directories) in
one group against one fake LLM process with the given latency, and a budget per short period
(`llm.budget.hour_s`), until every row is out. The spend per period is then read from the
spend topic (every replica's key of the period, summed): the overshoot is the largest
`spend - budget` over the periods, as USD and as a share of the budget and of one window's
worth. Rows cost about 0.0015 USD each (13 prompt + 2 answer tokens at 100 USD per million),
and are admitted at prompt + max_tokens.

Run:  KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19092 .venv/bin/python bench/budget.py
          [--rows 1200] [--budget 0.15] [--period 5] [--latency-ms 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.fake_llm_process import fake_llm_process  # noqa: E402
from tests.support.pipeline import (  # noqa: E402
    ConsumerProcess,
    Topics,
    create_topics,
    publish,
    read_topic,
    rows_to_messages,
    settings_file,
    spend_per_period,
    wait_for_commits,
)

PRICES = {"fake-model": {"input_per_million": 100.0, "output_per_million": 100.0}}


@dataclass(frozen=True)
class Result:
    name: str
    replicas: int
    max_tokens: int
    rows: int
    periods: int
    spend: list[float]
    overshoot: float
    window_cost: float
    error_rows: int
    seconds: float


async def scenario(
    name: str, bootstrap: str, args: argparse.Namespace, replicas: int, max_tokens: int
) -> Result:
    directory = Path(tempfile.mkdtemp(prefix="budget-bench-"))
    topics = Topics.unique("budget-bench")
    await create_topics(bootstrap, [topics.input, topics.output, topics.dlq], partitions=6)
    rows = [{"id": i, "text": f"review {i:05d}: it works"} for i in range(args.rows)]
    await publish(bootstrap, topics.input, rows_to_messages(rows))
    window = 50
    with fake_llm_process("--latency-ms", str(args.latency_ms)) as llm:
        procs = []
        for index in range(replicas):
            settings = settings_file(
                directory,
                bootstrap,
                llm.base_url,
                topics,
                kafka={"session_timeout_ms": 6_000, "heartbeat_interval_ms": 1_000},
                window={"max_messages": window, "max_wait_ms": 500},
                llm={
                    "max_tokens": max_tokens,
                    "pricing": {"models": PRICES},
                    "budget": {"usd_per_hour": args.budget, "hour_s": args.period},
                    "concurrency": {"initial": 32, "max": 64},
                },
                state={"directory": str(directory / f"state-{index}")},
            )
            procs.append(ConsumerProcess(settings, directory / f"consumer-{index}.log").start())
        started = time.monotonic()
        try:
            outputs = await read_topic(bootstrap, topics.output, expect=args.rows, timeout_s=900)
            seconds = time.monotonic() - started
            await wait_for_commits(bootstrap, topics.group, topics.input, timeout_s=60)
            for proc in procs:
                proc.stop()
        finally:
            for proc in procs:
                proc.kill()
    bodies = [orjson.loads(m.value or b"") for m in outputs]
    errors = sum(1 for b in bodies if b["llm_response_error"] is not None)
    cost = max(b["llm_response_cost_usd"] or 0.0 for b in bodies)
    periods = await spend_per_period(bootstrap, topics.group)
    spend = [periods[key] for key in sorted(periods)]
    # The first and last periods are partial (start, tail): only full ones show the cap.
    return Result(
        name,
        replicas,
        max_tokens,
        len(bodies),
        len(spend),
        spend,
        max(s - args.budget for s in spend),
        window * cost,
        errors,
        seconds,
    )


def table(results: list[Result], budget: float) -> str:
    lines = [
        "| scenario | replicas | max_tokens | rows out | error rows | periods | spend per "
        "period (USD) | overshoot (USD) | overshoot / budget | overshoot / one window | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        spend = ", ".join(f"{s:.4f}" for s in r.spend)
        lines.append(
            f"| {r.name} | {r.replicas} | {r.max_tokens} | {r.rows} | {r.error_rows} | "
            f"{r.periods} | {spend} | {r.overshoot:+.4f} | {r.overshoot / budget:+.1%} | "
            f"{r.overshoot / r.window_cost:+.2f} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--budget", type=float, default=0.15)
    parser.add_argument("--period", type=float, default=5.0)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    results = [
        await scenario("one replica", bootstrap, args, 1, 4),
        await scenario("two replicas", bootstrap, args, 2, 4),
        await scenario("three replicas", bootstrap, args, 3, 4),
        await scenario("one replica, max_tokens 64", bootstrap, args, 1, 64),
    ]
    print(
        f"budget {args.budget} USD per {args.period:g} s period, fake LLM at "
        f"{args.latency_ms:g} ms, {args.rows} rows, windows of 50, concurrency up to 64\n"
    )
    print(table(results, args.budget))


if __name__ == "__main__":
    asyncio.run(main())
