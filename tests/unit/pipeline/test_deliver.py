"""Deliver step: a window goes on once the broker has every record; refused ones are replaced."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordTooLargeError,
)

import consumer.kafka.transactions as transactions_module
from consumer.kafka.transactions import TransactionalSink
from consumer.pipeline.deliver import (
    DeliveryFailed,
    Fallback,
    ProduceStep,
    Replacements,
    TransactionalProduceStep,
)
from consumer.pipeline.encode import STUB_BYTES, EncodedWindow, EncodeStep
from consumer.pipeline.enrich import EnrichedWindow
from consumer.pipeline.protocol import Deadline, Rejected, Wakeup
from consumer.records import Item, OutgoingRecord, TopicPartition
from consumer.retry import Backoff
from tests.unit.pipeline.recording import (
    DLQ,
    OUT,
    TP0,
    TP1,
    FakeClock,
    FakeEvents,
    Recording,
    RecordingSleep,
    dead_item,
    encoder,
    fixed_rng,
    item_of,
    record,
    row_item,
    spin,
    success,
    turns,
    window,
)

Result = BaseException | None
BACKOFF = Backoff(0.5, 30.0, fixed_rng)


def encoded(*items: Item) -> EncodedWindow:
    """The encode step's output for `items`: outputs for rows, dead letters for the rest."""
    outcomes = [success() if item.row is not None else None for item in items]
    enriched = EnrichedWindow(window(*items), list(outcomes), 0.0)
    return EncodedWindow(enriched, EncodeStep(encoder(), Recording()).encode(enriched))


def headers(out: OutgoingRecord) -> dict[str, bytes]:
    return dict(out.headers)


class FakeSink:
    """A RecordSink: each send_all answers from `scripted` (one list per call), else `respond`."""

    def __init__(self, respond: Callable[[OutgoingRecord], Result] | None = None) -> None:
        self.respond = respond
        self.scripted: list[list[Result]] = []
        self.calls: list[list[OutgoingRecord]] = []
        self.one_by_one: list[bool] = []
        self.recovers = 0
        self.recover_errors: list[BaseException] = []

    async def send_all(
        self, records: Sequence[OutgoingRecord], one_by_one: bool = False
    ) -> list[Result]:
        self.calls.append(list(records))
        self.one_by_one.append(one_by_one)
        if self.scripted:
            results = self.scripted.pop(0)
            assert len(results) == len(records), "script does not match the records sent"
            return results
        if self.respond is not None:
            return [self.respond(r) for r in records]
        return [None] * len(records)

    async def recover(self) -> None:
        self.recovers += 1
        if self.recover_errors:
            raise self.recover_errors.pop(0)


class Produce:
    def __init__(self, sink: FakeSink | None = None, fallback: Fallback = "stub") -> None:
        self.sink = sink or FakeSink()
        self.events = FakeEvents()
        self.next: Recording[EncodedWindow] = Recording()
        self.sleep = RecordingSleep()
        self.wakeup = Wakeup()
        self.step = ProduceStep(
            self.sink,
            Replacements(encoder(), fallback, self.events),
            self.events,
            BACKOFF,
            self.next,
            self.wakeup,
            sleep=self.sleep,
        )

    async def deliver(self, value: EncodedWindow) -> EncodedWindow:
        self.step.submit(value)
        await spin(lambda: bool(self.next.submitted), poll=self.step.poll)
        return self.next.submitted[-1]


def refuse_topic(topic: str) -> Callable[[OutgoingRecord], Result]:
    return lambda r: MessageSizeTooLargeError() if r.topic == topic else None


async def test_a_window_whose_records_are_all_acknowledged_is_forwarded_as_it_is() -> None:
    p = Produce()
    value = encoded(row_item(0), dead_item(1), row_item(2))
    delivered = await p.deliver(value)
    assert p.sink.calls == [value.records]
    assert delivered.records == value.records
    assert delivered.enriched is value.enriched
    assert p.sink.recovers == 0
    assert p.sleep.delays == []
    assert p.events.ok == 1
    assert p.events.dead_letters == []


