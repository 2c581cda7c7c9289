"""The accounting of a fault scenario: every input must be an output or a dead letter."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tests.support.pipeline import Message


@dataclass(frozen=True)
class Ledger:
    scenario: str
    inputs: int
    outputs: int
    dead_letters: int
    missing: int
    duplicates: int
    missing_examples: tuple[tuple[int, int], ...]
    # Optional columns; None (printed "-") where a scenario does not measure them.
    row_errors: int | None = None  # outputs that carry an error instead of a response
    seconds_to_move_on: float | None = None  # consumer start to the last output or dead letter
    readyz: str = "-"  # what /readyz said, in a few words


LEDGER: list[Ledger] = []


def account(
    scenario: str,
    inputs: Sequence[tuple[int, int]],
    outputs: Sequence[Message],
    dead_letters: Sequence[Message] = (),
    *,
    row_errors: int | None = None,
    seconds_to_move_on: float | None = None,
    readyz: str = "-",
) -> Ledger:
    """Match outputs and dead letters to inputs by (source partition, offset)."""
    seen = Counter(m.source for m in [*outputs, *dead_letters])
    missing = [position for position in inputs if position not in seen]
    duplicates = sum(count - 1 for count in seen.values() if count > 1)
    entry = Ledger(
        scenario,
        len(inputs),
        len(outputs),
        len(dead_letters),
        len(missing),
        duplicates,
        tuple(missing[:5]),
        row_errors,
        seconds_to_move_on,
        readyz,
    )
    LEDGER.append(entry)
    print(f"\n{entry}")
    return entry
