"""Encode step: outputs keep the input's bytes, dead letters and stubs say why and where from."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from consumer.enrich.outcome import RowOutcome
from consumer.pipeline.encode import STUB_BYTES, EncodedWindow, Encoder, EncodeStep
from consumer.pipeline.enrich import EnrichedWindow
from consumer.pipeline.protocol import Deadline, Rejected
from consumer.records import DeadLetter, Item, OutgoingRecord
from tests.unit.pipeline.recording import (
    DLQ,
    MODEL,
    OUT,
    FakeClock,
    Recording,
    dead_item,
    encoder,
    item_of,
    record,
    retryable_failure,
    row_item,
    success,
    template,
    window,
)

BIG = 123456789012345678901234567890


def headers(out: OutgoingRecord) -> dict[str, bytes]:
    return dict(out.headers)


def enriched(*pairs: tuple[Item, RowOutcome | None], window_id: str = "w-7") -> EnrichedWindow:
    items = [item for item, _ in pairs]
    return EnrichedWindow(window(*items, window_id=window_id), [o for _, o in pairs], 0.0)


def test_an_output_is_the_input_bytes_with_the_response_fields_appended() -> None:
    raw = b'{"id": ' + str(BIG).encode() + b', "price": 1.10, "t": "x"}'
    item = item_of(record(5, raw))
    out = encoder().output("w-1", item, success("an answer"))
    assert out.topic == OUT
    assert out.key == b"k"
    assert out.value is not None
    assert out.value.startswith(raw[:-1] + b",")  # the input untouched, then the fields
    body = json.loads(out.value)  # the stdlib keeps big integers exact
    assert body["id"] == BIG
    assert b'"price": 1.10' in out.value
    assert body["t"] == "x"
    assert body["llm"] == "an answer"
    assert body["llm_error"] is None
    assert body["llm_model"] == "gpt-test-2024"


def test_an_output_carries_its_provenance_and_the_model_and_template() -> None:
    item = item_of(record(5, tp=record(0).tp, headers=[("trace", b"abc")]))
    out = encoder().output("w-1", item, success())
    assert out.headers == [
        ("source.topic", b"in"),
        ("source.partition", b"0"),
        ("source.offset", b"5"),
        ("window.id", b"w-1"),
        ("llm.model", MODEL.encode()),
        ("llm.template_hash", template().template_hash.encode()),
    ]


def test_a_failed_row_is_an_output_with_its_error_field() -> None:
    out = encoder().output("w-1", row_item(1), retryable_failure())
    assert out.value is not None
    body = orjson.loads(out.value)
    assert body["llm"] is None
    assert body["llm_error"]["reason"] == "retries_exhausted"


@pytest.mark.parametrize(
    "content",
    [object(), {"n": 2**70}, {1j: "complex key"}],
    ids=["object", "int-beyond-64-bits", "complex-key"],
)
def test_a_response_that_cannot_be_serialized_becomes_an_internal_error_row(
    content: Any, caplog: pytest.LogCaptureFixture
) -> None:
    out = encoder().output("w-1", row_item(1), success(content))
    assert out.topic == OUT
    assert out.value is not None
    body = orjson.loads(out.value)
    assert body["id"] == 1
    assert body["llm"] is None
    assert body["llm_error"]["reason"] == "internal_error"
    assert body["llm_error"]["message"].startswith("TypeError")
    assert body["llm_variables_hash"] == "ab" * 32
    assert "row could not be encoded" in caplog.text


def test_a_dead_letter_keeps_the_input_bytes_and_headers_and_says_why() -> None:
    source = record(9, b"\xff not json", key=b"key-9", headers=[("trace", b"abc")])
    letter = DeadLetter("invalid_json", "the message is not valid JSON")
    out = encoder().dead_letter("w-2", source, letter)
    assert out.topic == DLQ
    assert out.key == b"key-9"
    assert out.value == b"\xff not json"
    assert out.headers == [
        ("trace", b"abc"),
        ("dlq.reason", b"invalid_json"),
        ("dlq.message", b"the message is not valid JSON"),
        ("source.topic", b"in"),
        ("source.partition", b"0"),
        ("source.offset", b"9"),
        ("window.id", b"w-2"),
        ("source.timestamp", str(source.timestamp).encode()),
    ]


def test_a_tombstone_dead_letter_keeps_its_missing_value() -> None:
    source = record(3, None)
    out = encoder().dead_letter("w", source, DeadLetter("tombstone", "no value"))
    assert out.value is None


def test_a_stub_keeps_the_first_kilobyte_and_says_it_was_truncated() -> None:
    value = bytes(range(256)) * 12  # 3072 bytes
    key = b"K" * 2000
    source = record(4, value, key=key, headers=[("huge", b"h" * 5000)])
    out = encoder().stub("w-3", source, DeadLetter("too_large", "big"), "MessageSizeTooLargeError")
    assert out.topic == DLQ
    assert out.value == value[:STUB_BYTES]
    assert out.key == key[:STUB_BYTES]
    h = headers(out)
    assert "huge" not in h  # the source's own headers are dropped
    assert h["dlq.reason"] == b"too_large"
    assert h["dlq.message"] == b"big"
    assert h["dlq.truncated"] == b"true"
    assert h["dlq.original_value_bytes"] == b"3072"
    assert h["dlq.original_key_bytes"] == b"2000"
    assert h["dlq.refused"] == b"MessageSizeTooLargeError"
    assert h["source.offset"] == b"4"
    assert h["window.id"] == b"w-3"
    assert h["source.timestamp"] == str(source.timestamp).encode()


def test_a_stub_with_nothing_kept_has_only_its_coordinates() -> None:
    source = record(4, b"x" * 3000)
    out = encoder().stub("w", source, DeadLetter("r", "m"), "refused", keep_bytes=0)
    assert out.value == b""
    assert out.key == b""
    assert headers(out)["dlq.original_value_bytes"] == b"3000"


def test_rows_become_outputs_and_dead_letters_stay_dead_letters_in_item_order() -> None:
    nxt: Recording[EncodedWindow] = Recording()
    row0, dead1, row2 = row_item(0), dead_item(1), row_item(2)
    value = enriched((row0, success()), (dead1, None), (row2, success()))
    EncodeStep(encoder(), nxt).submit(value)
    [encoded] = nxt.submitted
    assert encoded.enriched is value
    assert encoded.items == value.window.items
    assert [r.topic for r in encoded.records] == [OUT, DLQ, OUT]
    assert headers(encoded.records[1])["dlq.reason"] == b"invalid_json"
    assert encoded.records[1].value == dead1.record.value
    assert [headers(r)["source.offset"] for r in encoded.records] == [b"0", b"1", b"2"]
    assert all(headers(r)["window.id"] == b"w-7" for r in encoded.records)


def test_a_row_without_an_outcome_becomes_an_internal_error_dead_letter() -> None:
    nxt: Recording[EncodedWindow] = Recording()
    EncodeStep(encoder(), nxt).submit(enriched((row_item(0), None)))
    [out] = nxt.submitted[0].records
    assert out.topic == DLQ
    assert headers(out)["dlq.reason"] == b"internal_error"


class CountingEncoder(Encoder):
    def __init__(self, base: Encoder) -> None:
        self.__dict__.update(base.__dict__)
        self.outputs = 0

    def output(self, window_id: str, item: Item, outcome: RowOutcome) -> OutgoingRecord:
        self.outputs += 1
        return super().output(window_id, item, outcome)


def test_a_rejected_encoded_window_is_offered_again_without_encoding_it_twice() -> None:
    counting = CountingEncoder(encoder())
    nxt: Recording[EncodedWindow] = Recording(reject_next=2)
    step = EncodeStep(counting, nxt)
    value = enriched((row_item(0), success()), (row_item(1), success()))
    for _ in range(2):
        with pytest.raises(Rejected):
            step.submit(value)
    step.submit(value)
    assert counting.outputs == 2  # two rows, encoded once
    assert nxt.offered[0] is nxt.offered[1] is nxt.submitted[0]


def test_a_different_window_after_a_rejection_is_encoded_on_its_own() -> None:
    nxt: Recording[EncodedWindow] = Recording(reject_next=1)
    step = EncodeStep(encoder(), nxt)
    first = enriched((row_item(0), success()))
    second = enriched((row_item(1), success()))
    with pytest.raises(Rejected):
        step.submit(first)
    step.submit(second)
    assert nxt.submitted[0].enriched is second


async def test_poll_close_join_and_terminate_pass_through_to_the_next_step() -> None:
    nxt: Recording[EncodedWindow] = Recording()
    step = EncodeStep(encoder(), nxt)
    step.poll()
    step.close()
    await step.join(Deadline(1.0, FakeClock()))
    step.terminate()
    assert nxt.events == ["poll", "close", "join", "terminate"]
