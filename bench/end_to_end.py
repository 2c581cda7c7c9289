"""End-to-end throughput: broker -> consumer -> fake LLM (100 ms, unlimited) -> broker.

The limiter is pinned to 64 concurrent requests (initial = max = 64), so the ideal is
64 / 0.1 s = 640 rows/s. For each window shape (max_messages, max_pending_windows) the benchmark
publishes N rows over 3 partitions to fresh topics, starts `python -m consumer run`, reads the
output topic and reports:

- rows/s from the consumer's start to the last output (includes start-up and group join),
- rows/s from the first output to the last (the brief's measure; it excludes window 1),
- steady rows/s: rows of windows 2..K over the time from the end of window 1's produce to the
  end of the last window's produce (the fairest steady-state figure),
- the ratio of each to the ideal, the fake LLM's max_in_flight, and CPU use of the consumer,
  the fake LLM and the broker over the steady part, plus a per-window breakdown of where the
  time that is not LLM latency goes.

Output timestamps are the producer's CreateTime, stamped by the consumer at `send()`, i.e.
right after a window's enrichment finished; all outputs of one window share a `window.id`
header.

Run:  .venv/bin/python bench/end_to_end.py [--rows 6000] [--shapes 256:1,512:1,512:2]
It starts a local broker (tests/support/kafka_broker.py: KAFKA_BOOTSTRAP_SERVERS is honoured)
and a fake LLM, and writes the report to bench/results/issue-2.md unless --no-write.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaConsumer  # noqa: E402

from tests.support.fake_llm_process import FakeLLM, fake_llm_process  # noqa: E402
from tests.support.kafka_broker import BrokerHandle, kafka_broker  # noqa: E402
from tests.support.pipeline import (  # noqa: E402
    ConsumerProcess,
    Topics,
    create_topics,
    publish,
    rows_to_messages,
    settings_file,
)

_TICK = os.sysconf("SC_CLK_TCK")
RESULTS = ROOT / "bench" / "results" / "issue-2.md"


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class Shape:
    window: int
    pending: int

    @property
    def label(self) -> str:
        return f"w={self.window} p={self.pending}"


@dataclass
class Result:
    shape: Shape
    rows: int
    received: int
    start_to_last_s: float
    first_to_last_s: float
    steady_rows: int
    steady_s: float
    max_in_flight: int
    requests: int
    cpu: dict[str, float | None]
    windows: list[dict[str, Any]] = field(default_factory=list)

    def rate(self, seconds: float, rows: int | None = None) -> float:
        return (self.rows if rows is None else rows) / seconds if seconds > 0 else math.nan


async def _collect(
    bootstrap: str, topic: str, expect: int, timeout_s: float, on_first: Any
) -> list[tuple[int, str]]:
    """Read the output topic until `expect` records; returns (create ts ms, window id)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        metadata_max_age_ms=500,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    out: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for r in records:
                    if not out:
                        on_first()
                    headers = {k: v.decode() for k, v in r.headers or ()}
                    out.append((r.timestamp, headers.get("window.id", "?")))
    finally:
        await consumer.stop()
    return out


def _window_breakdown(
    records: list[tuple[int, str]], concurrency: int, latency_s: float
) -> list[dict[str, Any]]:
    """Per window (in produce order): rows, first/last send time, LLM-bound ideal time."""
    by_window: dict[str, list[int]] = {}
    for ts, wid in records:
        by_window.setdefault(wid, []).append(ts)
    windows: list[dict[str, Any]] = sorted(
        (
            {"id": wid, "rows": len(ts), "first_ms": min(ts), "last_ms": max(ts)}
            for wid, ts in by_window.items()
        ),
        key=lambda w: w["first_ms"],
    )
    for prev, cur in itertools.pairwise(windows):
        # From the end of enrichment of the previous window to the end of this one's:
        # produce + ack + commit of prev, then this window's enrichment.
        cur["cycle_s"] = (cur["first_ms"] - prev["first_ms"]) / 1000
        cur["ideal_s"] = math.ceil(cur["rows"] / concurrency) * latency_s
        cur["send_s"] = (prev["last_ms"] - prev["first_ms"]) / 1000
    return windows


