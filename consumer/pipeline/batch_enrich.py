"""Step 3 in batch mode: each window becomes a provider batch job instead of live requests.

The step is the live enrich step with another way of answering a window (`_enrich`), so windows
in flight (`llm.batch.max_pending_batches`), in-order forwarding, hold-backs and abandonment on
revocation are the same, and encoding, delivery and commits do not know the difference. While
jobs run the loop keeps fetching, and pauses the partitions once the step is full, so the
member stays in its group however long the provider takes.

A window's rows are written as one JSONL input file (more when the per-file limits say so) with
`custom_id` = `topic/partition/offset`; the job's record goes to the registry (and the broker
acknowledges it) before the job is created, and follows its status. The first round of a window
looks for recorded jobs that hold its rows (a member that died started them) and waits for
those instead of paying again; only rows no job holds are submitted.

Failures take the live paths: a line's error is classified like a live answer (`{rf}_error`
after `partial_window_retries` further rounds for retryable ones, in a batch or live as
`llm.batch.retry_rows` says); a job that fails as a whole (refused upload, auth, quota, failed
validation) makes its rows systemic failures, so the window is held back, never written as
error rows; the rows an expired job did not answer are submitted again at once, alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from consumer import audit
from consumer.config import LLMSettings, Settings
from consumer.enrich.batchjobs import (
    DELIVERED,
    METADATA_KEY,
    SUBMITTING,
    JobRecord,
    JobRegistry,
    batch_table,
    custom_id,
)
from consumer.enrich.holdback import HoldBackPolicy
from consumer.enrich.outcome import RowOutcome
from consumer.enrich.spend import Reservation, SpendLedger
from consumer.enrich.template import PromptTemplate, TemplateRenderError
from consumer.enrich.validate import AnswerRules
from consumer.llm.batch import BatchClient, BatchJob, LineResult, parse_lines, split_lines
from consumer.llm.budgets import estimate_prompt_tokens
from consumer.llm.client import Completion, parse_completion
from consumer.llm.errors import FailureKind, LLMFailure, RowError, classify_status
from consumer.llm.pricing import UNKNOWN, Cost, Pricing
from consumer.pipeline.enrich import EnrichedWindow, EnrichStep, aligned
from consumer.retry import Backoff
from consumer.state import GlobalTable
from consumer.window import Window

log = logging.getLogger("consumer")

MODE = "batch"
# Expired jobs resubmitted in one round before the round gives up on the rows still unanswered.
_MAX_RESUBMITS = 5


class BatchProvider(Protocol):
    """The provider's batch API (`llm/batch.py::BatchClient`; unit tests hand in a fake)."""

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes: ...

    async def upload(self, content: bytes, filename: str) -> str: ...

    async def create(self, input_file_id: str, metadata: Mapping[str, str]) -> BatchJob: ...

    async def retrieve(self, batch_id: str) -> BatchJob: ...

    async def find(self, key: str, value: str) -> BatchJob | None: ...

    async def content(self, file_id: str) -> bytes: ...


