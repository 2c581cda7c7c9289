"""Log lines: JSON timestamps with zone and milliseconds, the libraries' chatter tamed, the
broker's loss and return said once each, and `run --log-level/--log-format`."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import datetime

import orjson
import pytest

from consumer.cli import build_parser
from consumer.observability.health import BrokerHealth
from consumer.observability.logs import (
    JsonFormatter,
    LibraryFilter,
    TextFormatter,
    configure_logging,
    iso_timestamp,
)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_json_timestamps_are_utc_with_milliseconds() -> None:
    record = _record("consumer", logging.INFO, "window done")
    record.created = 1_796_110_000.5
    line = orjson.loads(JsonFormatter().format(record))
    assert line["ts"] == "2026-12-01T07:26:40.500Z"
    assert datetime.fromisoformat(line["ts"]).utcoffset() is not None


def test_iso_timestamp_keeps_the_milliseconds_of_each_record() -> None:
    assert iso_timestamp(0.001) == "1970-01-01T00:00:00.001Z"
    assert iso_timestamp(0.999) == "1970-01-01T00:00:00.999Z"


def test_a_library_error_is_a_warning_and_ours_stays_an_error() -> None:
    keep = LibraryFilter(repeat_s=60.0, clock=_Clock())
    theirs = _record("aiokafka.client", logging.ERROR, "Unable connect to node with id %s", 1)
    ours = _record("consumer", logging.ERROR, "processing failed")
    assert keep.filter(theirs) and keep.filter(ours)
    assert (theirs.levelno, theirs.levelname) == (logging.WARNING, "WARNING")
    assert (ours.levelno, ours.levelname) == (logging.ERROR, "ERROR")
    critical = _record("aiokafka", logging.CRITICAL, "fatal")
    assert keep.filter(critical) and critical.levelno == logging.CRITICAL


def test_a_repeated_library_message_shows_once_per_interval_with_its_count() -> None:
    clock = _Clock()
    keep = LibraryFilter(repeat_s=60.0, clock=clock)
    template = "Unable connect to node with id %s: %s"
    shown = []
    for second in range(0, 130):  # two attempts a second for 130 s, different nodes
        clock.now = 1000.0 + second
        for node in (1, 2):
            record = _record("aiokafka.client", logging.ERROR, template, node, "refused")
            if keep.filter(record):
                shown.append((second, getattr(record, "repeats_hidden", 0)))
    assert shown == [(0, 0), (60, 119), (120, 119)]
    # Another message of the same logger is its own: it shows at once.
    other = _record("aiokafka.client", logging.WARNING, "Unable to update metadata from %s", 1)
    assert keep.filter(other)
    # Ours are never dropped, however often they repeat.
    assert all(keep.filter(_record("consumer", logging.WARNING, "same")) for _ in range(5))


def test_repeat_zero_shows_every_library_line() -> None:
    keep = LibraryFilter(repeat_s=0.0, clock=_Clock())
    assert all(keep.filter(_record("aiokafka", logging.ERROR, "again")) for _ in range(5))


def test_text_lines_carry_milliseconds_and_the_hidden_count() -> None:
    formatter = TextFormatter(
        "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"
    )
    record = _record("aiokafka", logging.WARNING, "Heartbeat failed")
    record.repeats_hidden = 12
    assert re.match(
        r"^\d\d:\d\d:\d\d\.\d{3} WARNING aiokafka: Heartbeat failed repeats_hidden=12$",
        formatter.format(record),
    )


@pytest.fixture
def restore_logging() -> object:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("aiokafka", "aiohttp", "httpx")}
    yield None
    root.handlers[:], level = saved
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


@pytest.mark.usefixtures("restore_logging")
def test_configure_sets_the_library_level_never_below_ours() -> None:
    configure_logging("INFO", "json", library_level="WARNING")
    assert logging.getLogger("aiokafka").level == logging.WARNING
    configure_logging("ERROR", "json", library_level="INFO")
    assert logging.getLogger("aiokafka").level == logging.ERROR
    configure_logging("DEBUG", "json", library_level="INFO")
    assert logging.getLogger("aiokafka").level == logging.INFO
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler.formatter, JsonFormatter)
    assert any(isinstance(f, LibraryFilter) for f in handler.filters)


def test_run_takes_log_level_and_format_flags() -> None:
    args = build_parser().parse_args(
        ["run", "-c", "s.yaml", "--log-level", "debug", "--log-format", "text"]
    )
    assert (args.log_level, args.log_format) == ("DEBUG", "text")
    defaults = build_parser().parse_args(["run", "-c", "s.yaml"])
    assert (defaults.log_level, defaults.log_format) == (None, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "-c", "s.yaml", "--log-format", "xml"])


async def test_the_probe_says_once_when_the_broker_is_lost_and_once_when_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    broker = BrokerHealth(unreachable_after_s=3.0, clock=clock)
    answers = [True] + [False] * 6 + [True] * 3
    turns = iter(answers)

    async def check() -> None:
        if not next(turns):
            raise ConnectionError("connection refused")

    async def sleep(seconds: float) -> None:
        clock.now += seconds
        if clock.now >= 1000.0 + len(answers):
            raise asyncio.CancelledError

    with (
        caplog.at_level(logging.INFO, "consumer.observability"),
        pytest.raises(asyncio.CancelledError),
    ):
        await broker.run_probe(check, interval_s=1.0, timeout_s=1.0, sleep=sleep)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [
        ("WARNING", "broker connection lost"),
        ("INFO", "broker connection back"),
    ]
    back = caplog.records[1]
    assert vars(back)["down_s"] == 7.0  # last answer at 1000, next at 1007