async def test_a_refused_record_becomes_a_dead_letter_and_only_it_is_sent_again() -> None:
    p = Produce()
    p.sink.scripted = [[None, MessageSizeTooLargeError(), None]]
    value = encoded(row_item(0), row_item(1), row_item(2))
    r0, r1, r2 = value.records
    delivered = await p.deliver(value)
    [first, second] = p.sink.calls
    assert first == [r0, r1, r2]
    [replacement] = second
    assert replacement.topic == DLQ
    assert replacement.value == value.items[1].record.value  # the input's bytes
    h = headers(replacement)
    assert h["dlq.reason"] == b"output_rejected"
    assert h["dlq.message"].startswith(b"the broker refused the output: MessageSizeTooLargeError")
    assert h["source.offset"] == b"1"
    assert delivered.records == [r0, replacement, r2]
    assert p.sink.recovers == 1  # a refusal breaks the producer's sequence: a fresh one
    assert p.sleep.delays == []  # nothing to wait for: the replacement goes at once
    assert p.events.dead_letters == ["output_rejected"]


async def test_a_refused_dead_letter_becomes_a_stub_of_its_first_kilobyte() -> None:
    p = Produce()
    big = b"\xff" + b"x" * 5000
    value = encoded(row_item(0), item_of(record(1, big)))
    p.sink.scripted = [[None, RecordTooLargeError()]]
    delivered = await p.deliver(value)
    assert [len(call) for call in p.sink.calls] == [2, 1]
    [stub] = p.sink.calls[1]
    assert stub.topic == DLQ
    assert stub.value == big[:STUB_BYTES]
    h = headers(stub)
    assert h["dlq.truncated"] == b"true"
    assert h["dlq.reason"] == b"invalid_utf8"
    assert h["dlq.refused"].startswith(b"RecordTooLargeError")
    assert delivered.records[1] is stub
    assert p.events.dead_letters == ["stub"]


async def test_an_output_refused_as_dead_letter_and_stub_ends_as_coordinates_only() -> None:
    p = Produce()
    value = encoded(row_item(0, text="y" * 3000))
    p.sink.scripted = [[MessageSizeTooLargeError()]] * 3
    delivered = await p.deliver(value)
    output, dead_letter, stub, bare = (call[0] for call in p.sink.calls)
    assert output.topic == OUT
    assert dead_letter.topic == DLQ and headers(dead_letter)["dlq.reason"] == b"output_rejected"
    assert stub.value is not None and len(stub.value) == STUB_BYTES
    assert bare.value == b""
    assert headers(bare)["dlq.reason"] == b"output_rejected"
    assert headers(bare)["dlq.truncated"] == b"true"
    assert headers(bare)["source.offset"] == b"0"
    assert delivered.records == [bare]
    assert p.events.dead_letters == ["output_rejected", "stub", "stub"]
    assert p.sink.recovers == 3


async def test_a_refused_coordinates_only_stub_stops_the_consumer() -> None:
    p = Produce(FakeSink(refuse_topic(DLQ)))
    p.step.submit(encoded(dead_item(0)))
    with pytest.raises(DeliveryFailed, match="refused the record from in/0@0"):
        await spin(lambda: False, poll=p.step.poll)
    assert [headers(call[0]).get("dlq.truncated") for call in p.sink.calls] == [
        None,
        b"true",
        b"true",
    ]
    assert p.next.submitted == []


async def test_with_the_stop_fallback_a_refused_dead_letter_stops_the_consumer() -> None:
    p = Produce(FakeSink(refuse_topic(DLQ)), fallback="stop")
    p.step.submit(encoded(row_item(0), dead_item(1)))
    with pytest.raises(DeliveryFailed, match="dead_letter_fallback: stop"):
        await spin(lambda: False, poll=p.step.poll)
    assert p.next.submitted == []


