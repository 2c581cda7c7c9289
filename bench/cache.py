"""The response cache (issue 14): what it saves in paid calls, and what it costs in rows/s.

Every part runs the consumer as a process against the local broker and fake LLM processes,
the cache `off` and `kafka` side by side in one run, and counts paid calls with the fake's
`/admin/stats` (every request it received, answered or not):

(a) paid calls per distinct prompt, where redelivery would pay again:
    - crash: N distinct rows (3,000), the consumer SIGKILLed K times (3), each time once it has
      finished a window and has requests in flight, restarted each time;
    - rebalance: two members (own state directories, own fake LLMs) started together in one
      group over 12 partitions, the second SIGKILLed the same way; the first takes its
      partitions over after the session timeout (6 s).
    Fake LLM at 20 ms, concurrency pinned to 8, windows of 200 rows. The goal with `kafka`:
    <= 1.01.
(b) rows/s with the cache `kafka` where every lookup is a miss (distinct rows, a new cache
    topic per run) against the cache `off`, fake LLM at 100 ms, concurrency pinned to 64 (ideal
    640 rows/s), in turn for `--rounds` rounds (ABAB, so a drift of a shared machine's load does
    not favour one). The goal: the cache costs at most 5 %.
(c) rows/s on a replay where every lookup is a hit: the rows of the last `kafka` run of (b)
    published again (`--replay-copies` times, 4, so the run lasts long enough to measure) to a
    new input topic, read by a consumer with that run's cache topic and state directory (so
    its store already holds every answer; the provider is not called), against a run over as
    many distinct rows with the cache `off` and a 0 ms fake LLM (the Kafka-bound rate), in
    turn.

Rates are computed from the outputs' CreateTime (stamped at send, right after a window's
enrichment): first output -> last output (all rows over a time that leaves window 1 out: the
only measure a replay with no LLM request has), from the fake's first request to the last
output (the headline of bench/end_to_end.py, where there are requests), and from the process
start to the last output. CPU seconds of the consumer per 1,000 rows cover its whole run.
The consumer's own window defaults are used in (b) and (c), as a user gets them.

Run:  .venv/bin/python bench/cache.py [--parts a,b,c] [--crash-rows 3000] [--kills 3]
          [--rate-rows 6000] [--rounds 3] [--replay-copies 4] [--no-write]
It starts a local broker (tests/support/kafka_broker.py: KAFKA_BOOTSTRAP_SERVERS is honoured)
and writes its tables to bench/results/issue-14.md between markers, unless --no-write.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import yaml  # noqa: E402
from end_to_end import (  # noqa: E402
    Contender,
    _collect,
    _consumer_settings,
    _first_request,
    cpu_seconds,
)

from tests.support.fake_llm_process import FakeLLM, fake_llm_process  # noqa: E402
from tests.support.kafka_broker import BrokerHandle, kafka_broker  # noqa: E402
from tests.support.pipeline import (  # noqa: E402
    ConsumerProcess,
    Message,
    Topics,
    create_topics,
    publish,
    read_topic,
    rows_to_messages,
    settings_file,
    wait_for_commits,
)

RESULTS = ROOT / "bench" / "results" / "issue-14.md"
MARKER = "<!-- bench/cache.py tables -->"
FAST_GROUP = {"session_timeout_ms": 6_000, "heartbeat_interval_ms": 1_000}
PAID_CONCURRENCY = 8
PAID_LATENCY_MS = 20
RATE_CONCURRENCY = 64
RATE_LATENCY_MS = 100
# How long a member may take from its start to its first finished window (group join included:
# after a SIGKILL the group waits for the dead member's session to time out first).
_FIRST_WINDOW_S = 60.0
# After its first window, a member is killed this long later (s): in the middle of the next.
_KILL_AFTER_S = (0.3, 1.0)
# How long the member to kill may go without a request in flight before the run is given up.
_BUSY_S = 10.0
MISS = "kafka, every lookup a miss"
HIT = "kafka replay, every lookup a hit"
KAFKA_BOUND = "off, fake LLM 0 ms"


def distinct_rows(count: int, tag: str) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"{tag} review {i}: the product was fine"} for i in range(count)]


# ---- (a) paid calls per distinct prompt -------------------------------------------------------


@dataclass(frozen=True)
class PaidRun:
    scenario: str
    cache: str
    distinct: int
    requests: int
    in_flight_at_kills: int
    missing: int
    duplicates: int
    hits: int
    seconds: float

    @property
    def per_prompt(self) -> float:
        return self.requests / self.distinct


def _paid_settings(
    workdir: Path, bootstrap: str, llm: FakeLLM, topics: Topics, cache: str, state: str
) -> Path:
    return settings_file(
        workdir,
        bootstrap,
        llm.base_url,
        topics,
        kafka=FAST_GROUP,
        window={"max_messages": 200, "max_wait_ms": 500},
        llm={
            "cache": {"backend": cache},
            "concurrency": {"initial": PAID_CONCURRENCY, "max": PAID_CONCURRENCY},
        },
        state={"directory": str(workdir / state)},
    )


async def _kill_mid_window(proc: ConsumerProcess, llm: FakeLLM, rng: random.Random) -> int:
    """SIGKILL once the member has finished a window and is into the next; what was in flight.

    `llm` is the member's own fake LLM: the kill waits until the member has requests there.
    A kill timed from the start instead could fall before the member has any partition (a
    restart waits for the dead member's session to time out), or after it ran out of rows,
    and measure nothing.
    """
    deadline = time.monotonic() + _FIRST_WINDOW_S
    while not any(line.get("msg") == "window done" for line in proc.log_lines()):
        if time.monotonic() > deadline or (proc.process and proc.process.poll() is not None):
            raise RuntimeError(f"no window done within {_FIRST_WINDOW_S:g} s: {proc.log_path}")
        await asyncio.sleep(0.05)
    await asyncio.sleep(rng.uniform(*_KILL_AFTER_S))
    deadline = time.monotonic() + _BUSY_S
    while (in_flight := int(llm.stats()["in_flight"])) == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the member to kill had no request in flight for {_BUSY_S:g} s (out of rows?): "
                f"give it more rows; {proc.log_path}"
            )
        await asyncio.sleep(0.01)
    proc.kill()
    return in_flight


async def _finish(
    bootstrap: str, topics: Topics, proc: ConsumerProcess, rows: int
) -> list[Message]:
    """Every output (and extras: duplicates are counted), then commits, then a clean stop."""
    try:
        outputs = await read_topic(bootstrap, topics.output, expect=rows, timeout_s=300, settle_s=2)
        await wait_for_commits(bootstrap, topics.group, topics.input, timeout_s=60)
    finally:
        code = proc.stop()
    if code != 0:
        raise RuntimeError(f"the consumer exited with {code}: {proc.log_path}")
    return outputs


def _paid_run(
    scenario: str,
    cache: str,
    positions: Sequence[tuple[int, int]],
    outputs: Sequence[Message],
    requests: int,
    in_flight: int,
    started: float,
) -> PaidRun:
    seen = Counter(m.source for m in outputs)
    return PaidRun(
        scenario=scenario,
        cache=cache,
        distinct=len(positions),
        requests=requests,
        in_flight_at_kills=in_flight,
        missing=sum(1 for p in positions if p not in seen),
        duplicates=sum(n - 1 for n in seen.values()),
        hits=sum(1 for m in outputs if m.json()["llm_response_cache"] == "hit"),
        seconds=time.monotonic() - started,
    )


async def crash(
    bootstrap: str, llm: FakeLLM, cache: str, rows: int, kills: int, workdir: Path
) -> PaidRun:
    topics = Topics.unique(f"bench-cache-crash-{cache}")
    await create_topics(bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    positions = await publish(
        bootstrap, topics.input, rows_to_messages(distinct_rows(rows, topics.input))
    )
    llm.reset()
    settings = _paid_settings(workdir, bootstrap, llm, topics, cache, f"state-{topics.group}")
    rng = random.Random(3)
    started = time.monotonic()
    in_flight = 0
    for attempt in range(kills):
        log = workdir / f"{topics.input}-{attempt}.log"
        in_flight += await _kill_mid_window(ConsumerProcess(settings, log).start(), llm, rng)
    last = ConsumerProcess(settings, workdir / f"{topics.input}-last.log").start()
    outputs = await _finish(bootstrap, topics, last, rows)
    requests = int(llm.stats()["requests"])
    return _paid_run(
        f"crash, SIGKILL x{kills}", cache, positions, outputs, requests, in_flight, started
    )


async def rebalance(bootstrap: str, llm: FakeLLM, cache: str, rows: int, workdir: Path) -> PaidRun:
    """Two members started together (one started later would join when most rows are done),
    on 12 partitions (a member drains the partitions it fetched one after another, so with few
    partitions the victim's share could be finished already). The victim has a fake LLM of its
    own, so the kill can wait for it to have requests in flight."""
    topics = Topics.unique(f"bench-cache-rebalance-{cache}")
    await create_topics(bootstrap, [topics.input, topics.output, topics.dlq], partitions=12)
    positions = await publish(
        bootstrap, topics.input, rows_to_messages(distinct_rows(rows, topics.input))
    )
    llm.reset()
    started = time.monotonic()
    with fake_llm_process("--latency-ms", str(PAID_LATENCY_MS), "--jitter-ms", "0") as own:
        survivor, victim = (
            ConsumerProcess(
                _paid_settings(
                    workdir, bootstrap, fake, topics, cache, f"state-{topics.group}-{m}"
                ),
                workdir / f"{topics.input}-{m}.log",
            ).start()
            for fake, m in ((llm, "a"), (own, "b"))
        )
        try:
            in_flight = await _kill_mid_window(victim, own, random.Random(5))
        except BaseException:
            survivor.kill()
            victim.kill()
            raise
        outputs = await _finish(bootstrap, topics, survivor, rows)
        requests = int(llm.stats()["requests"]) + int(own.stats()["requests"])
    return _paid_run(
        "rebalance, 1 of 2 SIGKILLed", cache, positions, outputs, requests, in_flight, started
    )


# ---- (b) and (c) rows/s ------------------------------------------------------------------------


@dataclass(frozen=True)
class RateRun:
    label: str
    cache: str
    rows: int
    received: int
    start_to_last_s: float
    first_to_last_s: float
    request_to_last_s: float | None
    cpu_s: float | None
    cpu_start_up_s: float | None  # before the first LLM request: imports, table, group join
    requests: int
    round: int

    def rate(self, seconds: float | None) -> float:
        return self.rows / seconds if seconds else math.nan

    @property
    def first_to_last(self) -> float:
        return self.rate(self.first_to_last_s)

    @property
    def request_to_last(self) -> float:
        return self.rate(self.request_to_last_s)

    @property
    def cpu_per_1000(self) -> float | None:
        return None if self.cpu_s is None else self.cpu_s / self.received * 1000


@dataclass(frozen=True)
class CacheOf:
    """Where a run kept its cache, so a replay can use the same topic and store."""

    topic: str
    state: Path


async def rate_run(
    broker: BrokerHandle,
    llm: FakeLLM,
    label: str,
    cache: str,
    rows: list[dict[str, Any]],
    workdir: Path,
    round_: int,
    reuse: CacheOf | None = None,
) -> tuple[RateRun, CacheOf]:
    """One consumer over `rows` on new topics; with `reuse`, that cache topic and store."""
    topics = Topics.unique(f"bench-cache-rate-{cache}")
    await create_topics(broker.bootstrap, [topics.input, topics.output, topics.dlq], 3)
    await publish(broker.bootstrap, topics.input, rows_to_messages(rows))
    llm.reset()
    where = reuse or CacheOf(f"{topics.group}.llm-cache", workdir / f"state-{topics.group}")
    path = _consumer_settings(workdir, broker, llm, topics, Contender(), RATE_CONCURRENCY)
    settings = yaml.safe_load(path.read_text())
    settings["llm"]["cache"] = {"backend": cache, "topic": where.topic}
    settings["state"] = {"directory": str(where.state)}
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    proc = ConsumerProcess(path, workdir / f"{topics.input}.log")
    started_wall = time.time()
    proc.start()
    assert proc.process is not None
    pid = proc.process.pid
    at_request: dict[str, float | None] = {}
    first_request = asyncio.create_task(
        _first_request(llm, lambda: at_request.update(cpu=cpu_seconds(pid)))
    )
    cpu: float | None = None
    try:
        records = await _collect(
            broker.bootstrap,
            topics.output,
            len(rows),
            300,
            lambda: proc.process is not None and proc.process.poll() is None,
        )
        cpu = cpu_seconds(pid)
    finally:
        code = proc.stop(timeout_s=30)
        first_request.cancel()
        await asyncio.gather(first_request, return_exceptions=True)
    if code != 0 or len(records) < len(rows):
        raise RuntimeError(
            f"{label}: {len(records)} of {len(rows)} rows, exit {code}: {proc.log_path}"
        )
    request_wall = None if first_request.cancelled() else first_request.result()
    first_ms = min(ts for ts, _ in records)
    last_ms = max(ts for ts, _ in records)
    run = RateRun(
        label=label,
        cache=cache,
        rows=len(rows),
        received=len(records),
        start_to_last_s=last_ms / 1000 - started_wall,
        first_to_last_s=(last_ms - first_ms) / 1000,
        request_to_last_s=None if request_wall is None else last_ms / 1000 - request_wall,
        cpu_s=cpu,
        cpu_start_up_s=at_request.get("cpu"),
        requests=int(llm.stats()["requests"]),
        round=round_,
    )
    return run, where


# ---- report ----------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def paid_table(runs: Sequence[PaidRun]) -> list[str]:
    lines = [
        "| scenario | cache | distinct prompts | paid requests | paid per prompt | in flight at "
        "the kills | missing | duplicate outputs | hits | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.scenario} | {r.cache} | {r.distinct} | {r.requests} | {r.per_prompt:.4f} "
        f"| {r.in_flight_at_kills} | {r.missing} | {r.duplicates} | {r.hits} | {r.seconds:.0f} |"
        for r in runs
    ]
    return lines


def rate_table(runs: Sequence[RateRun], reference: str) -> list[str]:
    """One line per run; the ratio is first->last against the `reference` run of its round."""
    base = {r.round: r.first_to_last for r in runs if r.label == reference}
    lines = [
        "| run | round | rows | first->last rows/s | ratio | request->last rows/s "
        "| start->last rows/s | CPU s / 1,000 rows | CPU s before 1st request | LLM requests |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ratio = r.first_to_last / base[r.round] if r.round in base else math.nan
        lines.append(
            f"| {r.label} | {r.round} | {r.received}/{r.rows} | {_f(r.first_to_last)} "
            f"| {_f(ratio, 3)} | {_f(r.request_to_last)} | {_f(r.rate(r.start_to_last_s))} "
            f"| {_f(r.cpu_per_1000, 2)} | {_f(r.cpu_start_up_s, 2)} | {r.requests} |"
        )
    return lines


def _mean_ratio(runs: Sequence[RateRun], label: str, reference: str) -> float:
    base = {r.round: r.first_to_last for r in runs if r.label == reference}
    ratios = [r.first_to_last / base[r.round] for r in runs if r.label == label and r.round in base]
    return sum(ratios) / len(ratios) if ratios else math.nan


def report(
    paid: Sequence[PaidRun],
    miss: Sequence[RateRun],
    hit: Sequence[RateRun],
    load_before: float,
) -> str:
    out = [
        f"Host: {os.cpu_count()} CPUs, Python {platform.python_version()}, load average before "
        f"the run {load_before:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
    ]
    if paid:
        out += [
            f"### (a) Paid calls per distinct prompt (fake LLM {PAID_LATENCY_MS} ms, concurrency "
            f"{PAID_CONCURRENCY}, windows of 200 rows; goal with kafka <= 1.01)",
            "",
            *paid_table(paid),
            "",
        ]
    if miss:
        cost = 1 - _mean_ratio(miss, MISS, "off")
        out += [
            f"### (b) rows/s, every lookup a miss (fake LLM {RATE_LATENCY_MS} ms, concurrency "
            f"{RATE_CONCURRENCY}, ideal {RATE_CONCURRENCY * 1000 // RATE_LATENCY_MS} rows/s, "
            "consumer's default windows; goal: the cache costs <= 5 %)",
            "",
            *rate_table(miss, "off"),
            "",
            f"Cost of the kafka cache, first->last, mean of the rounds: {100 * cost:.1f} %.",
            "",
        ]
    if hit:
        gain = _mean_ratio(hit, HIT, KAFKA_BOUND)
        out += [
            "### (c) rows/s on a replay where every lookup is a hit, against the cache off with a "
            "0 ms fake LLM (Kafka-bound)",
            "",
            *rate_table(hit, KAFKA_BOUND),
            "",
            f"Replay / Kafka-bound, first->last, mean of the rounds: {gain:.3f}.",
            "",
        ]
    return "\n".join(out)


def write(text: str, path: Path) -> None:
    """Replace the block between the markers (or append it), keeping the prose around it."""
    block = f"{MARKER}\n{text}{MARKER}\n"
    old = path.read_text() if path.exists() else ""
    if old.count(MARKER) >= 2:
        before, _, rest = old.partition(MARKER)
        _, _, after = rest.partition(MARKER)
        new = before + block + after.lstrip("\n")
    else:
        new = (old + "\n" if old else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


# ---- main ------------------------------------------------------------------------------------


async def part_a(broker: BrokerHandle, args: argparse.Namespace, workdir: Path) -> list[PaidRun]:
    runs: list[PaidRun] = []
    with fake_llm_process("--latency-ms", str(PAID_LATENCY_MS), "--jitter-ms", "0") as llm:
        for cache in ("off", "kafka"):
            print(f"(a) crash, cache {cache} ...", flush=True)
            runs.append(
                await crash(broker.bootstrap, llm, cache, args.crash_rows, args.kills, workdir)
            )
            print(f"  {runs[-1]}", flush=True)
        for cache in ("off", "kafka"):
            print(f"(a) rebalance, cache {cache} ...", flush=True)
            runs.append(await rebalance(broker.bootstrap, llm, cache, args.crash_rows, workdir))
            print(f"  {runs[-1]}", flush=True)
    return runs


async def part_b(
    broker: BrokerHandle, llm: FakeLLM, args: argparse.Namespace, workdir: Path
) -> tuple[list[RateRun], list[dict[str, Any]], CacheOf]:
    """Off and kafka in turn; the rows and cache of the last kafka run, for the replay."""
    runs: list[RateRun] = []
    replay: tuple[list[dict[str, Any]], CacheOf] | None = None
    for round_ in range(1, args.rounds + 1):
        for cache, label in (("off", "off"), ("kafka", MISS)):
            rows = distinct_rows(args.rate_rows, f"{cache}-{round_}")
            print(f"(b) {label}, round {round_} ...", flush=True)
            run, where = await rate_run(broker, llm, label, cache, rows, workdir, round_)
            runs.append(run)
            print(f"  {run.first_to_last:.0f} rows/s first->last", flush=True)
            if cache == "kafka":
                replay = (rows, where)
    assert replay is not None
    return runs, *replay


async def part_c(
    broker: BrokerHandle,
    llm: FakeLLM,
    args: argparse.Namespace,
    workdir: Path,
    rows: list[dict[str, Any]],
    where: CacheOf,
) -> list[RateRun]:
    runs: list[RateRun] = []
    replay = rows * args.replay_copies
    with fake_llm_process("--latency-ms", "0", "--jitter-ms", "0") as fast:
        for round_ in range(1, args.rounds + 1):
            print(f"(c) {KAFKA_BOUND}, round {round_} ...", flush=True)
            yardstick = distinct_rows(len(replay), f"fast-{round_}")
            run, _ = await rate_run(broker, fast, KAFKA_BOUND, "off", yardstick, workdir, round_)
            runs.append(run)
            print(f"  {run.first_to_last:.0f} rows/s first->last", flush=True)
            print(f"(c) {HIT}, round {round_} ...", flush=True)
            run, _ = await rate_run(broker, llm, HIT, "kafka", replay, workdir, round_, where)
            runs.append(run)
            print(f"  {run.first_to_last:.0f} rows/s first->last, {run.requests} LLM requests")
    return runs


async def main_async(args: argparse.Namespace) -> str:
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    paid: list[PaidRun] = []
    miss: list[RateRun] = []
    hit: list[RateRun] = []
    with kafka_broker() as broker:
        if "a" in args.parts:
            paid = await part_a(broker, args, workdir)
        if "b" in args.parts:
            with fake_llm_process("--latency-ms", str(RATE_LATENCY_MS), "--jitter-ms", "0") as llm:
                miss, rows, where = await part_b(broker, llm, args, workdir)
                if "c" in args.parts:
                    hit = await part_c(broker, llm, args, workdir, rows, where)
    print(f"logs and settings in {workdir}")
    return report(paid, miss, hit, load_before)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="a,b,c", help="which parts to run: a, b, c")
    parser.add_argument("--crash-rows", type=int, default=3000, help="distinct rows in (a)")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs in the crash scenario")
    parser.add_argument("--rate-rows", type=int, default=6000, help="rows per run in (b), (c)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (b) and (c), in turn")
    parser.add_argument(
        "--replay-copies",
        type=int,
        default=4,
        help="(c) publishes the rows of (b) this many times (every copy a hit), so the replay "
        "lasts long enough to measure; the 0 ms run gets as many distinct rows",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    args.parts = set(args.parts.split(","))
    if not args.parts <= {"a", "b", "c"}:
        parser.error(f"--parts takes a, b and c, got {','.join(sorted(args.parts))}")
    if "c" in args.parts and "b" not in args.parts:
        parser.error("--parts c replays the rows of the last kafka run of b: add b")
    return args


def main() -> int:
    args = parse_args()
    # Publishing to topics created a moment ago logs a retried NotLeaderForPartition or two.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    started = time.monotonic()
    text = asyncio.run(main_async(args))
    print()
    print(text)
    print(f"{time.monotonic() - started:.0f} s in all")
    if not args.no_write:
        write(text, args.out)
        print(f"written to {args.out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
