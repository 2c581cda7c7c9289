"""Many replicas, one provider: N real consumer processes in one group against one fake LLM.

    .venv/bin/python bench/replicas.py [--replicas 3] [--schedule 10:15,24:20,12:20,36:20]
        [--rpm 6000] [--latency-ms 200] [--retry-after-s 1.0] [--window default|M:P] [--no-plot]
        [--no-share]

The fake has a moving concurrency capacity (429 at capacity with a Retry-After hint) and a fixed
request quota announced in OpenAI's x-ratelimit-* headers (a quota 429 beyond it); no budget is
configured in the consumers, which run the consumer's own window and retry settings, as a
user's would (`--window M:P` sets max_messages and max_pending_windows). The schedule starts
once every replica has finished a window (start-up and group joins are not measured), and its
first segment is a warm-up, left out of the figures too. Reported: the total goodput against
the nominal (the capacity / latency integrated over the measured time, at most rpm / 60 per
second of it), each replica's rows and share, Jain's fairness index of the per-replica
goodput, the 429s (capacity and quota), each replica's held-back windows and partition
assignments, the time-averaged limit, requests in flight and requests waiting for a permit of
each replica (its /metrics, read every 0.5 s: a replica with none waiting is held back by its
windows, not its limiter), and the limit traces, with a plot. It starts a local broker
(KAFKA_BOOTSTRAP_SERVERS is honoured).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from consumer.config import WindowSettings  # noqa: E402
from consumer.fake_llm.config import parse_capacity_schedule  # noqa: E402
from consumer.observability.metrics import PREFIX, parse_exposition  # noqa: E402
from tests.support.fake_llm_process import fake_llm_process  # noqa: E402
from tests.support.kafka_broker import free_port, kafka_broker  # noqa: E402
from tests.support.pipeline import (  # noqa: E402
    ConsumerProcess,
    Topics,
    create_topics,
    publish,
    rows_to_messages,
    settings_file,
)

PLOT = ROOT / "bench" / "results" / "issue-13-replicas.png"


def capacity_at(t: float, schedule: list[tuple[int, float]]) -> int:
    for cap, secs in schedule:
        if t < secs:
            return cap
        t -= secs
    return schedule[-1][0]


def nominal_rows(
    schedule: list[tuple[int, float]], rpm: int, latency_s: float, start: float, end: float
) -> float:
    """The rows the provider can answer over [start, end): the integral of capacity / latency
    (0.1 s steps), and at most the quota's rpm / 60 per second over the whole span (the quota
    is a sliding minute: a span of capacity below it leaves room for more later)."""
    total, t = 0.0, start
    while t < end:
        total += capacity_at(t, schedule) / latency_s * 0.1
        t += 0.1
    return min(total, rpm / 60.0 * (end - start)) if rpm else total


def count_lines(process: ConsumerProcess, msg: str, start: float, end: float) -> int:
    """Log lines with this message logged within [start, end)."""
    count = 0
    for line in process.log_lines():
        if line.get("msg") == msg:
            ts = datetime.datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()
            count += start <= ts < end
    return count


def window_section(shape: str) -> dict[str, Any]:
    """`default` (the consumer's own window settings) or `max_messages:max_pending_windows`."""
    defaults = WindowSettings()
    if shape == "default":
        return {"max_messages": defaults.max_messages, "max_wait_ms": defaults.max_wait_ms}
    messages, pending = (int(part) for part in shape.split(":"))
    return {"max_messages": messages, "max_wait_ms": 500, "max_pending_windows": pending}


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 0.0


def windows_of(process: ConsumerProcess) -> list[tuple[float, int, float]]:
    """(epoch seconds, rows, limit) of each `window done` line."""
    out = []
    for line in process.log_lines():
        if line.get("msg") == "window done":
            ts = datetime.datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()
            out.append((ts, int(line["rows"]), float(line["limit"])))
    return out


GAUGES = ("limiter_limit", "limiter_in_flight", "limiter_waiting", "limiter_peers")


async def sample_gauges(ports: list[int], until: float) -> list[list[tuple[float, ...]]]:
    """(epoch seconds, limit, in flight, waiting, peers pressing) of each replica every 0.5 s
    until `until`."""
    traces: list[list[tuple[float, ...]]] = [[] for _ in ports]
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.time() < until:
            for port, trace in zip(ports, traces, strict=True):
                try:
                    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                except httpx.HTTPError:
                    continue
                values = parse_exposition(text)
                trace.append((time.time(), *(values.get(f"{PREFIX}_{g}", 0.0) for g in GAUGES)))
            await asyncio.sleep(0.5)
    return traces


def time_mean(trace: list[tuple[float, ...]], column: int, start: float, end: float) -> float:
    values = [row[column] for row in trace if start <= row[0] < end]
    return sum(values) / len(values) if values else 0.0


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    schedule = parse_capacity_schedule(args.schedule)
    duration = sum(secs for _, secs in schedule)
    warmup = schedule[0][1]
    latency_s = args.latency_ms / 1000
    workdir = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    peak = max(cap for cap, _ in schedule) / latency_s
    if args.rpm:
        peak = min(peak, args.rpm / 60)
    rows = int(peak * duration * 1.3) + 1000
    with kafka_broker() as broker:
        topics = Topics.unique("bench-replicas")
        partitions = max(6, 2 * args.replicas)
        await create_topics(broker.bootstrap, [topics.input, topics.output], partitions)
        data = [{"id": i, "text": f"review {i}: the product was fine"} for i in range(rows)]
        await publish(broker.bootstrap, topics.input, rows_to_messages(data))
        server = ["--latency-ms", str(args.latency_ms), "--jitter-ms", "0"]
        server += ["--retry-after-s", str(args.retry_after_s), "--rpm", str(args.rpm)]
        with fake_llm_process(*server) as llm:
            settings = settings_file(
                workdir,
                broker.bootstrap,
                llm.base_url,
                topics,
                window=window_section(args.window),
                # the defaults, not the tests' quick retries
                llm={
                    "concurrency": {
                        "initial": 16,
                        "min": 1,
                        "max": 128,
                        "share_with_replicas": not args.no_share,
                    },
                    "retry": {},
                },
                logging={"format": "json", "level": "INFO"},
            )
            llm.configure(capacity=schedule[0][0])
            ports = [free_port() for _ in range(args.replicas)]
            replicas = [
                ConsumerProcess(
                    settings,
                    workdir / f"replica-{i}.log",
                    env={"LLM_CONSUMER_METRICS_PORT": str(port)},
                ).start()
                for i, port in enumerate(ports)
            ]
            try:
                # The schedule starts once every member has finished a window: start-up and
                # group joins are not what this measures.
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    if all(windows_of(replica) for replica in replicas):
                        break
                    await asyncio.sleep(0.5)
                llm.configure(capacity_schedule=args.schedule)
                llm.reset()
                t0 = time.time()
                gauges = await sample_gauges(ports, t0 + duration)
                stats = llm.stats()
            finally:
                for replica in replicas:
                    replica.stop(timeout_s=20)
    start, end = t0 + warmup, t0 + duration
    windows = [windows_of(replica) for replica in replicas]
    per_replica = [
        sum(n for ts, n, _ in trace if start <= ts < end) / (end - start) for trace in windows
    ]
    nominal = nominal_rows(schedule, args.rpm, latency_s, warmup, duration) / (end - start)
    result = {
        "replicas": args.replicas,
        "schedule": args.schedule,
        "rpm": args.rpm,
        "latency_ms": args.latency_ms,
        "retry_after_s": args.retry_after_s,
        "window": args.window,
        "share_with_replicas": not args.no_share,
        "total_rows_per_s": sum(per_replica),
        "nominal_rows_per_s": nominal,
        "goodput": sum(per_replica) / nominal,
        "per_replica_rows_per_s": per_replica,
        "shares": [x / sum(per_replica) if sum(per_replica) else 0.0 for x in per_replica],
        "jain": jain(per_replica),
        "held_back_windows": [
            count_lines(r, "window held back: offsets stay uncommitted", t0, end) for r in replicas
        ],
        "assignments": [count_lines(r, "partitions assigned", t0, end) for r in replicas],
        "mean_limit": [time_mean(trace, 1, start, end) for trace in gauges],
        "mean_in_flight": [time_mean(trace, 2, start, end) for trace in gauges],
        "mean_waiting": [time_mean(trace, 3, start, end) for trace in gauges],
        "mean_peers_pressing": [time_mean(trace, 4, start, end) for trace in gauges],
        "requests": stats["requests"],
        "by_status": stats["by_status"],
        "share_429": stats["rejected_429"] / max(1, stats["requests"]),
        "workdir": str(workdir),
    }
    if not args.no_plot:
        plot(gauges, schedule, t0, args, result)
    return result


def plot(
    traces: list[list[tuple[float, ...]]],
    schedule: list[tuple[int, float]],
    t0: float,
    args: argparse.Namespace,
    result: dict[str, Any],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    duration = sum(secs for _, secs in schedule)
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = [i / 10 for i in range(int(duration * 10))]
    ax.step(xs, [capacity_at(x, schedule) for x in xs], "k-", where="post", label="capacity")
    if args.rpm:
        quota_level = args.rpm / 60 * args.latency_ms / 1000
        ax.axhline(quota_level, color="grey", ls=":", label="quota x latency")
    for i, trace in enumerate(traces):
        ax.plot([row[0] - t0 for row in trace], [row[1] for row in trace], "-", label=f"r{i}")
    ax.set_xlabel("s")
    ax.set_ylabel("limit (concurrent requests)")
    ax.set_title(
        f"{args.replicas} replicas: goodput {result['goodput']:.2f} of nominal, "
        f"Jain {result['jain']:.2f}, 429s {100 * result['share_429']:.1f} %"
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--schedule", default="10:15,24:20,12:20,36:20")
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--retry-after-s", type=float, default=1.0)
    parser.add_argument("--window", default="default", help="default, or M:P")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--no-share", action="store_true", help="llm.concurrency.share_with_replicas: false"
    )
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    for key, value in result.items():
        if isinstance(value, float):
            value = round(value, 3)
        elif isinstance(value, list):
            value = [round(v, 3) for v in value]
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