async def test_with_the_stop_fallback_a_refused_output_still_becomes_a_dead_letter() -> None:
    p = Produce(FakeSink(refuse_topic(OUT)), fallback="stop")
    delivered = await p.deliver(encoded(row_item(0)))
    assert headers(delivered.records[0])["dlq.reason"] == b"output_rejected"


@pytest.mark.parametrize(
    ("error", "recovers"),
    [(KafkaConnectionError(), 0), (KafkaTimeoutError(), 0), (OutOfOrderSequenceNumber(), 1)],
    ids=["connection", "timeout", "out-of-order-sequence"],
)
async def test_a_retriable_error_waits_the_backoff_then_resends_only_the_unacknowledged(
    error: BaseException, recovers: int
) -> None:
    # KafkaTimeoutError and OutOfOrderSequenceNumber are not `retriable` in aiokafka, so the
    # producer is recreated for them too; KafkaConnectionError keeps it.
    p = Produce()
    value = encoded(row_item(0), row_item(1), row_item(2))
    r0, r1, r2 = value.records
    p.sink.scripted = [[None, error, error], [None, error], [None]]
    delivered = await p.deliver(value)
    assert p.sink.calls == [[r0, r1, r2], [r1, r2], [r2]]
    assert p.sleep.delays == [BACKOFF.delay(1), BACKOFF.delay(2)] == [0.5, 1.0]
    assert delivered.records == [r0, r1, r2]
    assert p.sink.recovers == 2 * recovers
    assert [what for what, _ in p.events.errors] == ["produce failed, retrying"] * 2
    assert p.events.dead_letters == []


async def test_a_refusal_and_a_timeout_together_replace_one_and_resend_both_after_a_wait() -> None:
    p = Produce()
    value = encoded(row_item(0), row_item(1))
    r0, r1 = value.records
    p.sink.scripted = [[MessageSizeTooLargeError(), KafkaConnectionError()]]
    delivered = await p.deliver(value)
    first, second = p.sink.calls
    assert first == [r0, r1]
    assert second[0].topic == DLQ and second[1] is r1
    assert p.sleep.delays == [0.5]
    assert p.sink.recovers == 1
    assert delivered.records == second


async def test_a_producer_restart_that_fails_is_retried_after_the_backoff() -> None:
    p = Produce()
    p.sink.scripted = [[MessageSizeTooLargeError()]]
    p.sink.recover_errors = [KafkaConnectionError(), KafkaConnectionError()]
    delivered = await p.deliver(encoded(row_item(0)))
    assert p.sink.recovers == 3
    assert p.sleep.delays == [BACKOFF.delay(2), BACKOFF.delay(3)]
    assert [what for what, _ in p.events.errors] == ["producer restart failed"] * 2
    assert len(p.sink.calls) == 2  # nothing is sent on a producer that failed to start
    assert delivered.records[0].topic == DLQ


async def test_one_window_in_flight_the_next_is_rejected_until_it_is_forwarded() -> None:
    release = asyncio.Event()

    class SlowSink(FakeSink):
        async def send_all(
            self, records: Sequence[OutgoingRecord], one_by_one: bool = False
        ) -> list[Result]:
            await release.wait()
            return await super().send_all(records, one_by_one)

    p = Produce(SlowSink())
    first, second = encoded(row_item(0)), encoded(row_item(1))
    p.step.submit(first)
    with pytest.raises(Rejected):
        p.step.submit(second)
    release.set()
    await turns()
    with pytest.raises(Rejected):  # delivered but not yet forwarded
        p.step.submit(second)
    p.step.poll()
    assert [w.enriched for w in p.next.submitted] == [first.enriched]
    p.step.submit(second)


