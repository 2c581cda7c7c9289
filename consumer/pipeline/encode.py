"""Step 4, encode: outputs and dead letters as Kafka records, with their provenance headers.

Pure: no I/O. An output is the input's own bytes with the response fields appended
(`consumer/rowjson.py`), so numbers of any size or precision keep their digits. The other
record shapes of the contract are built here too, so the delivery step can turn an output the
broker refused into a dead letter, and a dead letter it refused into a small stub.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from consumer.enrich.outcome import OutputFields, RowOutcome
from consumer.llm.errors import FailureKind, RowError
from consumer.pipeline.enrich import EnrichedWindow
from consumer.pipeline.protocol import Step, Transform
from consumer.records import DeadLetter, Item, OutgoingRecord, SourceRecord
from consumer.rowjson import with_fields

log = logging.getLogger("consumer")

# How much of a dead letter's value and key a stub keeps when the DLQ refused the whole record.
STUB_BYTES = 1024

Headers = list[tuple[str, bytes]]


def _header(value: object) -> bytes:
    return str(value).encode("utf-8")


@dataclass(frozen=True)
class EncodedWindow:
    enriched: EnrichedWindow
    # Aligned with the window's items: the output or dead letter of each.
    records: list[OutgoingRecord]

    @property
    def items(self) -> list[Item]:
        return self.enriched.window.items


class Encoder:
    """Builds every record the consumer writes."""

    def __init__(
        self,
        output_topic: str,
        dlq_topic: str,
        fields: OutputFields,
        model: str,
        template_hash: str,
    ) -> None:
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic
        self._fields = fields
        self._model = _header(model)
        self._template_hash = _header(template_hash)

    def output(self, window_id: str, item: Item, outcome: RowOutcome) -> OutgoingRecord:
        """The enriched row; a row that cannot be encoded carries an `internal_error` instead."""
        record = item.record
        try:
            value = self._encode(item, outcome)
        except Exception as error:  # a response that will not serialize must not stop the topic
            log.warning("row could not be encoded", exc_info=True)
            failed = RowOutcome(
                None,
                RowError("internal_error", f"{type(error).__name__}: {error}", None, 0, False),
                FailureKind.ROW,
                outcome.variables_hash,
            )
            value = self._encode(item, failed)
        headers = self._provenance(window_id, record)
        headers.append(("llm.model", self._model))
        headers.append(("llm.template_hash", self._template_hash))
        return OutgoingRecord(self.output_topic, record.key, value, headers)

    def dead_letter(
        self, window_id: str, record: SourceRecord, letter: DeadLetter
    ) -> OutgoingRecord:
        """The input's bytes untouched, with why and where from in the headers."""
        return OutgoingRecord(
            self.dlq_topic,
            record.key,
            record.value,
            [
                *record.headers,
                ("dlq.reason", _header(letter.reason)),
                ("dlq.message", _header(letter.message)),
                *self._provenance(window_id, record),
                ("source.timestamp", _header(record.timestamp)),
            ],
        )

    def stub(
        self,
        window_id: str,
        record: SourceRecord,
        letter: DeadLetter,
        refused: str,
        keep_bytes: int = STUB_BYTES,
    ) -> OutgoingRecord:
        """The last resort when the DLQ refused a dead letter: its start, and where it came from.

        The source's own headers are dropped too (they may be what made it too large).
        """
        key = record.key[:keep_bytes] if record.key is not None else None
        value = record.value[:keep_bytes] if record.value is not None else None
        return OutgoingRecord(
            self.dlq_topic,
            key,
            value,
            [
                ("dlq.reason", _header(letter.reason)),
                ("dlq.message", _header(letter.message)),
                ("dlq.truncated", b"true"),
                ("dlq.original_value_bytes", _header(len(record.value or b""))),
                ("dlq.original_key_bytes", _header(len(record.key or b""))),
                ("dlq.refused", _header(refused)),
                *self._provenance(window_id, record),
                ("source.timestamp", _header(record.timestamp)),
            ],
            stub=True,
        )

    def _encode(self, item: Item, outcome: RowOutcome) -> bytes:
        assert item.row is not None and item.record.value is not None
        return with_fields(item.record.value, self._fields.for_outcome(outcome), item.row.keys())

    @staticmethod
    def _provenance(window_id: str, record: SourceRecord) -> Headers:
        return [
            ("source.topic", _header(record.topic)),
            ("source.partition", _header(record.partition)),
            ("source.offset", _header(record.offset)),
            ("window.id", _header(window_id)),
        ]


class EncodeStep(Transform[EnrichedWindow, EncodedWindow]):
    def __init__(self, encoder: Encoder, next_step: Step[EncodedWindow]) -> None:
        super().__init__(next_step)
        self._encoder = encoder

    def transform(self, value: EnrichedWindow) -> EncodedWindow:
        return EncodedWindow(value, self.encode(value))

    def encode(self, enriched: EnrichedWindow) -> list[OutgoingRecord]:
        window_id = enriched.window.id
        records = []
        for item, outcome in zip(enriched.window.items, enriched.outcomes, strict=True):
            if outcome is None or item.row is None:
                letter = item.dead_letter or DeadLetter("internal_error", "no outcome for the row")
                records.append(self._encoder.dead_letter(window_id, item.record, letter))
            else:
                records.append(self._encoder.output(window_id, item, outcome))
        return records
