"""AIMD benchmark: the real limiter + caller + client against the fake LLM server process.

    .venv/bin/python bench/aimd/run.py            # ~75 s, writes bench/aimd/{report.md,aimd.png}

Four strategies run at the same time, each in its own process against its own fake server
with the same capacity schedule (40 concurrent for 20 s, then 15, then 60; 100 ms latency):
our AIMD limiter, fixed limits of 10 and 100 (the same limiter pinned, so they honour
Retry-After too), and a delay-only AIMD like elspeth's (fixed pool, x2 delay per capacity
error, -50 ms per success, Retry-After ignored). Each keeps `--outstanding` rows open (closed
loop): a row that ends without an answer (retries or retry budget spent) is started again, as
the consumer's window hold-back would, and counts its attempts across both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from consumer.config import LLMSettings, RetrySettings  # noqa: E402
from consumer.llm.caller import LLMCaller  # noqa: E402
from consumer.llm.client import ChatClient  # noqa: E402
from consumer.llm.errors import FailureKind, LLMFailure  # noqa: E402
from consumer.llm.limiter import AIMDLimiter  # noqa: E402

HERE = Path(__file__).resolve().parent
SCHEDULE = [(40, 20.0), (15, 20.0), (60, 20.0)]
STRATEGIES = ("aimd", "oracle", "fixed-10", "fixed-100", "delay-aimd")
SAMPLE_S = 0.1


def schedule_text(schedule: list[tuple[int, float]]) -> str:
    return ",".join(f"{cap}:{secs:g}" for cap, secs in schedule)


def capacity_at(t: float, schedule: list[tuple[int, float]]) -> int:
    for cap, secs in schedule:
        if t < secs:
            return cap
        t -= secs
    return schedule[-1][0]


# ---- worker ---------------------------------------------------------------------------------


@dataclass
class Run:
    t0: float
    rows: list[tuple[float, float, int]] = field(default_factory=list)  # (done_t, latency, tries)
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (t, limit, in_flight)
    attempts: int = 0
    rows_restarted: int = 0


class DelayThrottle:
    """elspeth's AIMDThrottle: a delay, x2 per capacity error, -step per success, capped."""

    def __init__(self, step_ms: float = 50.0, max_ms: float = 5000.0) -> None:
        self.delay_ms = 0.0
        self.step = step_ms
        self.max = max_ms

    def on_capacity_error(self) -> None:
        self.delay_ms = min(self.max, self.step if self.delay_ms == 0 else self.delay_ms * 2.0)

    def on_success(self) -> None:
        self.delay_ms = max(0.0, self.delay_ms - self.step)


def llm_settings(url: str, maximum: int) -> LLMSettings:
    return LLMSettings.model_validate(
        {
            "provider": "openai",
            "base_url": f"{url}/v1",
            "model": "bench",
            "api_key": "bench",
            "template": "{{ row.text }}",
            "max_tokens": 16,
            "request_timeout_s": 30,
            "concurrency": {"initial": min(16, maximum), "min": 1, "max": maximum},
        }
    )


