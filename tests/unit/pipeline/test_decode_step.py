"""Decode step: every consumed record becomes an item, once, however often it is offered."""

from __future__ import annotations

from typing import Any

import pytest

from consumer.decode import RowLimits, decode_row
from consumer.pipeline.decode import DecodeStep
from consumer.pipeline.protocol import Deadline, Rejected
from consumer.records import DeadLetter, Item
from tests.unit.pipeline.recording import FakeClock, Recording, record

LIMITS = RowLimits(max_bytes=100, max_depth=3, max_key_bytes=8)


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_a_json_object_becomes_an_item_with_its_row() -> None:
    nxt: Recording[Item] = Recording()
    step = DecodeStep(LIMITS, nxt)
    source = record(3, b'{"id": 3, "t": "x"}')
    step.submit(source)
    [item] = nxt.submitted
    assert item.record is source
    assert item.row == {"id": 3, "t": "x"}
    assert item.dead_letter is None


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (None, b"k", "tombstone"),
        (b"", b"k", "empty"),
        (b"not json", b"k", "invalid_json"),
        (b"[1, 2]", b"k", "not_an_object"),
        (b'{"a": [[[[1]]]]}', b"k", "too_deep"),
        (b'{"a": "' + b"x" * 200 + b'"}', b"k", "too_large"),
        (b'{"a": 1}', b"a-key-too-long", "key_too_large"),
    ],
)
def test_a_record_that_cannot_be_a_row_becomes_a_dead_letter_item_not_an_error(
    value: bytes | None, key: bytes, reason: str
) -> None:
    nxt: Recording[Item] = Recording()
    DecodeStep(LIMITS, nxt).submit(record(0, value, key=key))
    [item] = nxt.submitted
    assert item.row is None
    assert item.dead_letter is not None
    assert item.dead_letter.reason == reason


def test_a_rejected_record_is_offered_again_without_being_decoded_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decodes = 0

    def counting(
        key: bytes | None, value: bytes | None, limits: RowLimits
    ) -> dict[str, Any] | DeadLetter:
        nonlocal decodes
        decodes += 1
        return decode_row(key, value, limits)

    monkeypatch.setattr("consumer.pipeline.decode.decode_row", counting)
    nxt: Recording[Item] = Recording(reject_next=2)
    consumed = Counter()
    step = DecodeStep(LIMITS, nxt, consumed)
    source = record(1)
    for _ in range(2):
        with pytest.raises(Rejected):
            step.submit(source)
    step.submit(source)
    assert decodes == 1
    assert len(nxt.offered) == 3
    assert nxt.offered[0] is nxt.offered[1] is nxt.offered[2] is nxt.submitted[0]


def test_a_different_record_after_a_rejection_is_decoded_on_its_own() -> None:
    nxt: Recording[Item] = Recording(reject_next=1)
    step = DecodeStep(LIMITS, nxt)
    first, second = record(1), record(2)
    with pytest.raises(Rejected):
        step.submit(first)
    step.submit(second)
    assert [i.record for i in nxt.submitted] == [second]


def test_on_consumed_counts_each_accepted_record_once_and_never_a_rejected_offer() -> None:
    nxt: Recording[Item] = Recording()
    consumed = Counter()
    step = DecodeStep(LIMITS, nxt, consumed)
    step.submit(record(0))
    nxt.reject_next = 3
    source = record(1)
    for _ in range(3):
        with pytest.raises(Rejected):
            step.submit(source)
    assert consumed.count == 1
    step.submit(source)
    step.submit(record(2, b"not json"))  # a dead letter is consumed too
    assert consumed.count == 3


async def test_poll_close_join_and_terminate_pass_through_to_the_next_step() -> None:
    nxt: Recording[Item] = Recording()
    step = DecodeStep(LIMITS, nxt)
    step.poll()
    step.close()
    deadline = Deadline(1.0, FakeClock())
    await step.join(deadline)
    step.terminate()
    assert nxt.events == ["poll", "close", "join", "terminate"]
    assert nxt.join_deadlines == [deadline]


def test_terminate_forgets_a_rejected_record() -> None:
    nxt: Recording[Item] = Recording(reject_next=1)
    step = DecodeStep(LIMITS, nxt)
    source = record(1)
    with pytest.raises(Rejected):
        step.submit(source)
    step.terminate()
    step.submit(source)
    # Decoded again after terminate: a fresh item, not the one held for the rejected offer.
    assert nxt.submitted[0] is not nxt.offered[0]