async def test_a_delivered_window_the_next_step_rejects_is_held_and_offered_again() -> None:
    p = Produce()
    p.next.reject_next = 1
    value = encoded(row_item(0))
    p.step.submit(value)
    await turns()
    p.step.poll()
    assert p.next.submitted == []
    with pytest.raises(Rejected):
        p.step.submit(encoded(row_item(1)))
    p.step.poll()
    assert [w.enriched for w in p.next.submitted] == [value.enriched]
    assert len(p.sink.calls) == 1  # not sent twice


async def test_join_waits_for_the_window_in_flight_then_joins_the_next_step() -> None:
    release = asyncio.Event()

    class SlowSink(FakeSink):
        async def send_all(
            self, records: Sequence[OutgoingRecord], one_by_one: bool = False
        ) -> list[Result]:
            await release.wait()
            return await super().send_all(records, one_by_one)

    p = Produce(SlowSink())
    value = encoded(row_item(0))
    p.step.submit(value)
    p.step.close()
    join = asyncio.ensure_future(p.step.join(Deadline(3600.0, FakeClock())))
    await turns()
    assert not join.done()
    release.set()
    await asyncio.wait_for(join, timeout=5.0)
    assert [w.enriched for w in p.next.submitted] == [value.enriched]
    assert p.next.events[-2:] == ["poll", "join"]


async def test_terminate_cancels_the_delivery_in_flight() -> None:
    class StuckSink(FakeSink):
        async def send_all(
            self, records: Sequence[OutgoingRecord], one_by_one: bool = False
        ) -> list[Result]:
            await asyncio.Event().wait()
            return []

    p = Produce(StuckSink())
    p.step.submit(encoded(row_item(0)))
    await turns()
    p.step.terminate()
    await turns()
    p.step.poll()
    assert p.next.submitted == []
    assert p.next.terminates == 1
    p.step.submit(encoded(row_item(1)))  # room again


async def test_a_refused_dead_letter_whose_source_has_dlq_truncated_keeps_its_first_kb() -> None:
    """A record replayed from a DLQ keeps its dlq.* headers; it is still no stub of ours."""
    source = record(1, b"not json " + b"x" * 5000, headers=[("dlq.truncated", b"true")])
    p = Produce()
    p.sink.scripted = [[MessageSizeTooLargeError()]]
    await p.deliver(encoded(item_of(source)))
    [stub] = p.sink.calls[1]
    assert stub.value == source.value[:STUB_BYTES]  # type: ignore[index]


async def test_a_refused_output_is_counted_as_output_rejected_whatever_the_source_headers() -> None:
    source = record(1, headers=[("dlq.truncated", b"true")])
    p = Produce()
    p.sink.scripted = [[MessageSizeTooLargeError()]]
    await p.deliver(encoded(item_of(source)))
    assert p.events.dead_letters == ["output_rejected"]


# --- exactly once ---


class FakeTransactions:
    """A TransactionSink: each deliver answers from its partition's script, else all acked."""

    def __init__(self) -> None:
        self.calls: list[tuple[TopicPartition, list[OutgoingRecord], int, str]] = []
        self.scripted: dict[TopicPartition, list[BaseException | list[Result]]] = {}
        self.resets: list[TopicPartition] = []
        self.one_by_one: list[bool] = []

    async def deliver(
        self,
        tp: TopicPartition,
        records: Sequence[OutgoingRecord],
        next_offset: int,
        group_id: str,
        one_by_one: bool = False,
    ) -> list[Result]:
        self.calls.append((tp, list(records), next_offset, group_id))
        self.one_by_one.append(one_by_one)
        script = self.scripted.get(tp)
        if script:
            answer = script.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer
        return [None] * len(records)

    async def reset(self, tp: TopicPartition) -> None:
        self.resets.append(tp)


