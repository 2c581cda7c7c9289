"""End-to-end throughput: broker -> consumer -> fake LLM (no jitter) -> broker.

The limiter is pinned to 64 concurrent requests (initial = max = 64), so with the fake LLM at
100 ms the ideal is 64 / 0.1 s = 640 rows/s. Contenders, run one after another against the
same broker and fake LLM so that their figures compare on a shared, noisy machine:

- the consumer with a window shape `max_messages:max_pending_windows` (max_wait_ms 500),
- the consumer with `default`: no `window` section at all, i.e. the consumer's own defaults,
  which is what a user gets and what issue 11 wants as fast as the best shape,
- with `--plain-loop`, bench/plain_loop.py (getmany, one aiohttp call per row under a
  semaphore of 64, produce, wait for the acks, commit), run first: the yardstick for what the
  consumer's machinery costs, and with `--latency-ms 0` (`--scenario kafka-bound`) the only
  yardstick, since then no LLM-bound ideal exists and Kafka and CPU set the pace.

For each contender the benchmark publishes N rows over 3 partitions to fresh topics, starts the
process, reads the output topic and reports:

- rows/s from the first LLM request to the last output: the headline, fair to every contender
  (it leaves out process start-up and group join, which are not throughput, and keeps window
  1, whose size differs between contenders); the fake LLM keeps no timestamps, so the bench
  polls its request count every 10 ms until the first request,
- rows/s from the process's start to the last output (start-up and group join included),
- rows/s from the first output to the last (the issue's measure: all N rows over a time that
  leaves out window 1's enrichment, so it flatters large windows, and means nothing for the
  loop, whose first batch is everything already published: shown as "-" for a single window),
- steady rows/s: rows of windows 2..K over the time from the end of window 1's produce to the
  end of the last window's produce,
- the ratio of each to the ideal (when the latency is above 0), of the headline to the loop's,
- CPU seconds of the contender per 1,000 rows over its whole run (start-up included: what a
  run really costs) and how much of that was spent before the first LLM request (start-up),
- the fake LLM's max_in_flight, and CPU use of the contender, the fake LLM and the broker from
  the first request to the last output, plus a per-window breakdown of where the time that is
  not LLM latency goes.

Output timestamps are the producer's CreateTime, stamped at `send()`, i.e. right after a
window's enrichment finished; all outputs of one window (one batch of the loop) share a
`window.id` header.

Run:  .venv/bin/python bench/end_to_end.py [--scenario window-size|kafka-bound] [--rows N]
          [--latency-ms MS] [--shapes default,256:1,512:2] [--plain-loop] [--repeats N]
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import yaml  # noqa: E402
from aiokafka import AIOKafkaConsumer  # noqa: E402

from consumer.config import WindowSettings  # noqa: E402
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
PLAIN_LOOP = ROOT / "bench" / "plain_loop.py"
# Output timeout at 0 ms, where no ideal bounds the run: assume at least this many rows/s.
_SLOWEST_RATE = 500.0
# Once the contender has exited, stop reading after this long without a new output.
_EXITED_GRACE_S = 2.0
# How often the fake LLM's request count is read until the first request.
_POLL_S = 0.01


@dataclass(frozen=True)
class Scenario:
    """Defaults of a named run; --rows, --latency-ms, --shapes and --plain-loop override."""

    rows: int
    latency_ms: float
    shapes: str
    plain_loop: bool


SCENARIOS = {
    # Issue 2 and 11: is the consumer LLM-bound, whatever the window shape?
    "window-size": Scenario(6000, 100.0, "default,256:1,512:1,512:2", plain_loop=False),
    # Issue 11: no LLM latency, so Kafka and CPU per row set the pace; only the loop compares.
    "kafka-bound": Scenario(20_000, 0.0, "default,512:2", plain_loop=True),
}


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass(frozen=True)
class Contender:
    """What runs between the topics: the plain loop, or the consumer with a window shape.

    `window` None is the consumer with its own window defaults (no `window` section written).
    """

    loop: bool = False
    window: int | None = None
    pending: int | None = None
    idle: int | None = None

    @classmethod
    def parse(cls, text: str) -> Contender:
        """`default` or `max_messages:max_pending_windows[:max_pending_windows_when_idle]`."""
        if text == "default":
            return cls()
        window, pending, *idle = (int(part) for part in text.split(":"))
        return cls(window=window, pending=pending, idle=idle[0] if idle else None)

    @property
    def label(self) -> str:
        if self.loop:
            return "plain loop"
        if self.window is None:
            d = WindowSettings()
            return f"default (w={d.max_messages} p={d.max_pending_windows} {d.max_wait_ms} ms)"
        idle = "" if self.idle is None else f" idle={self.idle}"
        return f"w={self.window} p={self.pending}{idle}"

    @property
    def slug(self) -> str:
        if self.loop:
            return "loop"
        if self.window is None:
            return "default"
        idle = "" if self.idle is None else f"-i{self.idle}"
        return f"w{self.window}-p{self.pending}{idle}"


@dataclass
class LoopProcess:
    """bench/plain_loop.py as a child process; it exits by itself after its rows."""

    command: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    def finish(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the exit (kill after the timeout); returns the loop's JSON summary line."""
        assert self.process is not None
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        for line in reversed(self.log_path.read_bytes().splitlines()):
            if line.startswith(b"{"):
                summary: dict[str, Any] = orjson.loads(line)
                return summary
        raise RuntimeError(f"plain loop printed no summary:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Result:
    contender: Contender
    rows: int
    received: int
    start_to_last_s: float
    request_to_last_s: float | None
    first_to_last_s: float
    steady_rows: int
    steady_s: float
    max_in_flight: int
    requests: int
    cpu: dict[str, float | None]
    cpu_total_s: float | None
    cpu_start_up_s: float | None
    windows: list[dict[str, Any]] = field(default_factory=list)
    loop_summary: dict[str, Any] | None = None
    run: int = 1

    @property
    def label(self) -> str:
        return self.contender.label if self.run == 1 else f"{self.contender.label}, run {self.run}"

    def rate(self, seconds: float, rows: int | None = None) -> float:
        return (self.rows if rows is None else rows) / seconds if seconds > 0 else math.nan

    @property
    def request_to_last_rate(self) -> float:
        return math.nan if self.request_to_last_s is None else self.rate(self.request_to_last_s)

    @property
    def cpu_per_1000(self) -> float | None:
        if self.cpu_total_s is None or not self.received:
            return None
        return self.cpu_total_s / self.received * 1000


async def _collect(
    bootstrap: str,
    topic: str,
    expect: int,
    timeout_s: float,
    alive: Callable[[], bool],
) -> list[tuple[int, str]]:
    """Read the output topic until `expect` records; returns (create ts ms, window id).

    Also stops once the contender has exited and nothing came for a while, so a process that
    fails at start (or the loop once done) does not hold the run for the whole timeout.
    """
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
        last_record = time.monotonic()
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for r in records:
                    headers = {k: v.decode() for k, v in r.headers or ()}
                    out.append((r.timestamp, headers.get("window.id", "?")))
                    last_record = time.monotonic()
            if not alive() and time.monotonic() - last_record > _EXITED_GRACE_S:
                break
    finally:
        await consumer.stop()
    return out


async def _first_request(llm: FakeLLM, on_seen: Callable[[], None]) -> float:
    """Wall time (s) of the fake LLM's first request since its reset, to about _POLL_S.

    The fake keeps counts, not timestamps, so its count is polled; polling ends at the first
    request, before the contender's load starts.
    """
    async with aiohttp.ClientSession() as session:
        while True:
            sent = time.time()
            async with session.get(llm.url("/admin/stats")) as reply:
                stats = await reply.json()
            if stats.get("requests", 0) > 0:
                on_seen()
                return sent
            await asyncio.sleep(_POLL_S)


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


def _consumer_settings(
    workdir: Path,
    broker: BrokerHandle,
    llm: FakeLLM,
    topics: Topics,
    contender: Contender,
    concurrency: int,
) -> Path:
    """The consumer's settings file; for `default`, one without a `window` section."""
    window: dict[str, Any] = {}
    if contender.window is not None:
        window = {
            "max_messages": contender.window,
            "max_wait_ms": 500,
            "max_pending_windows": contender.pending,
        }
        if contender.idle is not None:
            window["max_pending_windows_when_idle"] = contender.idle
    path = settings_file(
        workdir,
        broker.bootstrap,
        llm.base_url,
        topics,
        window=window,
        llm={"concurrency": {"initial": concurrency, "min": 1, "max": concurrency}},
        logging={"format": "json", "level": "INFO"},
    )
    if contender.window is None:
        # settings_file always writes the tests' small window (50 rows, 500 ms); drop it so
        # the consumer falls back to WindowSettings' defaults, as a user's file would.
        settings = yaml.safe_load(path.read_text())
        del settings["window"]
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


async def run_contender(
    broker: BrokerHandle,
    llm: FakeLLM,
    contender: Contender,
    rows: int,
    partitions: int,
    concurrency: int,
    latency_s: float,
    workdir: Path,
    broker_pid: int | None,
) -> Result:
    topics = Topics.unique(f"bench-e2e-{contender.slug}")
    await create_topics(broker.bootstrap, [topics.input, topics.output, topics.dlq], partitions)
    data = [{"id": i, "text": f"review number {i}: the product was fine"} for i in range(rows)]
    await publish(broker.bootstrap, topics.input, rows_to_messages(data))
    llm.reset()
    log_path = workdir / f"{contender.slug}-{topics.input}.log"
    runner: LoopProcess | ConsumerProcess
    if contender.loop:
        command = [sys.executable, str(PLAIN_LOOP), "--bootstrap", broker.bootstrap]
        command += ["--input-topic", topics.input, "--output-topic", topics.output]
        command += ["--group", topics.group, "--llm-url", llm.base_url]
        command += ["--rows", str(rows), "--concurrency", str(concurrency)]
        runner = LoopProcess(command, log_path)
    else:
        settings = _consumer_settings(workdir, broker, llm, topics, contender, concurrency)
        runner = ConsumerProcess(settings, log_path)
    marks: dict[str, dict[str, float | None]] = {}
    pids: dict[str, int | None] = {"contender": None, "fake_llm": llm.process.pid}
    pids["broker"] = broker_pid

    def sample(name: str) -> None:
        marks[name] = {k: cpu_seconds(p) for k, p in pids.items()}
        marks[name]["wall"] = time.monotonic()

    started_wall = time.time()
    runner.start()
    process = runner.process
    assert process is not None
    pids["contender"] = process.pid
    first_request = asyncio.create_task(_first_request(llm, lambda: sample("request")))
    ideal = concurrency / latency_s if latency_s > 0 else math.inf
    timeout = 60 + 4 * rows / min(ideal, _SLOWEST_RATE)
    loop_summary: dict[str, Any] | None = None
    try:
        records = await _collect(
            broker.bootstrap, topics.output, rows, timeout, lambda: process.poll() is None
        )
        sample("last")
    finally:
        if isinstance(runner, LoopProcess):
            loop_summary = runner.finish(timeout_s=20)
        else:
            runner.stop(timeout_s=20)
        if not first_request.done():
            first_request.cancel()
        await asyncio.gather(first_request, return_exceptions=True)
    stats = llm.stats()
    if not records:
        raise RuntimeError(f"no output for {contender.label}; log:\n{runner.log_text()[-3000:]}")
    # Cancelled only when the contender never called the LLM (then there is no output either).
    request_wall = None if first_request.cancelled() else first_request.result()
    at_request = marks.get("request", {})
    last = marks["last"]
    if loop_summary is not None:
        # The loop may exit before the reader sees its last output; its own process_time()
        # at exit is its CPU over the whole run.
        last["contender"] = float(loop_summary["cpu_s"])
    wall = (last["wall"] or 0) - (at_request.get("wall") or 0)
    cpu: dict[str, float | None] = {}
    for name in pids:
        a, b = at_request.get(name), last.get(name)
        cpu[name] = (b - a) / wall if a is not None and b is not None and wall > 0 else None

    windows = _window_breakdown(records, concurrency, latency_s)
    last_ms = max(ts for ts, _ in records)
    first_ms = min(ts for ts, _ in records)
    w1 = windows[0]
    steady_rows = sum(w["rows"] for w in windows[1:])
    return Result(
        contender=contender,
        rows=rows,
        received=len(records),
        start_to_last_s=last_ms / 1000 - started_wall,
        request_to_last_s=None if request_wall is None else last_ms / 1000 - request_wall,
        first_to_last_s=(last_ms - first_ms) / 1000,
        steady_rows=steady_rows,
        steady_s=(last_ms - w1["last_ms"]) / 1000,
        max_in_flight=int(stats.get("max_in_flight", 0)),
        requests=int(stats.get("requests", 0)),
        cpu=cpu,
        cpu_total_s=last.get("contender"),
        cpu_start_up_s=at_request.get("contender"),
        windows=windows,
        loop_summary=loop_summary,
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ratio(value: float, reference: float | None) -> str:
    """value / reference to two places, or "-" when either is missing or not finite."""
    if reference is None or not math.isfinite(reference) or reference <= 0:
        return "-"
    return "-" if math.isnan(value) else f"{value / reference:.2f}"


def _rate(value: float, ideal: float) -> str:
    """rows/s, with its ratio to the ideal in brackets when there is one."""
    if math.isnan(value):
        return "-"
    return f"{value:.0f}" if not math.isfinite(ideal) else f"{value:.0f} ({value / ideal:.2f})"


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def report(
    results: list[Result], args: argparse.Namespace, ideal: float, load_before: float
) -> str:
    # Each run's contenders compare with that run's loop: the load of a shared machine drifts.
    loop_rates = {r.run: r.request_to_last_rate for r in results if r.contender.loop}
    lines = [
        "| contender | rows | request->last s | rows/s | ratio | ratio to loop "
        "| start->last rows/s (ratio) | first->last rows/s (ratio) | steady rows/s (ratio) "
        "| CPU s / 1,000 rows | CPU s before 1st request | max_in_flight | LLM requests "
        "| CPU contender / fake LLM / broker |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        r2l = r.request_to_last_rate
        # Both leave window 1 out, so with a single window (the loop's usual one batch) they
        # measure nothing.
        f2l = r.rate(r.first_to_last_s) if len(r.windows) > 1 else math.nan
        cpu = " / ".join(_pct(r.cpu.get(k)) for k in ("contender", "fake_llm", "broker"))
        lines.append(
            f"| {r.label} | {r.received}/{r.rows} | {_seconds(r.request_to_last_s)} "
            f"| {r2l:.0f} | {_ratio(r2l, ideal)} | {_ratio(r2l, loop_rates.get(r.run))} "
            f"| {_rate(r.rate(r.start_to_last_s), ideal)} "
            f"| {_rate(f2l, ideal)} "
            f"| {_rate(r.rate(r.steady_s, r.steady_rows), ideal)} "
            f"| {_seconds(r.cpu_per_1000)} | {_seconds(r.cpu_start_up_s)} "
            f"| {r.max_in_flight} | {r.requests} | {cpu} |"
        )
    counts = [
        f"{r.loop_summary['rows']} rows in {r.loop_summary['batches']} batches, "
        f"{r.loop_summary['rows_per_s']:.0f} rows/s"
        for r in results
        if r.loop_summary is not None
    ]
    if counts:
        own = "; ".join(counts)
        lines += ["", f"The plain loop's own count, first batch to last commit: {own}."]
    lines += ["", "Per-window cycle (window k: end of enrichment of k-1 -> end of enrichment of k;"]
    lines += [f"ideal = ceil(rows/{args.concurrency}) x latency; overhead = cycle - ideal):", ""]
    lines += [
        "| contender | windows | median rows | median cycle s | median ideal s "
        "| median overhead s | overhead share | median produce (send) s of a window |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ws = [w for w in r.windows[1:] if "cycle_s" in w]
        if not ws:
            continue
        cycle = statistics.median(w["cycle_s"] for w in ws)
        ideal_w = statistics.median(w["ideal_s"] for w in ws)
        over = [w["cycle_s"] - w["ideal_s"] for w in ws]
        total = sum(w["cycle_s"] for w in ws)
        share = sum(over) / total if total > 0 else math.nan
        send = statistics.median(w["send_s"] for w in ws)
        size = statistics.median(w["rows"] for w in ws)
        lines.append(
            f"| {r.label} | {len(r.windows)} | {size:.0f} | {cycle:.3f} "
            f"| {ideal_w:.3f} | {statistics.median(over):.3f} | {100 * share:.0f}% "
            f"| {send:.3f} |"
        )
    usable = min(args.concurrency, args.capacity) if args.capacity else args.concurrency
    capacity = (
        f"a hidden capacity of {args.capacity} (429, Retry-After {args.retry_after_s:g} s)"
        if args.capacity
        else "unlimited capacity"
    )
    if math.isfinite(ideal):
        yardstick = f"Ideal: {usable} concurrent / {args.latency_ms:g} ms = {ideal:.0f} rows/s. "
    else:
        yardstick = (
            "No LLM-bound ideal at 0 ms: ratios are to the plain loop (max_in_flight is 1: "
            "the fake answers without awaiting, so it never holds two requests). "
        )
    head = [
        f"{yardstick}{args.rows} rows over {args.partitions} partitions, fake LLM latency "
        f"{args.latency_ms:g} ms, no jitter, {capacity}, limiter pinned to {args.concurrency}. "
        f"Host: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average before the run {load_before:.2f}.",
        "",
    ]
    return "\n".join(head + lines) + "\n"


async def main_async(args: argparse.Namespace) -> str:
    load_before = os.getloadavg()[0]
    contenders = [Contender.parse(s) for s in args.shapes.split(",") if s]
    if args.plain_loop:
        contenders.insert(0, Contender(loop=True))
    latency_s = args.latency_ms / 1000
    usable = min(args.concurrency, args.capacity) if args.capacity else args.concurrency
    ideal = usable / latency_s if latency_s > 0 else math.inf
    results: list[Result] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    with kafka_broker() as broker:
        broker_pid = None
        if broker.state_dir is not None and (broker.state_dir / "kafka.pid").exists():
            broker_pid = int((broker.state_dir / "kafka.pid").read_text().strip())
        llm_args = ["--latency-ms", str(args.latency_ms), "--jitter-ms", "0"]
        llm_args += ["--capacity", str(args.capacity), "--retry-after-s", str(args.retry_after_s)]
        with fake_llm_process(*llm_args) as llm:
            for run, contender in itertools.product(range(1, args.repeats + 1), contenders):
                of = f", run {run} of {args.repeats}" if args.repeats > 1 else ""
                print(f"running {contender.label}{of} ...", flush=True)
                result = await run_contender(
                    broker,
                    llm,
                    contender,
                    args.rows,
                    args.partitions,
                    args.concurrency,
                    latency_s,
                    workdir,
                    broker_pid,
                )
                result.run = run
                results.append(result)
                print(
                    f"  {result.received} rows, {result.request_to_last_rate:.0f} rows/s from "
                    f"the first request to the last output, CPU "
                    f"{_seconds(result.cpu_per_1000)} s / 1,000 rows",
                    flush=True,
                )
    print(f"logs and settings in {workdir}")
    return report(results, args, ideal, load_before)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default="window-size",
        help="preset of --rows, --latency-ms, --shapes and --plain-loop: window-size (6000 "
        "rows, 100 ms, default,256:1,512:1,512:2) or kafka-bound (20000 rows, 0 ms, the plain "
        "loop, default,512:2); the options below override it",
    )
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=None, help="fake LLM latency")
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
        default=None,
        help="comma list of max_messages:max_pending_windows[:max_pending_windows_when_idle], "
        "or `default` for the "
        "consumer's own window settings",
    )
    parser.add_argument(
        "--plain-loop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run bench/plain_loop.py, first, as the yardstick",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the whole list of contenders this many times, one after another (ABAB, "
        "not AABB), so a drift of the machine's load shows instead of favouring one",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    preset = SCENARIOS[args.scenario]
    for name in ("rows", "latency_ms", "shapes", "plain_loop"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    if args.plain_loop and args.capacity:
        parser.error("--plain-loop has no retries: it cannot run against --capacity")
    if args.latency_ms < 0:
        parser.error("--latency-ms must be >= 0")
    return args


def main() -> int:
    args = parse_args()
    table = asyncio.run(main_async(args))
    print()
    print(table)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # Each scenario keeps its own block, so a kafka-bound run leaves the window-size one.
        tag = "" if args.scenario == "window-size" else f" {args.scenario}"
        marker = f"<!-- end_to_end{tag} table -->"
        stamp = time.strftime("%Y-%m-%d %H:%M")
        block = f"{marker}\n## end_to_end.py --scenario {args.scenario}, {stamp}\n\n{table}"
        block += f"{marker}\n"
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
