"""Report step: a finished window is counted in the metrics and logged once, then forgotten."""

from __future__ import annotations

import logging

import pytest

from consumer.enrich.outcome import RowOutcome
from consumer.pipeline.encode import EncodedWindow, EncodeStep
from consumer.pipeline.enrich import EnrichedWindow
from consumer.pipeline.protocol import Deadline
from consumer.pipeline.report import ReportStep, Tally, offset_ranges
from consumer.records import OutgoingRecord
from consumer.window import Window
from tests.unit.pipeline.recording import (
    DLQ,
    TP1,
    FakeClock,
    Recording,
    dead_item,
    encoder,
    retryable_failure,
    row_item,
    success,
    window,
)


class FakeMetrics:
    def __init__(self) -> None:
        self.windows: list[tuple[Window, list[RowOutcome], float]] = []

    def window_done(self, window: Window, outcomes: list[RowOutcome], seconds: float) -> None:
        self.windows.append((window, outcomes, seconds))


def finished(replace_last_with_dlq: bool = False) -> EncodedWindow:
    ok, failed = success(), retryable_failure()
    items = [row_item(3), dead_item(4), row_item(5), row_item(0, tp=TP1)]
    outcomes: list[RowOutcome | None] = [ok, None, failed, ok]
    enriched = EnrichedWindow(window(*items, window_id="w-9"), outcomes, 10.0)
    records = EncodeStep(encoder(), Recording()).encode(enriched)
    if replace_last_with_dlq:  # an output the broker refused, now a dead letter
        last = records[-1]
        records[-1] = OutgoingRecord(DLQ, last.key, last.value, last.headers)
    return EncodedWindow(enriched, records)


def step(metrics: FakeMetrics, clock: FakeClock, tally: Tally | None = None) -> ReportStep:
    return ReportStep(metrics, tally or Tally(), DLQ, lambda: 12.34, clock)


def test_window_done_gets_the_outcomes_of_rows_only_and_the_time_it_took() -> None:
    metrics = FakeMetrics()
    value = finished()
    step(metrics, FakeClock(12.5)).submit(value)
    [(reported, outcomes, seconds)] = metrics.windows
    assert reported is value.enriched.window
    assert outcomes == [value.enriched.outcomes[i] for i in (0, 2, 3)]
    assert seconds == 2.5


def test_the_log_line_counts_rows_errors_and_dead_letters_by_the_dlq_topic(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="consumer")
    step(FakeMetrics(), FakeClock(12.5)).submit(finished(replace_last_with_dlq=True))
    [line] = [r for r in caplog.records if r.getMessage() == "window done"]
    assert line.window_id == "w-9"  # type: ignore[attr-defined]
    assert line.rows == 3  # type: ignore[attr-defined]
    assert line.row_errors == 1  # type: ignore[attr-defined]
    # The dead-lettered input and the refused output, both on the DLQ topic.
    assert line.dead_letters == 2  # type: ignore[attr-defined]
    assert line.close_reason == "count"  # type: ignore[attr-defined]
    assert line.seconds == 2.5  # type: ignore[attr-defined]
    assert line.limit == 12.3  # type: ignore[attr-defined]
    assert line.partitions == {"in/0": "3-5", "in/1": "0-0"}  # type: ignore[attr-defined]


def test_the_tally_counts_rows_and_dead_letters_finished_across_windows() -> None:
    tally = Tally()
    report = step(FakeMetrics(), FakeClock(12.5), tally)
    report.submit(finished())
    report.submit(finished(replace_last_with_dlq=True))
    # 4 items each: 3 rows and 1 dead letter, then 2 and 2 (a refused output is a dead letter).
    assert (tally.rows, tally.dead_letters) == (5, 3)
    assert tally.finished == 8
    assert tally.consumed == 0  # counted when consumed, by the decode step's callback


def test_offset_ranges_span_the_lowest_to_the_highest_offset_per_partition() -> None:
    items = [row_item(7), row_item(2), row_item(9), row_item(4, tp=TP1)]
    assert offset_ranges(items) == {"in/0": "2-9", "in/1": "4-4"}


async def test_the_last_step_has_nothing_to_poll_close_join_or_terminate() -> None:
    report = step(FakeMetrics(), FakeClock())
    report.poll()
    report.close()
    await report.join(Deadline(0.0, FakeClock()))
    report.terminate()
