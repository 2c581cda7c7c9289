"""The limiter against a server that queues instead of answering 429: does it settle at the slots?

    .venv/bin/python bench/aimd/queue_fake.py [--slots 4] [--seconds 30] [--fixed 4,5,6]
    .venv/bin/python bench/aimd/queue_fake.py --url http://127.0.0.1:18090/v1 --model smollm2

Without `--url` the fake LLM runs as a real process: it serves `--slots` requests at once and
queues the rest FIFO (`overload: queue`, never a 429); each request takes `--latency-ms` plus
`--per-served-ms` per request being served (CPU batching). With `--url` no fake is started: the
runs go to that OpenAI-compatible API base (a llama.cpp or vLLM server started by hand), with
`--pause` seconds between runs for its queue to drain. The production caller, limiter and
client run with their defaults (the queue probe is on until a provider sends rate-limit
headers), then with fixed limits for reference; each keeps `--outstanding` rows open.
Reported per run: rows/s (whole run and second half), the limit over the second half (mean,
min-max: whether it still moves), the p50 of the second half's attempt round trips, and the
failed attempts by reason; then ours against the best fixed limit (highest second-half rows/s).
`--trace` logs the limiter's queue-probe steps and the limit every 5 s to stderr. Ours runs as
the consumer does: with `--server-slots auto` (the default) it asks the server's `GET /props`
first, and a llama.cpp server's `total_slots` caps the limit (the fake answers it with
`--announce-slots`); `--server-slots null` leaves it to the latency probe.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from consumer.config import LLMSettings, RetrySettings  # noqa: E402
from consumer.llm.caller import LLMCaller  # noqa: E402
from consumer.llm.client import ChatClient, Completion  # noqa: E402
from consumer.llm.errors import LLMFailure  # noqa: E402
from consumer.llm.limiter import AIMDLimiter  # noqa: E402
from consumer.llm.selfhosted import fit_to_server  # noqa: E402
from tests.support.fake_llm_process import fake_llm_process  # noqa: E402

_TRACE_EVERY_S = 5.0


def _server_slots(text: str) -> int | str | None:
    """`auto` (the default: ask the server's /props), `null` (never: the latency probe), N."""
    return None if text == "null" else text if text == "auto" else int(text)


@dataclass
class Result:
    """One run's figures; the second half is where a limiter should have settled."""

    rows_per_s: float
    rows_per_s_late: float
    limit_mean: float
    limit_min: float
    limit_max: float
    p50_attempt_s: float
    errors: Counter[str] = field(default_factory=Counter)


async def run(api_base: str, fixed: int | None, args: argparse.Namespace) -> Result:
    settings = LLMSettings.model_validate(
        {
            "provider": "openai",
            "base_url": api_base,
            "model": args.model,
            "api_key": "bench",
            "template": "{{ row.text }}",
            "max_tokens": args.max_tokens,
            "concurrency": {"server_slots": _server_slots(args.server_slots)},
        }
    )
    client = ChatClient(settings)
    errors: Counter[str] = Counter()

    def count(_model: str, _secs: float, _done: Completion | None, fail: LLMFailure | None) -> None:
        if fail is not None:
            errors[
                fail.reason if fail.status_code is None else f"{fail.status_code} {fail.reason}"
            ] += 1

    client.on_attempt = count
    if fixed is None:
        limiter = AIMDLimiter.from_settings(settings.concurrency)
        await fit_to_server(settings, limiter)  # as the consumer does at start
    else:
        limiter = AIMDLimiter(fixed, fixed, fixed, latency_signal=False)
    start = time.monotonic()
    half = start + args.seconds / 2
    stop = start + args.seconds
    late_attempts: list[float] = []

    def attempted(_status: str, secs: float, _attempt: int) -> None:
        if time.monotonic() >= half:
            late_attempts.append(secs)

    caller = LLMCaller(client, limiter, RetrySettings(), on_attempt=attempted)
    messages = [{"role": "user", "content": args.prompt}]
    done = [0, 0]  # rows answered in the whole run, in its second half
    limits: list[float] = []

    async def row() -> None:
        while time.monotonic() < stop:
            result = await caller.call(messages)
            now = time.monotonic()
            if result.completion is not None and now < stop:
                done[0] += 1
                done[1] += now >= half

    async def sample() -> None:
        traced = start
        while time.monotonic() < stop:
            now = time.monotonic()
            if now >= half:
                limits.append(limiter.limit)
            if args.trace and now - traced >= _TRACE_EVERY_S:
                traced = now
                state = limiter.state()
                print(
                    f"  t={now - start:5.1f}s limit={state.limit:.2f} in_flight={state.in_flight}"
                    f" waiting={state.waiting}",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(row()) for _ in range(args.outstanding)]
    await sample()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()
    nan = float("nan")
    return Result(
        rows_per_s=done[0] / args.seconds,
        rows_per_s_late=done[1] / (args.seconds / 2),
        limit_mean=statistics.mean(limits) if limits else nan,
        limit_min=min(limits) if limits else nan,
        limit_max=max(limits) if limits else nan,
        p50_attempt_s=statistics.median(late_attempts) if late_attempts else nan,
        errors=errors,
    )


def _row(name: str, result: Result) -> str:
    errors = ", ".join(f"{reason}: {n}" for reason, n in sorted(result.errors.items())) or "-"
    return (
        f"| {name} | {result.rows_per_s:.2f} | {result.rows_per_s_late:.2f} | "
        f"{result.limit_mean:.1f} | {result.limit_min:.1f}-{result.limit_max:.1f} | "
        f"{result.p50_attempt_s:.3f} | {errors} |"
    )


async def compare(
    api_base: str, args: argparse.Namespace, reset: Callable[[], None] | None = None
) -> None:
    print(
        "| limiter | rows/s | rows/s, 2nd half | mean limit, 2nd half | limit range, 2nd half "
        "| p50 attempt, 2nd half (s) | failed attempts |"
    )
    print("|---|---|---|---|---|---|---|")
    results: dict[int | None, Result] = {}
    for index, fixed in enumerate([None, *(int(n) for n in args.fixed.split(",") if n)]):
        if reset is not None:
            reset()
        elif index:
            await asyncio.sleep(args.pause)  # a real server's queue drains
        name = "ours (defaults)" if fixed is None else f"fixed {fixed}"
        if args.trace:
            print(f"{name}:", file=sys.stderr, flush=True)
        results[fixed] = result = await run(api_base, fixed, args)
        print(_row(name, result), flush=True)
    ours = results.pop(None)
    if results:
        best = max(results, key=lambda n: results[n].rows_per_s_late)
        ref = results[best]
        print(
            f"\nbest fixed: {best} ({ref.rows_per_s_late:.2f} rows/s, p50 {ref.p50_attempt_s:.3f}"
            f" s); ours: {ours.rows_per_s_late / ref.rows_per_s_late:.3f} of its goodput, "
            f"{ours.p50_attempt_s / ref.p50_attempt_s:.2f}x its p50, mean limit "
            f"{ours.limit_mean:.1f} against {args.slots} slots",
            flush=True,
        )


async def main_async(args: argparse.Namespace) -> None:
    if args.url:
        await compare(args.url.rstrip("/"), args)
        return
    server = ["--capacity", str(args.slots), "--overload", "queue"]
    server += ["--latency-ms", str(args.latency_ms), "--jitter-ms", "0"]
    server += ["--latency-per-inflight-ms", str(args.per_served_ms)]
    if args.announce_slots:
        server.append("--announce-slots")
    with fake_llm_process(*server) as llm:
        await compare(f"{llm.base_url}/v1", args, reset=llm.reset)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an OpenAI-compatible API base (ends in /v1): no fake")
    parser.add_argument("--model", default="bench", help="the model name sent")
    parser.add_argument("--slots", type=int, default=4, help="the fake's slots (or the server's)")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--per-served-ms", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--outstanding", type=int, default=100)
    parser.add_argument("--fixed", default="4,5,6,8")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt", default="a great product")
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between runs (--url)")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument(
        "--server-slots", default="auto", help="llm.concurrency.server_slots: auto, null or N"
    )
    parser.add_argument(
        "--announce-slots", action="store_true", help="the fake answers /props as llama.cpp"
    )
    args = parser.parse_args()
    if args.trace:
        logging.basicConfig(stream=sys.stderr, format="  %(relativeCreated)8.0fms %(message)s")
        logging.getLogger("consumer.llm.limiter").setLevel(logging.DEBUG)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
