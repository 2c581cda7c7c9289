"""Collects one ledger line per fault scenario and prints them as a table at the end."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.ledger import LEDGER, Ledger

_COLUMNS = (
    f"{'scenario':<52} {'inputs':>7} {'outputs':>8} {'dlq':>5} {'missing':>8} {'dups':>6} "
    f"{'errors':>7} {'move-on':>8}  readyz"
)


def _line(entry: Ledger) -> str:
    errors = "-" if entry.row_errors is None else str(entry.row_errors)
    seconds = "-" if entry.seconds_to_move_on is None else f"{entry.seconds_to_move_on:.1f}"
    return (
        f"{entry.scenario:<52} {entry.inputs:>7} {entry.outputs:>8} {entry.dead_letters:>5} "
        f"{entry.missing:>8} {entry.duplicates:>6} {errors:>7} {seconds:>8}  {entry.readyz}"
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not LEDGER:
        return
    terminalreporter.section("fault scenarios: every input accounted for")
    terminalreporter.write_line(_COLUMNS)
    for entry in LEDGER:
        terminalreporter.write_line(_line(entry))


@pytest.fixture
def ledger() -> list[Any]:
    return LEDGER
