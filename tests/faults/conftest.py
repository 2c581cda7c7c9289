"""Collects one ledger line per fault scenario and prints them as a table at the end."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.ledger import LEDGER


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not LEDGER:
        return
    terminalreporter.section("fault scenarios: every input accounted for")
    header = f"{'scenario':<44} {'inputs':>7} {'outputs':>8} {'dlq':>5} {'missing':>8} {'dups':>6}"
    terminalreporter.write_line(header)
    for entry in LEDGER:
        terminalreporter.write_line(
            f"{entry.scenario:<44} {entry.inputs:>7} {entry.outputs:>8} {entry.dead_letters:>5} "
            f"{entry.missing:>8} {entry.duplicates:>6}"
        )


@pytest.fixture
def ledger() -> list[Any]:
    return LEDGER
