"""Batch mode (issue 16): cost per 1,000 rows and the time of a backlog, live against batch.

One input topic holds a backlog of N rows (100,000 by default, 4 partitions), published once;
each mode reads all of it as its own consumer group into its own output topic, with the
consumer as a process against a fake LLM process:

- live: the fake at `--latency-ms` (50) per request, concurrency up to 64;
- batch: the fake's batch API with `--batch-delay-s` (3) from a job's creation to its end,
  windows of `--batch-window` rows (10,000), `max_pending_batches` 4.

Both price gpt-4o-mini at 0.15 / 0.60 USD per million input / output tokens, so the cost is the
rows' own `rf_cost_usd` summed (batch answers at `batch_factor` 0.5). The time is from the
consumer's start to the last output; memory is the consumer's resident set, sampled every
0.2 s (its peak, which in batch mode is while jobs are in flight), and its VmHWM at the end.

Run:  KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19092 .venv/bin/python bench/batch.py
          [--rows 100000] [--latency-ms 50] [--batch-delay-s 3] [--batch-window 10000]
          [--modes live,batch]
It prints a Markdown table (the figures go in bench/results/issue-16.md by hand).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402

from tests.support.fake_llm_process import fake_llm_process  # noqa: E402
from tests.support.kafka_broker import kafka_broker  # noqa: E402
from tests.support.pipeline import (  # noqa: E402
    ConsumerProcess,
    Topics,
    create_topics,
    publish,
    read_topic,
    rows_to_messages,
    settings_file,
)

PRICES = {"gpt-4o-mini": {"input_per_million": 0.15, "output_per_million": 0.60}}


@dataclass(frozen=True)
class Result:
    mode: str
    rows: int
    seconds: float
    usd: float
    priced: int
    peak_rss_mb: float
    hwm_mb: float
    jobs: int
    requests: int


def _rss_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def run_mode(
    mode: str, bootstrap: str, input_topic: str, rows: int, args: argparse.Namespace, tmp: Path
) -> Result:
    run = f"bench-batch-{mode}-{uuid.uuid4().hex[:6]}"
    topics = Topics(input_topic, f"{run}.out", f"{run}.dlq", f"{run}-group")
    await create_topics(bootstrap, [topics.output, topics.dlq], partitions=4)
    fake_args = ["--latency-ms", str(args.latency_ms), "--batch-delay-s", str(args.batch_delay_s)]
    with fake_llm_process(*fake_args) as llm:
        llm_settings: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "mode": mode,
            "pricing": {"models": PRICES},
            "concurrency": {"initial": 64, "max": 64},
            "batch": {"poll_initial_s": 0.5, "poll_max_s": 2.0, "max_pending_batches": 4},
        }
        window = (
            {"max_messages": args.batch_window, "max_wait_ms": 2000}
            if mode == "batch"
            else {"max_messages": 100, "max_wait_ms": 500}
        )
        settings = settings_file(
            tmp,
            bootstrap,
            llm.base_url,
            topics,
            window=window,
            llm=llm_settings,
            state={"directory": str(tmp / f"state-{mode}")},
            logging={"format": "json", "level": "WARNING"},
        )
        started = time.monotonic()
        proc = ConsumerProcess(settings, tmp / f"{mode}.log").start()
        assert proc.process is not None
        pid = proc.process.pid
        peak = 0
        reading = asyncio.ensure_future(
            read_topic(bootstrap, topics.output, expect=rows, timeout_s=args.timeout_s)
        )
        while not reading.done():
            peak = max(peak, _rss_kb(pid, "VmRSS:"))
            await asyncio.sleep(0.2)
        outputs = reading.result()
        seconds = time.monotonic() - started
        print(f"{mode}: {len(outputs):,} outputs in {seconds:.1f} s", file=sys.stderr)
        hwm = _rss_kb(pid, "VmHWM:")
        proc.stop()
        async with httpx.AsyncClient(timeout=5.0) as http:
            stats = (await http.get(llm.url("/admin/stats"))).json()
            jobs = (await http.get(llm.url("/admin/batches"))).json()
    usd = 0.0
    priced = 0
    for message in outputs:
        body = orjson.loads(message.value or b"{}")
        cost = body.get("llm_response_cost_usd")
        if cost is not None:
            usd += cost
            priced += 1
    return Result(
        mode,
        len(outputs),
        seconds,
        usd,
        priced,
        peak / 1024,
        hwm / 1024,
        int(jobs["jobs"]),
        int(stats["requests"]),
    )


async def main(args: argparse.Namespace) -> None:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with kafka_broker() as broker, tempfile.TemporaryDirectory() as tmpdir:
        bootstrap = broker.bootstrap
        input_topic = f"bench-batch-{uuid.uuid4().hex[:6]}.in"
        await create_topics(bootstrap, [input_topic], partitions=4)
        backlog = [{"id": i, "text": f"review {i}: it does what it says"} for i in range(args.rows)]
        await publish(bootstrap, input_topic, rows_to_messages(backlog))
        results = [
            await run_mode(mode, bootstrap, input_topic, args.rows, args, Path(tmpdir))
            for mode in modes
        ]
    print(
        f"\n{args.rows:,} rows, fake live latency {args.latency_ms:g} ms (concurrency 64), "
        f"batch delay {args.batch_delay_s:g} s, batch windows of {args.batch_window:,}; "
        f"{platform.machine()}, {os.cpu_count()} cores\n"
    )
    print(
        "| mode | rows out | backlog time (s) | rows/s | USD per 1,000 rows | "
        "peak RSS (MB) | VmHWM (MB) | batch jobs | live requests |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        per_1000 = r.usd / r.priced * 1000 if r.priced else float("nan")
        print(
            f"| {r.mode} | {r.rows:,} | {r.seconds:.1f} | {r.rows / r.seconds:,.0f} | "
            f"{per_1000:.6f} | {r.peak_rss_mb:.0f} | {r.hwm_mb:.0f} | {r.jobs} | {r.requests:,} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--batch-delay-s", type=float, default=3.0)
    parser.add_argument("--batch-window", type=int, default=10_000)
    parser.add_argument("--modes", default="live,batch")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    asyncio.run(main(parser.parse_args()))