async def run_shape(
    broker: BrokerHandle,
    llm: FakeLLM,
    shape: Shape,
    rows: int,
    partitions: int,
    concurrency: int,
    latency_s: float,
    workdir: Path,
    broker_pid: int | None,
) -> Result:
    topics = Topics.unique(f"bench-e2e-w{shape.window}-p{shape.pending}")
    await create_topics(broker.bootstrap, [topics.input, topics.output, topics.dlq], partitions)
    data = [{"id": i, "text": f"review number {i}: the product was fine"} for i in range(rows)]
    await publish(broker.bootstrap, topics.input, rows_to_messages(data))
    settings = settings_file(
        workdir,
        broker.bootstrap,
        llm.base_url,
        topics,
        window={
            "max_messages": shape.window,
            "max_wait_ms": 500,
            "max_pending_windows": shape.pending,
        },
        llm={"concurrency": {"initial": concurrency, "min": 1, "max": concurrency}},
        logging={"format": "json", "level": "INFO"},
    )
    llm.reset()
    log_path = workdir / f"consumer-{topics.input}.log"
    proc = ConsumerProcess(settings, log_path)
    cpu: dict[str, float | None] = {}
    marks: dict[str, dict[str, float | None]] = {}
    pids = {"consumer": None, "fake_llm": llm.process.pid, "broker": broker_pid}

    def sample(name: str) -> None:
        marks[name] = {k: cpu_seconds(p) for k, p in pids.items()}
        marks[name]["wall"] = time.monotonic()

    started_wall = time.time()
    proc.start()
    assert proc.process is not None
    pids["consumer"] = proc.process.pid
    try:
        timeout = 60 + 4 * rows / (concurrency / latency_s)
        records = await _collect(
            broker.bootstrap, topics.output, rows, timeout, lambda: sample("first")
        )
        sample("last")
    finally:
        proc.stop(timeout_s=20)
    stats = llm.stats()
    if not records:
        raise RuntimeError(f"no output for {shape.label}; consumer log:\n{proc.log_text()[-3000:]}")
    first = marks.get("first", {})
    last = marks["last"]
    wall = (last["wall"] or 0) - (first.get("wall") or 0)
    for name in pids:
        a, b = first.get(name), last.get(name)
        cpu[name] = (b - a) / wall if a is not None and b is not None and wall > 0 else None

    windows = _window_breakdown(records, concurrency, latency_s)
    last_ms = max(ts for ts, _ in records)
    first_ms = min(ts for ts, _ in records)
    w1 = windows[0]
    steady_rows = sum(w["rows"] for w in windows[1:])
    return Result(
        shape=shape,
        rows=rows,
        received=len(records),
        start_to_last_s=last_ms / 1000 - started_wall,
        first_to_last_s=(last_ms - first_ms) / 1000,
        steady_rows=steady_rows,
        steady_s=(last_ms - w1["last_ms"]) / 1000,
        max_in_flight=int(stats.get("max_in_flight", 0)),
        requests=int(stats.get("requests", 0)),
        cpu=cpu,
        windows=windows,
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def report(results: list[Result], args: argparse.Namespace, ideal: float) -> str:
    lines = [
        "| shape | rows | start->last s | rows/s | ratio | first->last s | rows/s | ratio "
        "| steady rows/s | steady ratio | max_in_flight | LLM requests "
        "| CPU consumer / fake LLM / broker |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s2l = r.rate(r.start_to_last_s)
        f2l = r.rate(r.first_to_last_s)
        steady = r.rate(r.steady_s, r.steady_rows)
        cpu = " / ".join(_pct(r.cpu.get(k)) for k in ("consumer", "fake_llm", "broker"))
        lines.append(
            f"| {r.shape.label} | {r.received}/{r.rows} | {r.start_to_last_s:.2f} | {s2l:.0f} "
            f"| {s2l / ideal:.2f} | {r.first_to_last_s:.2f} | {f2l:.0f} | {f2l / ideal:.2f} "
            f"| {steady:.0f} | {steady / ideal:.2f} | {r.max_in_flight} | {r.requests} | {cpu} |"
        )
    lines += ["", "Per-window cycle (window k: end of enrichment of k-1 -> end of enrichment of k;"]
    lines += ["ideal = ceil(rows/64) x latency; overhead = cycle - ideal):", ""]
    lines += [
        "| shape | windows | median cycle s | median ideal s | median overhead s "
        "| overhead share | median produce (send) s of a window |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ws = [w for w in r.windows[1:] if "cycle_s" in w]
        if not ws:
            continue
        cycle = statistics.median(w["cycle_s"] for w in ws)
        ideal_w = statistics.median(w["ideal_s"] for w in ws)
        over = [w["cycle_s"] - w["ideal_s"] for w in ws]
        share = sum(over) / sum(w["cycle_s"] for w in ws)
        send = statistics.median(w["send_s"] for w in ws)
        lines.append(
            f"| {r.shape.label} | {len(r.windows)} | {cycle:.3f} | {ideal_w:.3f} "
            f"| {statistics.median(over):.3f} | {100 * share:.0f}% | {send:.3f} |"
        )
    usable = min(args.concurrency, args.capacity) if args.capacity else args.concurrency
    capacity = (
        f"a hidden capacity of {args.capacity} (429, Retry-After {args.retry_after_s:g} s)"
        if args.capacity
        else "unlimited capacity"
    )
    head = [
        f"Ideal: {usable} concurrent / {args.latency_ms:.0f} ms = {ideal:.0f} rows/s. "
        f"{args.rows} rows over {args.partitions} partitions, fake LLM latency "
        f"{args.latency_ms:.0f} ms, no jitter, {capacity}. "
        f"Host: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average before the run {os.getloadavg()[0]:.2f}.",
        "",
    ]
    return "\n".join(head + lines) + "\n"


async def main_async(args: argparse.Namespace) -> str:
    shapes = [Shape(*map(int, s.split(":"))) for s in args.shapes.split(",")]
    latency_s = args.latency_ms / 1000
    usable = min(args.concurrency, args.capacity) if args.capacity else args.concurrency
    ideal = usable / latency_s
    results: list[Result] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    with kafka_broker() as broker:
        broker_pid = None
        if broker.state_dir is not None and (broker.state_dir / "kafka.pid").exists():
            broker_pid = int((broker.state_dir / "kafka.pid").read_text().strip())
        llm_args = ["--latency-ms", str(args.latency_ms), "--jitter-ms", "0"]
        llm_args += ["--capacity", str(args.capacity), "--retry-after-s", str(args.retry_after_s)]
        with fake_llm_process(*llm_args) as llm:
            for shape in shapes:
                print(f"running {shape.label} ...", flush=True)
                result = await run_shape(
                    broker,
                    llm,
                    shape,
                    args.rows,
                    args.partitions,
                    args.concurrency,
                    latency_s,
                    workdir,
                    broker_pid,
                )
                results.append(result)
                print(
                    f"  {result.received} rows, steady "
                    f"{result.rate(result.steady_s, result.steady_rows):.0f} rows/s",
                    flush=True,
                )
    return report(results, args, ideal)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument(
        "--capacity",
        type=int,
        default=0,
        help="the fake LLM's hidden concurrent capacity, 429 beyond it (0: unlimited); the "
        "ideal becomes min(concurrency, capacity) / latency (the per-window table still "
        "assumes 64 at once)",
    )
    parser.add_argument("--retry-after-s", type=float, default=0.1)
    parser.add_argument(
        "--shapes",
        default="256:1,512:1,512:2",
        help="comma list of max_messages:max_pending_windows",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    table = asyncio.run(main_async(args))
    print()
    print(table)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        marker = "<!-- end_to_end table -->"
        stamp = time.strftime("%Y-%m-%d %H:%M")
        block = f"{marker}\n## end_to_end.py, {stamp}\n\n{table}{marker}\n"
        text = args.out.read_text() if args.out.exists() else ""
        if text.count(marker) >= 2:
            before, _, rest = text.partition(marker)
            _, _, after = rest.partition(marker)
            text = before + block + after.lstrip("\n")
        else:
            text = (text + "\n" if text else "") + block
        args.out.write_text(text)
        print(f"written to {args.out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
