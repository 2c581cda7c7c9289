"""The records that flow through the pipeline: what came in, and what goes out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One consumed message, reduced to what the pipeline needs."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: tuple[tuple[str, bytes], ...] = ()

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


# Every reason a dead letter can have (decode, encode, deliver): the metrics create each at 0,
# the dead-letter schema lists them.
DEAD_LETTER_REASONS = (
    "tombstone",
    "empty",
    "key_too_large",
    "too_large",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "too_deep",
    "internal_error",
    "output_rejected",
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Why a message could not become a row; it goes to the DLQ with its bytes untouched."""

    reason: str
    message: str


@dataclass(slots=True)
class Item:
    """A consumed message inside a window: a decoded row, or a dead letter."""

    record: SourceRecord
    row: dict[str, Any] | None = None
    dead_letter: DeadLetter | None = None


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    """A message to produce, with the source record it answers for."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    # A cut-down dead letter, written when the DLQ refused the whole one.
    stub: bool = False