class Transact:
    def __init__(self, transactions: Any = None) -> None:
        self.transactions = transactions if transactions is not None else FakeTransactions()
        self.events = FakeEvents()
        self.next: Recording[EncodedWindow] = Recording()
        self.sleep = RecordingSleep()
        self.step = TransactionalProduceStep(
            self.transactions,
            "group",
            Replacements(encoder(), "stub", self.events),
            self.events,
            BACKOFF,
            self.next,
            Wakeup(),
            sleep=self.sleep,
        )

    async def deliver(self, value: EncodedWindow) -> EncodedWindow:
        self.step.submit(value)
        await spin(lambda: bool(self.next.submitted), poll=self.step.poll)
        return self.next.submitted[-1]


def three_on_two_partitions() -> EncodedWindow:
    return encoded(row_item(3), row_item(9, tp=TP1), row_item(4))


async def test_each_input_partition_gets_one_transaction_that_commits_its_next_offset() -> None:
    t = Transact()
    value = three_on_two_partitions()
    r3, r9, r4 = value.records
    delivered = await t.deliver(value)
    assert t.transactions.calls == [(TP0, [r3, r4], 5, "group"), (TP1, [r9], 10, "group")]
    assert delivered.records == value.records
    assert t.events.advanced == [TP0, TP1]
    assert t.transactions.resets == []


async def test_a_fenced_partition_is_dropped_without_a_reset_and_the_window_still_goes_on() -> None:
    t = Transact()
    t.transactions.scripted[TP0] = [ProducerFenced()]
    value = three_on_two_partitions()
    delivered = await t.deliver(value)
    assert [call[0] for call in t.transactions.calls] == [TP0, TP1]  # the other still goes
    assert t.transactions.resets == []  # a reset would fence the partition's new owner
    assert t.events.advanced == [TP1]
    assert delivered.enriched is value.enriched
    assert t.sleep.delays == []


async def test_a_refused_record_aborts_its_transaction_and_the_whole_partition_goes_again() -> None:
    t = Transact()
    value = three_on_two_partitions()
    r3, r9, r4 = value.records
    t.transactions.scripted[TP0] = [[None, MessageSizeTooLargeError()]]
    delivered = await t.deliver(value)
    (tp_a, first, _, _), (tp_b, second, offset, _), (tp_c, _, _, _) = t.transactions.calls
    assert (tp_a, tp_b, tp_c) == (TP0, TP0, TP1)
    assert first == [r3, r4]
    assert second[0] is r3  # acknowledged but aborted with the rest: sent again
    assert second[1].topic == DLQ and headers(second[1])["dlq.reason"] == b"output_rejected"
    assert offset == 5
    assert t.transactions.resets == [TP0]
    assert t.sleep.delays == []  # only refusals: no wait before the next transaction
    assert t.events.advanced == [TP0, TP1]  # TP0 only once its transaction committed
    assert delivered.records == [r3, r9, second[1]]


async def test_a_retriable_record_error_waits_resets_and_sends_the_partition_again() -> None:
    t = Transact()
    value = encoded(row_item(0), row_item(1))
    t.transactions.scripted[TP0] = [[None, KafkaTimeoutError()]]
    await t.deliver(value)
    assert [call[1] for call in t.transactions.calls] == [value.records, value.records]
    assert t.sleep.delays == [0.5]
    assert t.transactions.resets == [TP0]
    assert t.events.advanced == [TP0]
    assert [what for what, _ in t.events.errors] == ["transaction aborted, retrying"]


async def test_a_failed_transaction_waits_the_backoff_resets_and_tries_again() -> None:
    t = Transact()
    t.transactions.scripted[TP0] = [KafkaConnectionError(), KafkaConnectionError()]
    value = encoded(row_item(0))
    await t.deliver(value)
    assert len(t.transactions.calls) == 3
    assert t.sleep.delays == [0.5, 1.0]
    assert t.transactions.resets == [TP0, TP0]
    assert t.events.advanced == [TP0]


async def test_partition_advanced_is_reported_only_for_committed_transactions() -> None:
    t = Transact()
    t.transactions.scripted[TP0] = [ProducerFenced()]
    t.transactions.scripted[TP1] = [[KafkaTimeoutError()], [None]]
    await t.deliver(three_on_two_partitions())
    assert t.events.advanced == [TP1]
    assert t.events.ok == 1