async def worker(strategy: str, url: str, duration: float, outstanding: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as admin:
        # restart the server's schedule now, so its clock and ours agree
        reply = await admin.post(
            f"{url}/admin/config", json={"capacity_schedule": schedule_text(SCHEDULE)}
        )
        reply.raise_for_status()
        await admin.post(f"{url}/admin/reset")
    run = Run(t0=time.monotonic())
    maximum = {"aimd": 128, "oracle": 128, "fixed-10": 10, "fixed-100": 100}.get(strategy, 100)
    settings = llm_settings(url, maximum)
    client = ChatClient(settings)
    retry = RetrySettings(initial_backoff_s=0.05, max_backoff_s=1.0)
    if strategy == "aimd":
        limiter = AIMDLimiter.from_settings(settings.concurrency)
    elif strategy == "oracle":
        limiter = AIMDLimiter(SCHEDULE[0][0], 1, maximum, probe_step=None, fast_climb=False)
    else:
        limiter = AIMDLimiter(maximum, maximum, maximum)
    caller = LLMCaller(client, limiter, retry)
    pool = asyncio.Semaphore(maximum)
    throttle = DelayThrottle()
    in_flight = [0]
    messages = [{"role": "user", "content": "a great product, I love it"}]
    stop_at = run.t0 + duration

    async def oracle_follows_the_schedule() -> None:
        """The oracle: a fixed limit that always equals the hidden capacity (best possible)."""
        while time.monotonic() < stop_at:
            cap = capacity_at(time.monotonic() - run.t0, SCHEDULE)
            limiter._limit = float(cap)  # a bench-only oracle
            limiter._wake()
            await asyncio.sleep(0.01)

    async def delay_row() -> int:
        tries = 0
        while True:
            async with pool:
                tries += 1
                in_flight[0] += 1
                try:
                    await client.complete(messages)
                    throttle.on_success()
                    return tries
                except LLMFailure as error:
                    if error.kind is FailureKind.BACKPRESSURE:
                        throttle.on_capacity_error()
                    elif not error.kind.retryable:
                        return tries
                finally:
                    in_flight[0] -= 1
                # elspeth releases the permit while it sleeps the current delay
            await asyncio.sleep(throttle.delay_ms / 1000.0)

    async def limiter_row() -> int:
        tries = 0
        while True:
            result = await caller.call(messages)
            tries += result.attempts
            if result.completion is not None or time.monotonic() >= stop_at:
                return tries
            run.rows_restarted += 1

    async def row_loop() -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            tries = await (delay_row() if strategy == "delay-aimd" else limiter_row())
            run.attempts += tries
            now = time.monotonic()
            if now < stop_at:
                run.rows.append((now - run.t0, now - started, tries))

    async def sampler() -> None:
        while time.monotonic() < stop_at:
            t = time.monotonic() - run.t0
            if strategy == "delay-aimd":
                run.samples.append((t, float(maximum), in_flight[0]))
            else:
                state = limiter.state()
                run.samples.append((t, state.limit, state.in_flight))
            await asyncio.sleep(SAMPLE_S)

    sampling = asyncio.create_task(sampler())
    if strategy == "oracle":
        follower = asyncio.create_task(oracle_follows_the_schedule())
    loops = [asyncio.create_task(row_loop()) for _ in range(outstanding)]
    await asyncio.sleep(duration)
    for task in loops:
        task.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    await sampling
    if strategy == "oracle":
        await follower
    await client.aclose()
    async with httpx.AsyncClient() as admin:
        stats = (await admin.get(f"{url}/admin/stats")).json()
    return {
        "strategy": strategy,
        "rows": run.rows,
        "samples": run.samples,
        "rows_restarted": run.rows_restarted,
        "server": stats,
        "decreases": limiter.state().decreases if strategy != "delay-aimd" else None,
    }


# ---- analysis -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def goodput_series(rows: list[list[float]], duration: float) -> list[float]:
    """Successful rows per second, in 1 s bins."""
    bins = [0.0] * int(duration)
    for done, _, _ in rows:
        if int(done) < len(bins):
            bins[int(done)] += 1
    return bins


def settle_time(
    series: list[float], change_at: int, end_at: int, target: float, within: float = 0.15
) -> float | None:
    """Seconds after `change_at` until the 1 s goodput stays within `within` of `target`."""
    settled: int | None = None
    for second in range(change_at, end_at):
        ok = abs(series[second] - target) <= within * target
        if ok and settled is None:
            settled = second
        elif not ok:
            settled = None
    return None if settled is None else float(settled - change_at + 1)


def limit_settle_time(
    samples: list[list[float]], change_at: float, end_at: float, cap: int
) -> float | None:
    """Seconds after a change until the limit stays in [0.7, 1.1] x capacity (+-1)."""
    settled: float | None = None
    for t, limit, _ in samples:
        if not change_at <= t < end_at:
            continue
        ok = 0.7 * cap - 1 <= limit <= 1.1 * cap + 1
        if ok and settled is None:
            settled = t
        elif not ok:
            settled = None
    return None if settled is None else settled - change_at


def analyse(result: dict[str, Any], latency_s: float) -> dict[str, Any]:
    rows = result["rows"]
    duration = sum(secs for _, secs in SCHEDULE)
    series = goodput_series(rows, duration)
    ideal = [capacity_at(s + 0.5, SCHEDULE) / latency_s for s in range(int(duration))]
    server = result["server"]
    requests = max(1, server["requests"])
    attempts = sum(tries for _, _, tries in rows)
    segments = []
    start = 0.0
    for cap, secs in SCHEDULE:
        lo, hi = int(start), int(start + secs)
        done = sum(series[lo:hi])
        segments.append(
            {
                "capacity": cap,
                "goodput_share": done / (cap / latency_s * secs),
                "done": done,
                "limit_settle_s": limit_settle_time(result["samples"], lo, hi, cap),
            }
        )
        start += secs
    latencies = [lat for _, lat, _ in rows]
    return {
        "strategy": result["strategy"],
        "rows": len(rows),
        "goodput_share": sum(series) / sum(ideal),
        "share_429": server["by_status"].get("429", 0) / requests,
        "requests": server["requests"],
        "attempts_per_row": attempts / max(1, len(rows)),
        "p50_s": percentile(latencies, 0.5),
        "p99_s": percentile(latencies, 0.99),
        "segments": segments,
        "decreases": result["decreases"],
        "rows_restarted": result["rows_restarted"],
        "series": series,
        "ideal": ideal,
    }


def relate_to_oracle(analyses: list[dict[str, Any]]) -> None:
    """Goodput against what the harness can deliver at all: the oracle's rows per segment."""
    oracle = next((a for a in analyses if a["strategy"] == "oracle"), None)
    for a in analyses:
        start = 0
        for index, seg in enumerate(a["segments"]):
            secs = int(SCHEDULE[index][1])
            if oracle is None:
                seg["vs_oracle"] = None
                seg["settle_s"] = None
            else:
                best = oracle["segments"][index]
                seg["vs_oracle"] = seg["done"] / max(1.0, best["done"])
                target = best["done"] / secs
                seg["settle_s"] = settle_time(a["series"], start, start + secs, target)
            start += secs
        if oracle is not None:
            a["vs_oracle"] = sum(a["series"]) / max(1.0, sum(oracle["series"]))
        else:
            a["vs_oracle"] = None


def plot(results: list[dict[str, Any]], analyses: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    duration = sum(secs for _, secs in SCHEDULE)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    steps_t = [0.0]
    steps_c = [SCHEDULE[0][0]]
    at = 0.0
    for cap, secs in SCHEDULE:
        steps_t += [at, at + secs]
        steps_c += [cap, cap]
        at += secs
    top.plot(steps_t, steps_c, color="black", lw=2.5, label="capacity (hidden)")
    colors = {"aimd": "tab:blue", "fixed-10": "tab:orange", "fixed-100": "tab:red"}
    colors["delay-aimd"] = "tab:green"
    colors["oracle"] = "tab:gray"
    for result in results:
        name = result["strategy"]
        t = [s[0] for s in result["samples"]]
        if name == "aimd":
            top.plot(t, [s[1] for s in result["samples"]], color=colors[name], label="AIMD limit")
        top.plot(
            t,
            [s[2] for s in result["samples"]],
            color=colors[name],
            lw=0.7,
            alpha=0.6,
            ls=":" if name == "aimd" else "-",
            label=f"{name} in flight",
        )
    top.set_ylabel("concurrent requests")
    top.set_ylim(0, 110)
    top.legend(loc="upper left", fontsize=8, ncol=2)
    top.set_title("Limit and in-flight requests against a hidden capacity schedule (100 ms)")
    seconds = [s + 0.5 for s in range(int(duration))]
    bottom.step(seconds, analyses[0]["ideal"], where="mid", color="black", lw=2.5, label="ideal")
    for analysis in analyses:
        name = analysis["strategy"]
        bottom.plot(seconds, analysis["series"], color=colors[name], label=name)
    bottom.set_ylabel("answered rows / s")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "never" if value is None else format(value, spec)


def report(analyses: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> str:
    changes = " / ".join(f"->{cap}" for cap, _ in SCHEDULE)
    lines = [
        "# AIMD benchmark",
        "",
        f"Generated by `bench/aimd/run.py` ({time.strftime('%Y-%m-%d %H:%M')}). Fake server: "
        f"capacity schedule `{schedule_text(SCHEDULE)}` (concurrent:seconds), "
        f"{args.latency_ms:g} ms latency, Retry-After {args.retry_after_s} s on its 429s; "
        f"{args.outstanding} rows always open per strategy (closed loop). Phases "
        f"`{args.phases}` (strategies in one phase run at once, each with its own server).",
        "",
        "![limit and capacity over time](aimd.png)",
        "",
        "- goodput/nominal: answered rows / (capacity / latency); goodput/oracle: answered rows /"
        " those of the oracle (a limit that always equals the hidden capacity; what this harness"
        " can deliver at all, HTTP and event-loop overhead included).",
        "- settle: seconds after each change until the 1 s goodput stays within 15 % of the"
        " oracle's for the rest of the segment; limit settle (limiters): until the limit stays"
        " within [0.7, 1.1] x capacity +-1.",
        "",
        f"| strategy | goodput/nominal | goodput/oracle | 429 share | attempts/row | settle "
        f"{changes} (s) | limit settle {changes} (s) | p50 row (s) | p99 row (s) | decreases |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in analyses:
        settles = " / ".join(fmt(seg["settle_s"], ".0f") for seg in a["segments"])
        limit_settles = " / ".join(fmt(seg["limit_settle_s"], ".1f") for seg in a["segments"])
        lines.append(
            f"| {a['strategy']} | {a['goodput_share']:.3f} | {fmt(a['vs_oracle'], '.3f')} | "
            f"{a['share_429']:.3f} | {a['attempts_per_row']:.3f} | {settles} | {limit_settles} | "
            f"{a['p50_s']:.3f} | {a['p99_s']:.3f} | "
            f"{a['decreases'] if a['decreases'] is not None else '-'} |"
        )
    lines += [
        "",
        "Goodput per segment, nominal (oracle-relative in brackets):",
        "",
        "| strategy | " + " | ".join(f"cap {cap}" for cap, _ in SCHEDULE) + " |",
        "|---|" + "---|" * len(SCHEDULE),
    ]
    for a in analyses:
        cells = " | ".join(
            f"{seg['goodput_share']:.3f} ({fmt(seg['vs_oracle'], '.3f')})" for seg in a["segments"]
        )
        lines.append(f"| {a['strategy']} | {cells} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


# ---- orchestration --------------------------------------------------------------------------


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "consumer.fake_llm", "--port", "0"]
    command += ["--latency-ms", str(args.latency_ms), "--capacity", "1"]
    command += ["--retry-after-s", str(args.retry_after_s)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    url = line.strip().rsplit(" ", 1)[-1]
    if not url.startswith("http"):
        raise RuntimeError(f"fake-llm did not start: {line!r}")
    return process, url


def run_phase(strategies: list[str], args: argparse.Namespace, duration: float) -> list[Path]:
    """Run some strategies at the same time, each against its own fake server process."""
    servers = [start_server(args) for _ in strategies]
    workers = []
    outs = []
    try:
        for strategy, (_, url) in zip(strategies, servers, strict=True):
            out = HERE / f".result-{strategy}.json"
            outs.append(out)
            command = [sys.executable, __file__, "--worker", strategy, "--url", url]
            command += ["--out", str(out), "--outstanding", str(args.outstanding)]
            workers.append(subprocess.Popen(command, cwd=ROOT))
        for process in workers:
            if process.wait(duration + 60) != 0:
                raise RuntimeError("a bench worker failed")
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(10)
    return outs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=STRATEGIES)
    parser.add_argument("--url")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--retry-after-s", default="0.1")
    parser.add_argument("--outstanding", type=int, default=150)
    parser.add_argument(
        "--phases",
        default="aimd;oracle,fixed-10;fixed-100;delay-aimd",
        help="strategies run together, phases one after another (';' between phases): on a "
        "small machine, strategies running at once share the CPU and distort each other",
    )
    parser.add_argument("--reanalyse", action="store_true", help="analyse the kept raw results")
    parser.add_argument("--report", type=Path, default=HERE / "report.md")
    parser.add_argument("--plot", type=Path, default=HERE / "aimd.png")
    args = parser.parse_args()
    duration = sum(secs for _, secs in SCHEDULE)
    if args.worker:
        result = asyncio.run(worker(args.worker, args.url, duration, args.outstanding))
        args.out.write_text(json.dumps(result))
        return 0

    outs = []
    for phase in args.phases.split(";"):
        if args.reanalyse:  # the raw results of the last run, kept when analysis failed
            outs += [HERE / f".result-{strategy}.json" for strategy in phase.split(",")]
        else:
            outs += run_phase(phase.split(","), args, duration)
    results = [json.loads(out.read_text()) for out in outs]
    analyses = [analyse(result, args.latency_ms / 1000.0) for result in results]
    relate_to_oracle(analyses)
    plot(results, analyses, args.plot)
    print(report(analyses, args, args.report))
    for out in outs:
        out.unlink()
    for a in analyses:
        print(a["strategy"], statistics.mean(a["series"][-5:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
