"""Structured logs: JSON lines for machines, readable text on a terminal.

The libraries underneath (aiokafka above all) log every failed connection attempt, metadata
refresh and rejoin while they retry it themselves: a 10 s broker restart was hundreds of ERROR
lines. What an operator acts on is what the consumer says about the same events (it reports its
own failures and the broker's reachability), so the libraries' lines are shown at WARNING at
most and each of their messages at most once per `library_repeat_s`, with how many it stood for.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Loggers of libraries whose chatter is tamed; "consumer" (ours) is left as it is.
LIBRARIES = ("aiokafka", "aiohttp", "httpx")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("auto", "json", "text")


def iso_timestamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. 2026-12-01T07:26:32.123Z: sortable as text and
    unambiguous across hosts in different zones."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields (window_id, partitions...) become keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return base


class LibraryFilter(logging.Filter):
    """On the handler, so it sees what the libraries' loggers propagate to the root.

    ERROR from a library becomes WARNING (the consumer decides what is an error: a retried
    connection is not one), CRITICAL stays. A message seen again within `repeat_s` is dropped
    and counted; the next time it shows, `repeats_hidden` says how many were dropped. Messages
    are told apart by logger and format string, not the formatted text, so "Unable connect to
    node with id 1" and "... id 2" are one message whose arguments vary.
    """

    def __init__(self, repeat_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.repeat_s = repeat_s
        self._clock = clock
        self._shown_at: dict[tuple[str, str], float] = {}
        self._hidden: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(LIBRARIES):
            return True
        if logging.WARNING < record.levelno < logging.CRITICAL:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        if self.repeat_s <= 0:
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        shown_at = self._shown_at.get(key)
        if shown_at is not None and now - shown_at < self.repeat_s:
            self._hidden[key] = self._hidden.get(key, 0) + 1
            return False
        self._shown_at[key] = now
        hidden = self._hidden.pop(key, 0)
        if hidden:
            record.repeats_hidden = hidden
        return True


def configure_logging(
    level: str = "INFO",
    fmt: str = "auto",
    library_level: str = "WARNING",
    library_repeat_s: float = 60.0,
) -> None:
    """The root handler for `run`; the libraries log at `library_level` or above (never
    below `level`), through `LibraryFilter`."""
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(
        JsonFormatter()
        if use_json
        else TextFormatter(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"
        )
    )
    handler.addFilter(LibraryFilter(library_repeat_s))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    libraries = max(logging.getLevelName(library_level), root.level)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(libraries)


def configure_cli_logging() -> None:
    """For `publish` and `tail`: warnings on stderr as plain lines, aiokafka's own silenced.

    These commands turn every broker failure into one line of their own (and exit 1), so the
    library's ERROR line for each connection attempt would only repeat it, once per retry.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
