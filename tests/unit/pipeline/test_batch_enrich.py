"""Batch enrich step: a window is one job, recorded before it is created; line errors, refused
and expired jobs, jobs a dead member left, per-file limits; with a scripted provider."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import pytest

from consumer.config import (
    BudgetSettings,
    LLMSettings,
    ModelPrice,
    PricingSettings,
    RetrySettings,
    ValidateSettings,
)
from consumer.enrich.batchjobs import SUBMITTING, JobRegistry
from consumer.enrich.outcome import RowOutcome
from consumer.enrich.spend import SpendLedger
from consumer.enrich.validate import AnswerRules
from consumer.llm.batch import BatchAPI, BatchJob
from consumer.llm.errors import FailureKind, LLMFailure
from consumer.llm.pricing import Pricing
from consumer.pipeline.batch_enrich import BatchEnrichStep, BatchParts, BatchTracker, backlog_behind
from consumer.pipeline.enrich import EnrichedWindow
from consumer.pipeline.protocol import Deadline, Wakeup
from consumer.retry import Backoff
from consumer.window import Window
from tests.unit.pipeline.recording import (
    FakeClock,
    FakeHealth,
    Recording,
    RecordingSleep,
    fixed_rng,
    row_item,
    spin,
    success,
    template,
    window,
)

# When row_item's records were published (their timestamp), in seconds.
PUBLISHED_S = 1_700_000_000.0
# What the harness's budget charges each request at admission.
ESTIMATE_USD = 0.01
# (custom_id, body, attempt of this row) -> (status, body) of its line, or None: no answer
Answer = Callable[[str, dict[str, Any], int], tuple[int, Any] | None]


def completion(text: str) -> dict[str, Any]:
    return {
        "model": "gpt-test",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def answered(custom_id: str, body: dict[str, Any], attempt: int) -> tuple[int, Any] | None:
    return 200, completion(f"answer {custom_id}")


class MemoryTable:
    """The GlobalTable calls the registry makes; `flushes` counts acknowledged waits."""

    def __init__(self) -> None:
        self.entries: dict[bytes, bytes] = {}
        self.flushes = 0

    def get(self, key: bytes) -> bytes | None:
        return self.entries.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.entries[key] = value

    def delete(self, key: bytes) -> None:
        self.entries.pop(key, None)

    async def flush(self) -> int:
        self.flushes += 1
        return 0


class ScriptedBatches:
    """A provider batch API in memory: a job is in progress for `polls_to_finish` polls."""

    def __init__(
        self, settings: LLMSettings, table: MemoryTable, answer: Answer = answered
    ) -> None:
        self.api = BatchAPI(settings)
        self.table = table
        self.answer = answer
        self.files: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.attempts: dict[str, int] = {}
        self.polls_to_finish = 1
        self.final_status = "completed"
        self.refuse: LLMFailure | None = None
        self.poll_failures = 0
        self.records_at_upload: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        return self.api.line(custom_id, body)

    def lines_of(self, batch_id: str) -> list[str]:
        content = self.files[self.jobs[batch_id]["input"]]
        return [orjson.loads(raw)["custom_id"] for raw in content.splitlines()]

    async def upload(self, content: bytes, filename: str) -> str:
        self.records_at_upload += [
            orjson.loads(v) for k, v in self.table.entries.items() if k.startswith(b"job:")
        ]
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = content
        return file_id

    async def create(self, input_file_id: str, metadata: Mapping[str, str]) -> BatchJob:
        if self.refuse is not None:
            raise self.refuse
        batch_id = f"batch-{next(self._ids)}"
        self.jobs[batch_id] = {"input": input_file_id, "polls": 0, "metadata": dict(metadata)}
        return BatchJob(batch_id, "validating", metadata=dict(metadata))

    async def retrieve(self, batch_id: str) -> BatchJob:
        if self.poll_failures:
            self.poll_failures -= 1
            raise LLMFailure(FailureKind.SYSTEMIC, "unauthorized", "key revoked", 401)
        job = self.jobs[batch_id]
        job["polls"] += 1
        if job["polls"] <= self.polls_to_finish:
            return BatchJob(batch_id, "in_progress")
        if "output" not in job:
            job["output"], job["status"] = self._finish(batch_id), self.final_status
        return BatchJob(batch_id, job["status"], job["output"], None)

    async def find(self, key: str, value: str) -> BatchJob | None:
        for batch_id, job in self.jobs.items():
            if job["metadata"].get(key) == value:
                return BatchJob(batch_id, "in_progress")
        return None

    async def content(self, file_id: str) -> bytes:
        return self.files[file_id]

    def _finish(self, batch_id: str) -> str:
        out = []
        for raw in self.files[self.jobs[batch_id]["input"]].splitlines():
            line = orjson.loads(raw)
            cid = line["custom_id"]
            self.attempts[cid] = self.attempts.get(cid, 0) + 1
            result = self.answer(cid, line["body"], self.attempts[cid])
            if result is None:
                error = {"code": "batch_expired", "message": "expired"}
                out.append({"custom_id": cid, "response": None, "error": error})
            else:
                response = {"status_code": result[0], "request_id": "r", "body": result[1]}
                out.append({"custom_id": cid, "response": response, "error": None})
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = b"\n".join(orjson.dumps(line) for line in out)
        return file_id


class LiveEnricher:
    def __init__(self) -> None:
        self.rounds: list[list[Any]] = []

    async def enrich(self, rows: list[dict[str, Any]]) -> list[RowOutcome]:
        self.rounds.append([row["id"] for row in rows])
        return [success(f"live {row['id']}") for row in rows]


class Harness:
    def __init__(
        self,
        answer: Answer = answered,
        pricing: Pricing | None = None,
        backlog: Callable[[Window], int] | None = None,
        wall_clock: Callable[[], float] = lambda: PUBLISHED_S,
        ledger: SpendLedger | None = None,
        rules: AnswerRules | None = None,
        **batch: Any,
    ) -> None:
        self.settings = LLMSettings(
            provider="openai",
            model="gpt-test",
            template="{{ row.t }}",
            mode="batch" if backlog is None else "auto",
            batch=batch,
        )
        self.modes: list[str] = []
        self.table = MemoryTable()
        self.provider = ScriptedBatches(self.settings, self.table, answer)
        self.registry = JobRegistry(self.table)
        self.live = LiveEnricher()
        self.next: Recording[EnrichedWindow] = Recording()
        self.sleep = RecordingSleep()
        parts = BatchParts(
            self.settings,
            self.provider,
            self.registry,
            template(),
            lambda messages: {"model": "gpt-test", "messages": messages},
            lambda messages: "k" * 64,
            BatchTracker(on_window=self.modes.append),
            pricing=pricing,
            ledger=ledger,
            estimate_usd=None if ledger is None else (lambda messages: ESTIMATE_USD),
            rules=rules,
        )
        self.step = BatchEnrichStep(
            parts,
            self.live,
            RetrySettings(partial_window_retries=2),
            FakeHealth(),
            4,
            self.next,
            Wakeup(),
            Backoff(2.0, 60.0, fixed_rng),
            sleep=self.sleep,
            clock=FakeClock(),
            backlog=backlog,
            wall_clock=wall_clock,
        )

    async def run(self, *windows: Window) -> list[list[RowOutcome | None]]:
        for w in windows:
            self.step.submit(w)
        await spin(lambda: len(self.next.submitted) >= len(windows), poll=self.step.poll)
        return [enriched.outcomes for enriched in self.next.submitted]


def texts(outcomes: list[RowOutcome | None]) -> list[Any]:
    return [o.completion.content if o and o.completion else None for o in outcomes]


async def test_a_window_is_one_job_recorded_before_it_is_created_named_by_offsets() -> None:
    h = Harness()
    [outcomes] = await h.run(window(row_item(0), row_item(1), row_item(2)))
    assert texts(outcomes) == [f"answer in/0/{i}" for i in range(3)]
    assert all(o is not None and o.mode == "batch" for o in outcomes)
    [batch_id] = h.provider.jobs
    assert h.provider.lines_of(batch_id) == ["in/0/0", "in/0/1", "in/0/2"]
    [recorded] = h.provider.records_at_upload
    assert recorded["state"] == SUBMITTING and recorded["ranges"] == {"in/0": [0, 2]}
    assert h.table.flushes >= 1, "the record is acknowledged before the job is created"
    [job] = h.registry.covering(["in/0/1"])
    assert job.batch_id == batch_id and job.state == "delivered"


async def test_a_retryable_line_error_is_retried_in_the_next_batch_alone() -> None:
    def answer(cid: str, body: dict[str, Any], attempt: int) -> tuple[int, Any] | None:
        if cid == "in/0/1" and attempt == 1:
            return 500, {"error": {"message": "boom", "type": "server_error", "code": None}}
        return answered(cid, body, attempt)

    h = Harness(answer)
    [outcomes] = await h.run(window(row_item(0), row_item(1), row_item(2)))
    assert texts(outcomes) == ["answer in/0/0", "answer in/0/1", "answer in/0/2"]
    assert len(h.provider.jobs) == 2
    assert h.provider.lines_of(list(h.provider.jobs)[1]) == ["in/0/1"]


async def test_retry_rows_live_sends_the_retryable_rows_as_live_requests() -> None:
    def answer(cid: str, body: dict[str, Any], attempt: int) -> tuple[int, Any] | None:
        if cid == "in/0/2":
            return 429, {
                "error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}
            }
        return answered(cid, body, attempt)

    h = Harness(answer, retry_rows="live")
    [outcomes] = await h.run(window(row_item(0), row_item(1), row_item(2)))
    assert texts(outcomes) == ["answer in/0/0", "answer in/0/1", "live 2"]
    assert h.live.rounds == [[2]]
    assert len(h.provider.jobs) == 1


async def test_a_line_error_about_the_row_is_its_error_field_at_once() -> None:
    def answer(cid: str, body: dict[str, Any], attempt: int) -> tuple[int, Any] | None:
        if cid == "in/0/0":
            return 400, {
                "error": {
                    "message": "bad",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                }
            }
        return answered(cid, body, attempt)

    h = Harness(answer)
    [outcomes] = await h.run(window(row_item(0), row_item(1)))
    first = outcomes[0]
    assert first is not None and first.error is not None
    assert first.error.reason == "context_length_exceeded" and first.mode == "batch"
    assert len(h.provider.jobs) == 1


async def test_a_job_refused_as_a_whole_holds_the_window_and_never_makes_error_rows() -> None:
    h = Harness()
    h.provider.refuse = LLMFailure(FailureKind.ROW, "invalid_request", "bad file", 400)
    held: list[str | None] = []

    def on_sleep(seconds: float) -> None:
        held.append(h.step.held_back_reason)
        if len(held) == 3:
            h.provider.refuse = None

    h.sleep.on_sleep = on_sleep
    [outcomes] = await h.run(window(row_item(0), row_item(1), row_item(2)))
    assert texts(outcomes) == [f"answer in/0/{i}" for i in range(3)]
    assert held[0] is not None and held[0].startswith("invalid_request")
    assert len(h.provider.jobs) == 1


async def test_an_expired_job_resubmits_only_the_rows_it_did_not_answer() -> None:
    def answer(cid: str, body: dict[str, Any], attempt: int) -> tuple[int, Any] | None:
        if attempt == 1 and cid in ("in/0/2", "in/0/3"):
            return None
        return answered(cid, body, attempt)

    h = Harness(answer)
    h.provider.final_status = "expired"

    def later_ones_complete(seconds: float) -> None:
        if len(h.provider.jobs) > 1:
            h.provider.final_status = "completed"

    h.sleep.on_sleep = later_ones_complete
    [outcomes] = await h.run(window(*(row_item(i) for i in range(4))))
    assert texts(outcomes) == [f"answer in/0/{i}" for i in range(4)]
    assert len(h.provider.jobs) == 2
    assert h.provider.lines_of(list(h.provider.jobs)[1]) == ["in/0/2", "in/0/3"]


async def test_a_job_recorded_by_a_member_that_died_is_awaited_not_submitted_again() -> None:
    h = Harness()
    dead = h.registry.new("their-window", ["in/0/0", "in/0/1"])
    await h.registry.record(dead)
    content = b"".join(h.provider.line(f"in/0/{i}", {"messages": []}) for i in range(2))
    file_id = await h.provider.upload(content, "x.jsonl")
    created = await h.provider.create(file_id, {"llm_consumer_job": dead.key})
    # The member died before it recorded the job's id: the job is found by its metadata.
    [outcomes] = await h.run(window(row_item(0), row_item(1), row_item(2)))
    assert texts(outcomes) == [f"answer in/0/{i}" for i in range(3)]
    first, second = h.provider.jobs
    assert first == created.id
    assert h.provider.lines_of(second) == ["in/0/2"], "only the row no job held is paid for"


async def test_a_window_over_the_per_file_request_limit_becomes_several_jobs() -> None:
    h = Harness(max_requests_per_file=2)
    [outcomes] = await h.run(window(*(row_item(i) for i in range(5))))
    assert texts(outcomes) == [f"answer in/0/{i}" for i in range(5)]
    assert [len(h.provider.lines_of(b)) for b in h.provider.jobs] == [2, 2, 1]


async def test_closing_while_a_job_runs_abandons_the_window_and_keeps_its_record() -> None:
    h = Harness()
    h.provider.polls_to_finish = 1_000_000
    h.sleep.blocking = True
    h.step.submit(window(row_item(0)))
    await spin(lambda: h.sleep.sleeping > 0)
    h.step.close()
    await h.step.join(Deadline(5.0))  # returns at once: the waiting window gives up
    assert h.next.submitted == []
    [job] = h.registry.covering(["in/0/0"])
    assert job.batch_id is not None and job.state == "in_progress", "the next owner waits for it"


async def test_batch_answers_cost_the_models_batch_share_of_its_price() -> None:
    price = ModelPrice(input_per_million=1.0, output_per_million=2.0, batch_factor=0.5)
    pricing = Pricing(PricingSettings(models={"gpt-test": price}), "gpt-test")
    h = Harness(pricing=pricing)
    [outcomes] = await h.run(window(row_item(0)))
    [outcome] = outcomes
    assert outcome is not None
    live_usd = (3 * 1.0 + 1 * 2.0) / 1_000_000  # usage of the scripted answer: 3 in, 1 out
    assert outcome.cost.usd == live_usd * 0.5 and outcome.cost.source == "prices"


async def test_auto_sends_a_window_with_a_backlog_behind_it_to_a_batch_and_others_live() -> None:
    behind = {"w-big": 5_000, "w-small": 10}
    h = Harness(backlog=lambda w: behind[w.id], auto_backlog_rows=1_000)
    big = window(row_item(0), window_id="w-big")
    small = window(row_item(1), window_id="w-small")
    first, second = await h.run(big, small)
    assert first[0] is not None and first[0].mode == "batch"
    assert second[0] is not None and second[0].mode == "live"
    assert h.modes == ["batch", "live"]
    assert h.live.rounds == [[1]] and len(h.provider.jobs) == 1


def test_the_backlog_is_what_the_high_watermarks_show_behind_the_window() -> None:
    w = window(row_item(3), row_item(4))  # partition in/0 up to offset 4: next is 5
    assert backlog_behind(w, lambda tp: 105) == 100
    assert backlog_behind(w, lambda tp: None) == 0


async def test_records_of_jobs_delivered_long_ago_are_deleted_as_new_jobs_come() -> None:
    h = Harness()
    for offset in range(70):  # one window, one job after the other
        await h.run(window(row_item(offset)))
        h.next.submitted.clear()
    jobs = [k for k in h.table.entries if k.startswith(b"job:")]
    assert len(jobs) == 64, "the partition's index keeps 64; older delivered records go"
    assert h.registry.covering(["in/0/69"]) and not h.registry.covering(["in/0/0"])


async def test_polls_that_fail_are_tried_again_and_readiness_says_why_meanwhile() -> None:
    h = Harness()
    h.provider.poll_failures = 2
    seen: list[str | None] = []
    h.sleep.on_sleep = lambda seconds: seen.append(h.step.held_back_reason)
    [outcomes] = await h.run(window(row_item(0)))
    assert texts(outcomes) == ["answer in/0/0"]
    assert seen[:2] == ["batch poll failing: unauthorized"] * 2
    assert h.step.held_back_reason is None
    assert len(h.provider.jobs) == 1, "the job runs on: it is not submitted again"


class SpendTable:
    """The two calls a spend ledger makes of its table, in memory."""

    def __init__(self) -> None:
        self.entries: dict[bytes, bytes] = {}

    def put(self, key: bytes, value: bytes) -> None:
        self.entries[key] = value

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in self.entries.items() if k.startswith(prefix)]


def budget_ledger(usd_per_hour: float) -> SpendLedger:
    now = [1_000_000.0]
    return SpendLedger(
        SpendTable(),
        BudgetSettings(usd_per_hour=usd_per_hour),
        "t" * 64,
        clock=lambda: now[0],
        monotonic=lambda: now[0],
        write_every_s=0.0,
        read_every_s=0.0,
    )


async def test_a_job_is_charged_to_the_budget_before_it_exists_and_settled_by_its_answers() -> None:
    price = ModelPrice(input_per_million=1.0, output_per_million=2.0, batch_factor=0.5)
    pricing = Pricing(PricingSettings(models={"gpt-test": price}), "gpt-test")
    ledger = budget_ledger(1.0)
    h = Harness(pricing=pricing, ledger=ledger)
    [outcomes] = await h.run(window(row_item(0), row_item(1)))
    assert texts(outcomes) == ["answer in/0/0", "answer in/0/1"]
    answers_usd = sum(o.cost.usd or 0.0 for o in outcomes if o is not None)
    assert answers_usd > 0
    assert ledger.remaining("hour") == pytest.approx(1.0 - answers_usd)  # estimate -> cost


async def test_a_spent_budget_holds_the_window_without_creating_a_job_or_error_rows() -> None:
    ledger = budget_ledger(0.015)  # room for one row's estimate, the window has two
    h = Harness(ledger=ledger)
    held: list[str | None] = []

    def on_sleep(seconds: float) -> None:
        held.append(h.step.held_back_reason)

    h.sleep.on_sleep = on_sleep
    h.step.submit(window(row_item(0), row_item(1)))
    await spin(lambda: len(held) >= 2, poll=h.step.poll)
    assert h.provider.jobs == {}, "nothing is sent past the budget"
    assert h.next.submitted == []
    assert held[0] is not None and held[0].startswith("budget_exhausted")


async def test_a_batch_answer_that_fails_validation_is_an_invalid_answer_row_at_once() -> None:
    def answer(cid: str, body: dict[str, Any], attempt: int) -> tuple[int, Any] | None:
        return 200, completion("The review is positive." if cid == "in/0/0" else " positive\n")

    rules = AnswerRules(ValidateSettings(allowed=["POSITIVE", "NEGATIVE"]))
    h = Harness(answer, rules=rules)
    [outcomes] = await h.run(window(row_item(0), row_item(1)))
    bad, good = outcomes
    assert bad is not None and bad.error is not None and bad.error.reason == "invalid_answer"
    assert bad.rejected is not None and bad.rejected.content == "The review is positive."
    assert good is not None and good.completion is not None
    assert good.completion.content == "POSITIVE"  # normalised to the allowed spelling
    assert len(h.provider.jobs) == 1  # not asked again in another job


async def test_auto_sends_rows_that_can_wait_a_batch_within_their_deadline_to_a_batch() -> None:
    now = [PUBLISHED_S + 600.0]  # the rows were published 10 minutes ago
    h = Harness(
        backlog=lambda w: 0,
        wall_clock=lambda: now[0],
        auto_row_deadline_s=3600.0,
        auto_batch_turnaround_s=1800.0,
    )
    [fresh] = await h.run(window(row_item(0), window_id="w-fresh"))
    now[0] = PUBLISHED_S + 2400.0  # 40 minutes: a 30-minute batch would miss the hour
    h.next.submitted.clear()
    [late] = await h.run(window(row_item(1), window_id="w-late"))
    assert fresh[0] is not None and fresh[0].mode == "batch"
    assert late[0] is not None and late[0].mode == "live"
    assert h.modes == ["batch", "live"]