class BatchTracker:
    """Jobs in flight in this process, for the metrics (read at scrape time)."""

    def __init__(
        self,
        on_submit_error: Callable[[], None] = lambda: None,
        on_poll_error: Callable[[], None] = lambda: None,
        on_window: Callable[[str], None] = lambda mode: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._jobs: dict[str, tuple[str, int, float]] = {}
        self.on_submit_error = on_submit_error
        self.on_poll_error = on_poll_error
        # Each window's mode (live or batch), as it is chosen.
        self.on_window = on_window
        self._clock = clock

    def moved(self, key: str, state: str, rows: int) -> None:
        started = self._jobs.get(key, (state, rows, self._clock()))[2]
        self._jobs[key] = (state, rows, started)

    def done(self, key: str) -> None:
        self._jobs.pop(key, None)

    def by_state(self, state: str) -> int:
        return sum(1 for job_state, _, _ in self._jobs.values() if job_state == state)

    def rows_waiting(self) -> int:
        return sum(rows for _, rows, _ in self._jobs.values())

    def oldest_age_s(self) -> float:
        started = [at for _, _, at in self._jobs.values()]
        return self._clock() - min(started) if started else 0.0


@dataclass(frozen=True)
class BatchParts:
    """What batch mode is made of; built once (consumer/parts.py), shared by every chain."""

    settings: LLMSettings
    client: BatchProvider
    registry: JobRegistry
    template: PromptTemplate
    request_body: Callable[[list[dict[str, str]]], dict[str, Any]]
    request_key: Callable[[list[dict[str, str]]], str]
    tracker: BatchTracker = field(default_factory=BatchTracker)
    # Reads the registry's topic to its end (GlobalTable.catch_up); None in unit tests.
    catch_up: Callable[[float], Awaitable[object]] | None = None
    pricing: Pricing | None = None
    # The budget (llm.budget): a job is admitted by its rows' estimated cost at the batch
    # rate before it is created, and settled with what its answers cost.
    ledger: SpendLedger | None = None
    estimate_usd: Callable[[list[dict[str, str]]], float] | None = None
    # llm.validate: a batch answer that fails it is the row's `invalid_answer` at once (asking
    # again would be another job, hours later; the live path asks again).
    rules: AnswerRules | None = None


@dataclass
class _Row:
    custom_id: str
    variables_hash: str
    request_hash: str | None = None
    line: bytes | None = None
    usd: float = 0.0  # the request's estimated cost at the batch rate (the budget's charge)


@dataclass(frozen=True)
class _JobCharge:
    """A job's charge to the budget, and each row's share of it."""

    charge: Reservation
    rows_usd: list[float]


class _JobFailed(Exception):
    def __init__(self, failure: LLMFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass
class _Round:
    """What one round learnt: an answer (or line error) per custom_id, and whole-job failures."""

    lines: dict[str, LineResult] = field(default_factory=dict)
    failed: dict[str, LLMFailure] = field(default_factory=dict)
    expired: set[str] = field(default_factory=set)
    jobs: list[JobRecord] = field(default_factory=list)

    def take(self, results: Sequence[LineResult]) -> None:
        for result in results:
            known = self.lines.get(result.custom_id)
            # An answer wins over an error for the same row (a job found and one of its own).
            if (known is None or known.status_code != 200) and result.status_code is not None:
                self.lines[result.custom_id] = result


class BatchEnrichStep(EnrichStep):
    """The enrich step whose windows are answered by batch jobs.

    `backlog` (mode auto) tells how many rows wait behind a window in its partitions: a window
    with at most `auto_backlog_rows` behind it is enriched live, as the live step would, unless
    its oldest row can still wait a batch's turnaround within `auto_row_deadline_s`.
    """

    def __init__(
        self,
        batch: BatchParts,
        *args: Any,
        backlog: Callable[[Window], int] | None = None,
        wall_clock: Callable[[], float] = time.time,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._batch = batch
        self._backlog = backlog
        self._wall_clock = wall_clock  # against the records' timestamps (auto_row_deadline_s)
        self._caught_up: asyncio.Task[object] | None = None
        settings = batch.settings.batch
        self._poll = Backoff(
            settings.poll_initial_s, max(settings.poll_max_s, settings.poll_initial_s)
        )

    async def _enrich(self, window: Window) -> EnrichedWindow:
        mode = self._mode_of(window)
        self._batch.tracker.on_window(mode)
        if mode == "live":
            return await super()._enrich(window)
        started = self._clock()
        await self._ready()
        indexes = [i for i, item in enumerate(window.items) if item.row is not None]
        rows = [self._prepare(window, i) for i in indexes]
        outcomes: list[RowOutcome | None] = [None if isinstance(row, _Row) else row for row in rows]
        prepared = {i: row for i, row in enumerate(rows) if isinstance(row, _Row)}
        retry = self._retry
        policy = HoldBackPolicy(retry.partial_window_retries, self._backoff, retry.row_deadline_s)
        jobs: list[JobRecord] = []
        round_no = 1
        round_outcomes = await self._round(window, prepared, list(prepared), outcomes, jobs, 1)
        try:
            while True:
                done = [o for o in outcomes if o is not None]
                assert len(done) == len(outcomes)  # a round answers every row it is given
                hold = policy.next_hold(
                    done,
                    round_outcomes,
                    any(o.completion is not None for o in done),
                    failing_for_s=self._clock() - started,
                )
                if hold is None:
                    break
                todo = hold.rows_to_retry(done)
                self._announce_hold(window, hold, [done[i] for i in todo], MODE)
                await self._sleep_unless_closed(hold.seconds)
                round_no += 1
                if self._batch.settings.batch.retry_rows == "live" and not hold.systemic:
                    audit.enter_window(window.id, window.items)  # live calls are audited
                    live = await self._enricher.enrich(
                        [window.items[indexes[i]].row or {} for i in todo]
                    )
                    for index, outcome in zip(todo, live, strict=True):
                        outcomes[index] = outcome
                    round_outcomes = live
                else:
                    round_outcomes = await self._round(
                        window, prepared, todo, outcomes, jobs, round_no
                    )
        finally:
            self._holding.pop(window.id, None)
        for job in jobs:
            if job.state != DELIVERED:
                job.state = DELIVERED
                self._batch.registry.save(job)
        return aligned(window, indexes, outcomes, started)

    def _mode_of(self, window: Window) -> str:
        if self._backlog is None:
            return MODE
        settings = self._batch.settings.batch
        if settings.auto_row_deadline_s is not None and window.items:
            oldest_s = min(item.record.timestamp for item in window.items) / 1000.0
            waited_s = max(0.0, self._wall_clock() - oldest_s)
            if waited_s + settings.auto_batch_turnaround_s <= settings.auto_row_deadline_s:
                return MODE
        waiting = self._backlog(window)
        return MODE if waiting > settings.auto_backlog_rows else "live"

    async def _ready(self) -> None:
        """Read the registry to its end once per chain (assignment), before the first lookup."""
        catch_up = self._batch.catch_up
        if catch_up is None:
            return
        if self._caught_up is None:
            self._caught_up = asyncio.ensure_future(
                catch_up(self._batch.settings.batch.catch_up_timeout_s)
            )
        await asyncio.shield(self._caught_up)

    def _prepare(self, window: Window, index: int) -> _Row | RowOutcome:
        item = window.items[index]
        row = item.row
        assert row is not None
        batch = self._batch
        variables_hash = ""
        try:
            variables_hash = batch.template.variables_hash(row)
            messages = batch.template.render(row)
            cid = custom_id(item.record)
            body = batch.request_body(messages)
            usd = batch.estimate_usd(messages) if batch.estimate_usd is not None else 0.0
            return _Row(
                cid,
                variables_hash,
                batch.request_key(messages),
                batch.client.line(cid, body),
                usd,
            )
        except TemplateRenderError as error:
            row_error = RowError("template_error", str(error), None, 0, False)
        except Exception as error:
            log.warning("row failed inside the consumer", exc_info=True)
            row_error = RowError(
                "internal_error", f"{type(error).__name__}: {error}", None, 0, False
            )
        return RowOutcome(None, row_error, FailureKind.ROW, variables_hash, mode=MODE)

    async def _round(
        self,
        window: Window,
        prepared: dict[int, _Row],
        todo: list[int],
        outcomes: list[RowOutcome | None],
        jobs: list[JobRecord],
        round_no: int,
    ) -> list[RowOutcome]:
        """Answer the rows `todo` (indexes into the window's rows); their outcomes, in order."""
        ids = {prepared[i].custom_id: i for i in todo}
        state = _Round()
        if round_no == 1:
            found = self._batch.registry.covering(ids)
            if found:
                log.info(
                    "batch jobs found for the window's rows: waiting for them",
                    extra={"window_id": window.id, "jobs": [j.batch_id for j in found]},
                )
                # Their rows that they do not answer (failed, never created) are sent anew.
                await self._await_all(window.id, found, _Round(lines=state.lines))
                jobs.extend(found)
        unanswered = [cid for cid in ids if cid not in state.lines]
        charges: list[tuple[_JobCharge, list[str]]] = []
        for _ in range(_MAX_RESUBMITS + 1):
            if not unanswered:
                break
            new = await self._submit(window, prepared, ids, unanswered, state, charges)
            jobs.extend(new)
            await self._await_all(window.id, new, state)
            expired = [
                cid
                for cid in unanswered
                if cid in state.expired and cid not in state.lines and cid not in state.failed
            ]
            if not expired:
                break
            log.warning(
                "batch expired: submitting its unanswered rows again",
                extra={"window_id": window.id, "rows": len(expired)},
            )
            unanswered = expired
            state.expired.clear()
        out: list[RowOutcome] = []
        for cid, index in ids.items():
            row = prepared[index]
            line = state.lines.get(cid)
            if line is not None:
                outcome = self._line_outcome(row, line, round_no)
            elif cid in state.failed:
                outcome = _failed(row, state.failed[cid], round_no)
            else:
                missing = LLMFailure(
                    FailureKind.TRANSIENT,
                    "batch_unanswered",
                    "the batch job ended without an answer for this row",
                )
                outcome = _failed(row, missing, round_no)
            outcomes[index] = outcome
            out.append(outcome)
        self._settle(charges, {cid: outcomes[index] for cid, index in ids.items()})
        return out

    def _settle(
        self, charges: list[tuple[_JobCharge, list[str]]], by_id: Mapping[str, RowOutcome | None]
    ) -> None:
        """Replace each job's estimated charge by what its answers cost (an answer without a
        price keeps its estimate; a row left unanswered cost nothing). A row sent again after
        its job expired was answered by the later job: the jobs are settled last first, and
        each answer counts once."""
        ledger = self._batch.ledger
        if ledger is None:
            return
        counted: set[str] = set()
        for job_charge, chunk_ids in reversed(charges):
            usd = 0.0
            for cid, estimate in zip(chunk_ids, job_charge.rows_usd, strict=False):
                outcome = by_id.get(cid)
                if cid in counted or outcome is None or outcome.completion is None:
                    continue
                counted.add(cid)
                usd += estimate if outcome.cost.usd is None else outcome.cost.usd
            ledger.settle(job_charge.charge, usd)

    async def _submit(
        self,
        window: Window,
        prepared: dict[int, _Row],
        ids: dict[str, int],
        custom_ids: list[str],
        state: _Round,
        charges: list[tuple[_JobCharge, list[str]]],
    ) -> list[JobRecord]:
        settings = self._batch.settings.batch
        lines = [(cid, prepared[ids[cid]].line or b"") for cid in custom_ids]
        created: list[JobRecord] = []
        for chunk in split_lines(
            lines, settings.max_requests_per_file, settings.max_bytes_per_file
        ):
            chunk_ids = [cid for cid, _ in chunk]
            charge = await self._admit([prepared[ids[cid]].usd for cid in chunk_ids])
            if isinstance(charge, LLMFailure):  # the budget is spent: held like an outage
                state.failed.update(dict.fromkeys(chunk_ids, charge))
                continue
            job = self._batch.registry.new(window.id, chunk_ids)
            try:
                await self._create(job, b"".join(line for _, line in chunk))
                if charge is not None:
                    charges.append((charge, chunk_ids))
            except LLMFailure as failure:
                # Refused with an answer: no job, nothing paid. Without one (a timeout) the job
                # may exist, so its estimate stays charged.
                if charge is not None and failure.status_code is not None:
                    self._settle([(charge, [])], {})
                self._batch.tracker.on_submit_error()
                log.warning(
                    "batch job not created",
                    extra={
                        "window_id": window.id,
                        "reason": failure.reason,
                        "error": failure.message,
                    },
                )
                whole = _whole(failure)
                state.failed.update(dict.fromkeys(chunk_ids, whole))
                continue
            created.append(job)
        return created

    async def _admit(self, rows_usd: list[float]) -> _JobCharge | LLMFailure | None:
        """Charge the job's estimated cost to the budget before it exists (None: no budget)."""
        ledger = self._batch.ledger
        if ledger is None:
            return None
        admitted = ledger.admit(sum(rows_usd))
        while isinstance(admitted, float):  # other replicas' recent spend is not seen yet
            await asyncio.sleep(admitted)
            admitted = ledger.admit(sum(rows_usd))
        if isinstance(admitted, LLMFailure):
            return admitted
        return _JobCharge(admitted, rows_usd)

    async def _create(self, job: JobRecord, content: bytes) -> None:
        """Record first (acknowledged), then upload and create the job, then record its id."""
        batch = self._batch
        await batch.registry.record(job)
        job.input_file_id = await batch.client.upload(content, f"{job.key}.jsonl")
        created = await batch.client.create(job.input_file_id, {METADATA_KEY: job.key})
        job.batch_id, job.state = created.id, created.status
        batch.registry.save(job)
        batch.tracker.moved(job.key, job.state, job.rows)
        log.info(
            "batch job created",
            extra={"batch_id": job.batch_id, "rows": job.rows, "window_id": job.window_id},
        )

    async def _await_all(self, window_id: str, jobs: list[JobRecord], state: _Round) -> None:
        tasks = [asyncio.ensure_future(self._await(window_id, job)) for job in jobs]
        try:
            for job, task in zip(jobs, tasks, strict=True):
                try:
                    final, results = await task
                except _JobFailed as error:
                    for tp, (first, last) in job.ranges.items():
                        for offset in range(first, last + 1):
                            state.failed.setdefault(f"{tp}/{offset}", error.failure)
                    continue
                state.take(results)
                if final.status == "expired":
                    answered = {r.custom_id for r in results if r.status_code is not None}
                    state.expired.update(
                        cid
                        for tp, (first, last) in job.ranges.items()
                        for offset in range(first, last + 1)
                        if (cid := f"{tp}/{offset}") not in answered
                    )
        finally:
            for task in tasks:
                task.cancel()

    async def _await(self, window_id: str, job: JobRecord) -> tuple[BatchJob, list[LineResult]]:
        """Poll one job to its end (with backoff) and read its output and error files."""
        batch = self._batch
        if job.batch_id is None and job.state == SUBMITTING:
            found = await self._polled(window_id, lambda: batch.client.find(METADATA_KEY, job.key))
            if found is None:  # the member died before creating it: nothing to wait for
                raise _JobFailed(
                    LLMFailure(FailureKind.TRANSIENT, "batch_not_created", "never created")
                )
            job.batch_id = found.id
        batch_id = job.batch_id
        assert batch_id is not None
        attempt = 0
        try:
            while True:
                status = await self._polled(window_id, lambda: batch.client.retrieve(batch_id))
                if status.status != job.state and job.state != DELIVERED:
                    job.state = status.status
                    job.request_counts = status.request_counts
                    job.output_file_id, job.error_file_id = (
                        status.output_file_id,
                        status.error_file_id,
                    )
                    batch.registry.save(job)
                batch.tracker.moved(job.key, status.status, job.rows)
                if status.terminal:
                    break
                attempt += 1
                await self._sleep_unless_closed(self._poll.delay(attempt))
            if status.status == "failed":
                problems = "; ".join(status.errors) or "no detail"
                raise _JobFailed(
                    LLMFailure(
                        FailureKind.SYSTEMIC, "batch_failed", f"the batch job failed: {problems}"
                    )
                )
            results: list[LineResult] = []
            for file_id in (status.output_file_id, status.error_file_id):
                if file_id is not None:
                    content = await self._polled(window_id, partial(batch.client.content, file_id))
                    results.extend(parse_lines(content))
            return status, results
        finally:
            batch.tracker.done(job.key)

    async def _polled(self, window_id: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """A status or download call, tried again with backoff until it answers (the job runs
        on at the provider meanwhile); readiness says why while it fails, and a closed step
        gives up at the next wait."""
        attempt = 0
        while True:
            try:
                answer = await call()
            except LLMFailure as failure:
                attempt += 1
                self._batch.tracker.on_poll_error()
                self._holding[window_id] = f"batch poll failing: {failure.reason}"
                log.warning(
                    "batch poll failed; trying again",
                    extra={"reason": failure.reason, "error": failure.message, "attempt": attempt},
                )
                await self._sleep_unless_closed(self._poll.delay(attempt))
                continue
            if attempt:
                self._holding.pop(window_id, None)
            return answer

    def _line_outcome(self, row: _Row, line: LineResult, round_no: int) -> RowOutcome:
        try:
            if line.status_code == 200:
                completion = parse_completion(line.body, self._batch.settings)
                cost = self._cost(completion)
                rules = self._batch.rules
                if rules is not None:
                    valid, problem = rules.check(completion)
                    if valid is None:
                        error = RowError("invalid_answer", problem, 200, round_no, False)
                        return RowOutcome(
                            None,
                            error,
                            FailureKind.ROW,
                            row.variables_hash,
                            row.request_hash,
                            None,
                            cost,
                            MODE,
                            rejected=completion,
                        )
                    completion = valid
                return RowOutcome(
                    completion, None, None, row.variables_hash, row.request_hash, None, cost, MODE
                )
            raise classify_status(line.status_code or 500, line.body, None)
        except LLMFailure as failure:
            return _failed(row, failure, round_no)

    def _cost(self, completion: Completion) -> Cost:
        """The configured price times the model's `batch_factor` (a provider's own figure is
        already the batch price)."""
        pricing = self._batch.pricing
        if pricing is None:
            return UNKNOWN
        cost = pricing.cost(completion)
        price = pricing.price(completion.model) or pricing.price(self._batch.settings.model_name)
        if cost.usd is None or cost.source != "prices" or price is None:
            return cost
        return Cost(cost.usd * price.batch_factor, "prices")


def _whole(failure: LLMFailure) -> LLMFailure:
    """A job refused as a whole is never the rows' fault: systemic, whatever its status."""
    return LLMFailure(
        FailureKind.SYSTEMIC, failure.reason, failure.message, failure.status_code, None
    )


def _failed(row: _Row, failure: LLMFailure, attempts: int) -> RowOutcome:
    kind = failure.kind
    reason, message = failure.reason, failure.message
    if kind.retryable:
        reason, message = "retries_exhausted", f"{failure.reason}: {failure.message}"
    error = RowError(
        reason,
        message,
        failure.status_code,
        attempts,
        kind.retryable,
        failure.retry_after_s if kind is FailureKind.SYSTEMIC else None,
    )
    return RowOutcome(None, error, kind, row.variables_hash, row.request_hash, mode=MODE)


class BatchMetrics(Protocol):
    def watch_batches(self, tracker: BatchTracker) -> None: ...

    def batch_submit_error(self) -> None: ...

    def batch_poll_error(self) -> None: ...

    def batch_window_mode(self, mode: str) -> None: ...


@dataclass
class BatchMode:
    """Batch mode's long-lived pieces: the provider client and the job records' table."""

    parts: BatchParts
    table: GlobalTable
    client: BatchClient

    async def start(self) -> None:
        await self.table.start()

    async def stop(self) -> None:
        await self.table.stop()
        await self.client.aclose()


def build_batch_mode(
    settings: Settings,
    template: PromptTemplate,
    request_body: Callable[[list[dict[str, str]]], dict[str, Any]],
    request_key: Callable[[list[dict[str, str]]], str],
    metrics: BatchMetrics,
    pricing: Pricing | None = None,
    ledger: SpendLedger | None = None,
) -> BatchMode:
    table = batch_table(settings)
    client = BatchClient(settings.llm)
    tracker = BatchTracker(
        metrics.batch_submit_error, metrics.batch_poll_error, metrics.batch_window_mode
    )
    metrics.watch_batches(tracker)
    parts = BatchParts(
        settings.llm,
        client,
        JobRegistry(table),
        template,
        request_body,
        request_key,
        tracker,
        table.catch_up,
        pricing,
        ledger,
        None if pricing is None else partial(_batch_estimate, pricing, settings.llm),
        None
        if settings.llm.validate_answers is None
        else AnswerRules(settings.llm.validate_answers),
    )
    return BatchMode(parts, table, client)


def _batch_estimate(pricing: Pricing, llm: LLMSettings, messages: list[dict[str, str]]) -> float:
    """A request's charge at admission, as live (the prompt estimate, max_tokens at the output
    price), at the model's batch rate."""
    model = llm.model_name
    usd = pricing.estimate(model, estimate_prompt_tokens(messages), llm.max_tokens or 0)
    price = pricing.price(model)
    return 0.0 if usd is None or price is None else usd * price.batch_factor


def backlog_behind(window: Window, highwater: Callable[[Any], int | None]) -> int:
    """Rows that wait behind the window in its partitions, by the fetched high watermarks."""
    return sum(max(0, (highwater(tp) or end) - end) for tp, end in window.committable().items())