async def test_a_transactional_dead_letter_that_cannot_be_stubbed_stops_the_consumer() -> None:
    t = Transact()
    t.transactions.scripted[TP0] = [[MessageSizeTooLargeError()]] * 3
    t.step.submit(encoded(dead_item(0)))
    with pytest.raises(DeliveryFailed):
        await spin(lambda: False, poll=t.step.poll)
    assert t.events.advanced == []


class FakeBroker:
    def __init__(self) -> None:
        self.down = False
        self.commits = 0
        self.offsets: dict[Any, int] = {}


class FakeProducer:
    """Just enough of a transactional AIOKafkaProducer for TransactionalSink."""

    def __init__(self, broker: FakeBroker) -> None:
        self._broker = broker

    def _check(self) -> None:
        if self._broker.down:
            raise KafkaConnectionError("the broker is down")

    async def start(self) -> None:
        self._check()

    async def stop(self) -> None:
        pass

    async def begin_transaction(self) -> None:
        self._check()

    async def send(self, topic: str, **_: Any) -> asyncio.Future[None]:
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sent.set_result(None)
        return sent

    async def send_offsets_to_transaction(self, offsets: dict[Any, int], group_id: str) -> None:
        self._broker.offsets.update(offsets)

    async def commit_transaction(self) -> None:
        self._broker.commits += 1

    async def abort_transaction(self) -> None:
        pass


async def test_an_exactly_once_retry_survives_a_broker_outage_during_the_producer_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker()
    monkeypatch.setattr(
        transactions_module, "build_producer", lambda *args, **kwargs: FakeProducer(broker)
    )
    sink = TransactionalSink(cast(Any, SimpleNamespace(group_id="group")), None, "prefix")
    await sink.assign([TP0])
    t = Transact(sink)
    sleeps = 0

    def broker_back_after_two_waits(_: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps == 2:
            broker.down = False

    t.sleep.on_sleep = broker_back_after_two_waits
    broker.down = True
    await t.deliver(encoded(row_item(0)))
    assert broker.commits == 1
    assert t.events.advanced == [TP0]


async def test_a_batch_refused_whole_is_sent_one_by_one_so_only_the_large_record_is_replaced() -> (
    None
):
    """The broker refuses a whole batch over a topic's limit: every record of it gets the
    error, though only one is too large. Sent alone, the others go through as outputs."""
    p = Produce()
    too_large = MessageSizeTooLargeError
    p.sink.scripted = [[too_large(), too_large(), too_large()], [None, too_large(), None]]
    value = encoded(row_item(0), row_item(1), row_item(2))
    r0, r1, r2 = value.records
    delivered = await p.deliver(value)
    assert p.sink.calls[:2] == [[r0, r1, r2], [r0, r1, r2]]
    assert p.sink.one_by_one[:2] == [False, True]
    [replacement] = p.sink.calls[2]
    assert headers(replacement)["source.offset"] == b"1"
    assert delivered.records == [r0, replacement, r2]
    assert p.events.dead_letters == ["output_rejected"]


async def test_a_transaction_refused_as_a_batch_is_tried_again_one_record_at_a_time() -> None:
    t = Transact()
    value = three_on_two_partitions()
    r3, r9, r4 = value.records
    too_large = MessageSizeTooLargeError
    t.transactions.scripted[TP0] = [[too_large(), too_large()], [None, too_large()]]
    delivered = await t.deliver(value)
    assert [call[1] for call in t.transactions.calls[:2]] == [[r3, r4], [r3, r4]]
    assert t.transactions.one_by_one[:3] == [False, True, True]
    assert delivered.records[0] is r3 and delivered.records[1] is r9
    assert headers(delivered.records[2])["dlq.reason"] == b"output_rejected"
