"""`run --progress`: a live line while the consumer runs, and a summary of the run at exit.

Everything is read from the app's own Prometheus registry by metric name, the figures an
operator sees on the dashboard, so the line and the dashboard cannot disagree and nothing in
the pipeline has to report to it. Series that do not exist in this build or configuration
(cost without prices) are left out rather than shown as 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TextIO

from prometheus_client import CollectorRegistry

from consumer.observability.metrics import PREFIX

# On a terminal the line is redrawn this often; in a log file a line is added this often.
_TERMINAL_EVERY_S = 1.0
_FILE_EVERY_S = 10.0


@dataclass(frozen=True)
class Snapshot:
    at: float
    consumed: float
    produced: float
    row_errors: dict[str, float]
    dead_letters: dict[str, float]
    tokens: float
    cost_usd: float | None
    lag: float
    limit: float


def _by_label(
    values: dict[str, list[tuple[dict[str, str], float]]], name: str, label: str
) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in values.get(name, []):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def _total(values: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float | None:
    samples = values.get(name)
    return None if samples is None else sum(value for _, value in samples)


def read(registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic) -> Snapshot:
    """The figures the line shows, summed over their labels."""
    values: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in registry.collect():
        for sample in family.samples:
            values.setdefault(sample.name, []).append((dict(sample.labels), sample.value))

    def total(name: str) -> float:
        return _total(values, f"{PREFIX}_{name}") or 0.0

    return Snapshot(
        at=clock(),
        consumed=total("rows_consumed_total"),
        produced=total("rows_produced_total"),
        row_errors=_by_label(values, f"{PREFIX}_row_errors_total", "reason"),
        dead_letters=_by_label(values, f"{PREFIX}_dead_letters_total", "reason"),
        tokens=total("llm_tokens_total"),
        cost_usd=_total(values, f"{PREFIX}_llm_cost_usd_total"),
        lag=total("consumer_lag"),
        limit=total("limiter_limit"),
    )


def _count(by_reason: dict[str, float]) -> int:
    return int(sum(by_reason.values()))


def _reasons(by_reason: dict[str, float]) -> str:
    shown = sorted(((v, k) for k, v in by_reason.items() if v > 0), reverse=True)
    return ", ".join(f"{k} {int(v)}" for v, k in shown)


def _cost(snapshot: Snapshot) -> str:
    return "" if snapshot.cost_usd is None else f", ${snapshot.cost_usd:.4f}"


def live_line(before: Snapshot, now: Snapshot) -> str:
    """rows/s over the last interval, lag, the limiter's limit, errors, tokens, cost."""
    elapsed = max(now.at - before.at, 1e-9)
    rate = (now.produced - before.produced) / elapsed
    return (
        f"{rate:7.1f} rows/s  {int(now.produced)} done  lag {int(now.lag)}  "
        f"limit {now.limit:.0f}  errors {_count(now.row_errors)}  "
        f"dlq {_count(now.dead_letters)}  tokens {int(now.tokens)}{_cost(now)}"
    )


def summary(start: Snapshot, end: Snapshot) -> str:
    """What the process did, in one line: for the person who started it."""
    elapsed = max(end.at - start.at, 1e-9)
    produced = end.produced - start.produced
    errors = {k: v - start.row_errors.get(k, 0.0) for k, v in end.row_errors.items()}
    letters = {k: v - start.dead_letters.get(k, 0.0) for k, v in end.dead_letters.items()}
    text = (
        f"run summary: {elapsed:.1f} s, {int(end.consumed - start.consumed)} rows consumed, "
        f"{int(produced)} outputs ({produced / elapsed:.1f} rows/s), "
        f"{_count(errors)} row errors"
    )
    if _count(errors):
        text += f" ({_reasons(errors)})"
    text += f", {_count(letters)} dead letters"
    if _count(letters):
        text += f" ({_reasons(letters)})"
    text += f", {int(end.tokens - start.tokens)} tokens"
    if end.cost_usd is not None:
        text += f", ${end.cost_usd - (start.cost_usd or 0.0):.4f}"
    return text


class ProgressLine:
    """Redraws the live line on a terminal (a new line every 10 s elsewhere) until cancelled;
    `finish()` clears it and writes the summary."""

    def __init__(
        self,
        registry: CollectorRegistry,
        out: TextIO,
        terminal: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._out = out
        self._terminal = terminal
        self._clock = clock
        self._start = read(registry, clock)
        self._width = 0

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        every = _TERMINAL_EVERY_S if self._terminal else _FILE_EVERY_S
        before = self._start
        while True:
            await sleep(every)
            now = read(self._registry, self._clock)
            self._write(live_line(before, now))
            before = now

    def finish(self) -> None:
        if self._terminal and self._width:
            self._out.write("\r" + " " * self._width + "\r")
        self._out.write(summary(self._start, read(self._registry, self._clock)) + "\n")
        self._out.flush()

    def _write(self, line: str) -> None:
        if self._terminal:
            self._out.write("\r" + line.ljust(self._width))
            self._width = max(self._width, len(line))
        else:
            self._out.write(line + "\n")
        self._out.flush()


async def with_progress(run: Awaitable[int], registry: CollectorRegistry) -> int:
    """`run` with the live line on stderr, and the run's summary once it ends."""
    line = ProgressLine(registry, sys.stderr, sys.stderr.isatty())
    drawing = asyncio.create_task(line.run(), name="progress")
    try:
        return await run
    finally:
        drawing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drawing
        line.finish()
