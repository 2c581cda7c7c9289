"""The spend ledger: admission by estimate, reconciliation, refusals, periods, shared spend."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from consumer.config import BudgetSettings, LLMSettings
from consumer.enrich.spend import BudgetedCaller, Reservation, SpendLedger
from consumer.llm.caller import CallResult
from consumer.llm.client import Completion, Usage
from consumer.llm.errors import FailureKind, LLMFailure
from consumer.llm.pricing import Pricing
from consumer.state import LocalStore


class Table:
    """What a GlobalTable shares between replicas: one dict here."""

    def __init__(self) -> None:
        self.entries: dict[bytes, bytes] = {}

    def put(self, key: bytes, value: bytes) -> None:
        self.entries[key] = value

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in sorted(self.entries.items()) if k.startswith(prefix)]


class Clock:
    def __init__(self, now: float = 36_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ledger(table: Table, clock: Clock, **budget: float) -> SpendLedger:
    return SpendLedger(
        table,
        BudgetSettings(**budget),  # type: ignore[arg-type]
        "t" * 64,
        clock=clock,
        monotonic=clock,
        write_every_s=0.0,
        read_every_s=0.0,
    )


def test_requests_are_admitted_until_the_next_would_pass_the_budget() -> None:
    clock = Clock()
    spend = ledger(Table(), clock, usd_per_hour=1.0)
    admitted = [spend.admit(0.3) for _ in range(4)]
    assert [isinstance(a, Reservation) for a in admitted] == [True, True, True, False]
    refused = admitted[3]
    assert isinstance(refused, LLMFailure)
    assert refused.kind is FailureKind.SYSTEMIC
    assert refused.reason == "budget_exhausted"
    assert refused.retry_after_s == pytest.approx(3600.0)


def test_settling_gives_back_what_the_estimate_overcharged() -> None:
    clock = Clock()
    spend = ledger(Table(), clock, usd_per_hour=1.0)
    first = spend.admit(0.6)
    assert isinstance(first, Reservation)
    assert isinstance(spend.admit(0.6), LLMFailure)
    spend.settle(first, 0.1)
    assert isinstance(spend.admit(0.6), Reservation)
    assert spend.remaining("hour") == pytest.approx(0.3)


def test_the_next_period_has_a_fresh_budget() -> None:
    clock = Clock()
    spend = ledger(Table(), clock, usd_per_hour=1.0)
    assert isinstance(spend.admit(1.0), Reservation)
    assert isinstance(spend.admit(0.01), LLMFailure)
    clock.now += 3600
    assert isinstance(spend.admit(0.01), Reservation)


def test_the_day_cap_holds_across_hours() -> None:
    clock = Clock()
    spend = ledger(Table(), clock, usd_per_hour=1.0, usd_per_day=1.5)
    assert isinstance(spend.admit(1.0), Reservation)
    clock.now += 3600
    assert isinstance(spend.admit(0.5), Reservation)
    refused = spend.admit(0.1)
    assert isinstance(refused, LLMFailure)
    assert "budget per day" in refused.message


def test_two_replicas_and_a_restarted_one_share_one_budget() -> None:
    table, clock = Table(), Clock()
    first = ledger(table, clock, usd_per_hour=1.0)
    second = ledger(table, clock, usd_per_hour=1.0)
    assert isinstance(first.admit(0.5), Reservation)
    assert isinstance(second.admit(0.4), Reservation)
    assert isinstance(second.admit(0.2), LLMFailure)
    # A process that replaces `first` after a SIGKILL reads its spend from the table.
    restarted = ledger(table, clock, usd_per_hour=1.0)
    assert restarted.remaining("hour") == pytest.approx(0.1)
    keys = sorted(table.entries)
    assert len(keys) == 2 and all(key.startswith(b"hour/10/") for key in keys)
    assert orjson.loads(table.entries[keys[0]])["usd"] in (0.5, 0.4)


def test_a_per_template_cap_counts_only_that_template() -> None:
    table, clock = Table(), Clock()
    other = SpendLedger(
        table,
        BudgetSettings(usd_per_hour=10.0),
        "o" * 64,
        clock=clock,
        monotonic=clock,
        write_every_s=0.0,
        read_every_s=0.0,
    )
    assert isinstance(other.admit(5.0), Reservation)
    budget = BudgetSettings(usd_per_hour=10.0, per_template={"t" * 64: {"usd_per_hour": 1.0}})
    mine = SpendLedger(
        table, budget, "t" * 64, clock=clock, monotonic=clock, write_every_s=0, read_every_s=0
    )
    assert isinstance(mine.admit(0.9), Reservation)
    refused = mine.admit(0.2)
    assert isinstance(refused, LLMFailure) and "for template tttt" in refused.message


def test_refusals_are_logged_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    spend = ledger(Table(), clock, usd_per_hour=1.0)
    for _ in range(5):
        spend.admit(2.0)
    clock.now += 61
    spend.admit(2.0)
    assert caplog.text.count("budget exhausted") == 2


class Answers:
    def __init__(self, result: CallResult) -> None:
        self.result = result
        self.calls = 0

    async def call(self, messages: list[dict[str, str]]) -> CallResult:
        self.calls += 1
        return self.result


def test_the_budgeted_caller_charges_the_estimate_then_the_real_cost() -> None:
    settings = LLMSettings(
        provider="openai",
        model="m",
        template="x",
        max_tokens=100,
        pricing={"models": {"m": {"input_per_million": 1.0, "output_per_million": 10.0}}},
    )
    pricing = Pricing.from_settings(settings)
    answer = Completion("ok", "m", Usage(1000, 10, 1010), "stop")
    inner = Answers(CallResult(answer, None, 1))
    clock = Clock()
    spend = ledger(Table(), clock, usd_per_hour=1.0)
    caller = BudgetedCaller(inner, spend, pricing, "m", lambda _: 1000, 100)
    assert caller.estimate_usd([]) == pytest.approx((1000 * 1.0 + 100 * 10.0) / 1e6)
    result = asyncio.run(caller.call([]))
    assert result.completion is answer
    assert spend.remaining("hour") == pytest.approx(1.0 - (1000 + 100) / 1e6)


def test_a_refused_request_is_never_sent() -> None:
    settings = LLMSettings(
        provider="openai",
        model="m",
        template="x",
        pricing={"models": {"m": {"input_per_million": 1e6, "output_per_million": 0.0}}},
    )
    inner = Answers(CallResult(None, None, 1))
    spend = ledger(Table(), Clock(), usd_per_hour=1.0)
    caller = BudgetedCaller(inner, spend, Pricing.from_settings(settings), "m", lambda _: 2, 0)
    result = asyncio.run(caller.call([]))
    assert inner.calls == 0
    assert result.failure is not None and result.failure.reason == "budget_exhausted"
    assert result.attempts == 0


def test_the_local_store_scans_one_prefix(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "spend.sqlite")
    try:
        for key in (b"hour/1/a", b"hour/1/b", b"hour/10/a", b"hour/2/a", b"day/1/a"):
            store.write(key, b'{"usd": 1}', 0)
        assert [key for key, _ in store.scan(b"hour/1/")] == [b"hour/1/a", b"hour/1/b"]
        store.write(b"\xff\xff", b"x", 0)
        assert [key for key, _ in store.scan(b"\xff")] == [b"\xff\xff"]
    finally:
        store.close()


def test_own_keys_of_old_periods_are_forgotten_and_not_rewritten() -> None:
    table, clock = Table(), Clock()
    spend = ledger(table, clock, usd_per_hour=1.0)
    old = spend.admit(0.5)
    assert isinstance(old, Reservation)
    clock.now += 3 * 3600
    assert isinstance(spend.admit(0.1), Reservation)
    written = dict(table.entries)
    spend.settle(old, 0.4)  # three periods late: its period no longer counts
    assert table.entries == written
    assert len(spend._own) == 1


def test_in_a_burst_each_replica_takes_only_its_share_until_the_others_can_see_it() -> None:
    """At a period's start both replicas' held windows go at once: what one admitted in the
    last half second the other cannot see yet, so each waits after its half of the budget."""
    table, clock = Table(), Clock()
    first, second = (
        SpendLedger(
            table,
            BudgetSettings(usd_per_hour=1.0),
            "t" * 64,
            clock=clock,
            monotonic=clock,
            write_every_s=0.0,
            read_every_s=10.0,  # neither sees the other's new spend during the burst
        )
        for _ in range(2)
    )
    assert isinstance(first.admit(0.125), Reservation)
    assert isinstance(second.admit(0.125), Reservation)
    clock.now += 3600  # a new period; both spent in the last one
    admitted: list[Reservation | LLMFailure | float] = []
    for _ in range(6):
        admitted += [first.admit(0.125), second.admit(0.125)]
    charged = sum(a.usd for a in admitted if isinstance(a, Reservation))
    waits = [a for a in admitted if isinstance(a, float)]
    assert 0.75 <= charged <= 1.0, "the burst takes the budget, and not twice over"
    assert waits and all(0 < wait <= 0.5 for wait in waits)
    clock.now += 10  # each sees the other's spend now
    assert isinstance(first.admit(0.25), LLMFailure)
