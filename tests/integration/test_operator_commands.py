"""What an operator does to a running consumer, against the real broker and the real fake LLM:
stop it with SIGTERM mid-window, read its logs, check its topics at start."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient

from consumer.records import DEAD_LETTER_REASONS
from tests.support.fake_llm_process import FakeLLM, fake_llm_process
from tests.support.pipeline import (
    ROOT,
    Topics,
    committed_offsets,
    create_topics,
    end_offsets,
    publish,
    read_topic,
    rows_to_messages,
    scrape,
    settings_file,
    wait_for_commits,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class Run:
    """`llm-consumer run -c SETTINGS ARGS...` as a process; its stderr in a file."""

    def __init__(self, settings: Path, log: Path, *args: str, env: dict[str, str] | None = None):
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-W",
                    "default",
                    "-m",
                    "consumer",
                    "run",
                    "-c",
                    str(settings),
                    *args,
                ],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log.read_bytes().splitlines():
            try:
                out.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                continue
        return out

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def said(self, message: str) -> Callable[[], bool]:
        return lambda: any(line.get("msg") == message for line in self.lines())

    def terminate(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def wait_until(check: Callable[[], bool], what: str, run: Run, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if run.process.poll() is not None:
            raise AssertionError(f"the consumer exited while waiting for {what}:\n{run.text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}\n{run.text()}")
        time.sleep(0.05)


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """`python -m consumer ARGS`, with warnings on so an unclosed client would show."""
    return subprocess.run(
        [sys.executable, "-W", "default", "-m", "consumer", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def requests(llm: FakeLLM) -> int:
    return int(llm.stats()["requests"])


async def test_sigterm_finishes_the_window_in_flight_and_starts_no_other(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """One window of 10 rows is being answered (slowly) and the next one waits for it when
    SIGTERM comes: the first is delivered and committed, the second is never sent, and the exit
    line says how many rows were finished and how many are left for the next owner (and
    `--progress` prints the run's summary)."""
    topics = Topics.unique("sigterm")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], 1)
    rows = [{"id": i, "text": f"ticket {i}"} for i in range(60)]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    with fake_llm_process("--latency-ms", "1500") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            window={"max_messages": 10, "max_wait_ms": 200, "max_pending_windows": 1},
            llm={"concurrency": {"initial": 10, "max": 10}},
            logging={"format": "text"},  # the flag below overrides it
        )
        run = Run(settings, tmp_path / "run.log", "--log-format", "json", "--progress")
        try:
            wait_until(lambda: requests(llm) >= 10, "the first window's 10 requests", run)
            # The next window is closed and waits behind the first (max_pending_windows 1).
            assert run.terminate() == 0, run.text()
        finally:
            run.kill()
        sent = requests(llm)
    assert sent == 10, f"{sent} requests: a window was started after SIGTERM"
    committed = await committed_offsets(kafka_bootstrap, topics.group, topics.input)
    assert committed == {0: 10}
    [stopped] = [line for line in run.lines() if line["msg"] == "stopped"]
    assert stopped["rows_finished"] == 10
    assert stopped["rows_left_for_next_owner"] == stopped["rows_consumed"] - 10 > 0
    # --progress: the summary after the exit line.
    [summary] = [raw for raw in run.text().splitlines() if raw.startswith("run summary:")]
    assert f"{stopped['rows_consumed']} rows consumed, 10 outputs" in summary
    assert "0 row errors, 0 dead letters" in summary
    assert "Unclosed" not in run.text()


async def test_run_log_flags_give_json_lines_with_zoned_millisecond_timestamps(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The settings say text at WARNING; the flags say JSON at INFO, and win."""
    topics = Topics.unique("logflags")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], 1)
    with fake_llm_process() as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            logging={"format": "text", "level": "WARNING"},
        )
        run = Run(settings, tmp_path / "run.log", "--log-format", "json", "--log-level", "info")
        try:
            wait_until(run.said("partitions assigned"), "the assignment", run)
            assert run.terminate() == 0, run.text()
        finally:
            run.kill()
    lines = run.lines()
    text = [raw for raw in run.text().splitlines() if raw.strip()]
    assert len(lines) == len(text), f"lines that are not JSON:\n{run.text()}"
    assert {"consuming", "stopped"} <= {line["msg"] for line in lines}
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]), line


def with_topics_section(settings: Path, section: dict[str, Any]) -> Path:
    """`settings_file` names its Topics argument `topics`, so the section is added here."""
    values = yaml.safe_load(settings.read_text())
    values["topics"] = section
    settings.write_text(yaml.safe_dump(values, sort_keys=False))
    return settings


async def topic_names(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_a_consumer_started_before_its_input_topic_waits_for_it_without_creating_it(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The consumer says it waits for the input topic and does not create it; once it is
    created with 3 partitions (by `publish -p 3`, which then has an effect) its rows are
    enriched, and the output and dead-letter topics are created with the input's 3."""
    topics = Topics.unique("late-input")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"id": {i}, "text": "t{i}"}}\n' for i in range(12)))
    with fake_llm_process() as llm:
        settings = with_topics_section(
            settings_file(tmp_path, kafka_bootstrap, llm.base_url, topics),
            {"create_missing": True},
        )
        run = Run(settings, tmp_path / "run.log")
        try:
            wait_until(
                lambda: any(
                    line.get("topic") == topics.input and "does not exist" in line["msg"]
                    for line in run.lines()
                ),
                "the wait for the input topic",
                run,
            )
            assert topics.input not in await topic_names(kafka_bootstrap)
            published = cli("publish", str(rows), "-c", str(settings), "-k", "id", "-p", "3", "-q")
            assert published.returncode == 0, published.stderr
            assert "note:" not in published.stderr
            # Read only once created: the test's reader would create it by subscribing.
            wait_until(
                lambda: sum(line["msg"] == "topic created" for line in run.lines()) == 2,
                "the output and dead-letter topics created",
                run,
            )
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=12, timeout_s=60)
            assert len(outputs) == 12, run.text()
            assert run.terminate() == 0, run.text()
        finally:
            run.kill()
    assert len(await end_offsets(kafka_bootstrap, topics.input)) == 3
    created = [line for line in run.lines() if line["msg"] == "topic created"]
    assert {(line["topic"], line["partitions"]) for line in created} == {
        (topics.output, 3),
        (topics.dlq, 3),
    }
    assert {m.partition for m in outputs} <= {0, 1, 2}


@pytest.mark.parametrize(
    ("case", "topics_section", "expected"),
    [
        (
            "no input topic",
            {"input_wait_s": 1},
            r"error: input topic {input} does not exist \(waited 1 s, "
            r"topics.input_wait_s\): create it .*",
        ),
        (
            "a topic the broker refuses",
            {"create_missing": True, "replication_factor": 3},
            r"error: cannot create topic {output}: InvalidReplicationFactorError: .*",
        ),
    ],
)
async def test_a_topic_problem_at_start_is_one_line_and_exit_1(
    kafka_bootstrap: str,
    tmp_path: Path,
    case: str,
    topics_section: dict[str, Any],
    expected: str,
) -> None:
    topics = Topics.unique("topic-error")
    if case != "no input topic":
        await create_topics(kafka_bootstrap, [topics.input], 1)
    settings = with_topics_section(
        settings_file(tmp_path, kafka_bootstrap, "http://127.0.0.1:9", topics), topics_section
    )
    result = cli("run", "-c", str(settings))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(expected.format(input=topics.input, output=topics.output), last), last
    assert "Traceback" not in result.stderr and "Unclosed" not in result.stderr
    names = await topic_names(kafka_bootstrap)
    assert topics.output not in names
    assert (topics.input in names) is (case != "no input topic")


async def test_tail_of_a_missing_topic_says_so_and_creates_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    result = cli("tail", "-t", missing, "-b", kafka_bootstrap)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: topic {missing} does not exist at {kafka_bootstrap} (from -b); "
        "-f or --expect waits for it"
    ]
    waited = cli("tail", "-t", missing, "-b", kafka_bootstrap, "--expect", "1", "--timeout", "1")
    assert waited.returncode == 1  # nothing came
    assert missing not in await topic_names(kafka_bootstrap)


async def test_publish_p_on_a_topic_with_another_partition_count_says_so(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"parts-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka_bootstrap, [topic], 1)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1}\n')
    result = cli("publish", str(rows), "-t", topic, "-b", kafka_bootstrap, "-p", "3", "-q")
    assert result.returncode == 0, result.stderr
    assert f"note: topic {topic} already exists with 1 partition(s); -p 3 changes nothing" in (
        result.stderr
    )
    assert len(await end_offsets(kafka_bootstrap, topic)) == 1


DASHBOARD = ROOT / "deploy" / "grafana" / "llm-consumer.json"
ALERTS = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"


# Series that exist only in some configurations: the budget with llm.budget; cost and priced
# rows are labelled by the template hash and the figure's source, known at the first priced
# answer (these settings have no prices).
NOT_AT_START = {
    # batch mode's series exist only in llm.mode batch or auto
    "llm_consumer_batch_jobs",
    "llm_consumer_batch_rows_waiting",
    "llm_consumer_batch_oldest_age_seconds",
    "llm_consumer_batch_mode_windows_total",
    "llm_consumer_budget_remaining_usd",
    "llm_consumer_llm_cost_usd_total",
    "llm_consumer_llm_priced_rows_total",
}


def dashboard_series() -> set[str]:
    """Every llm_consumer_* series name the Grafana dashboard and the alert rules query."""
    text = DASHBOARD.read_text() + ALERTS.read_text()
    return set(re.findall(r"\bllm_consumer_[a-z_]+", text))


def named(values: dict[str, float], name: str) -> dict[str, float]:
    return {k: v for k, v in values.items() if k == name or k.startswith(name + "{")}


async def test_every_series_the_dashboard_uses_exists_at_start_and_is_plausible_after_a_run(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Scraped from a real consumer: before its first row every series the dashboard and the
    alerts query is there (labelled counters at 0, so rate() sees the first increase); after
    a clean run of 30 rows answered first time the counters say exactly that."""
    topics = Topics.unique("scrape")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], 2)
    port = free_port()
    with fake_llm_process() as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            window={"max_messages": 10, "max_wait_ms": 200},
            observability={"host": "127.0.0.1", "port": port, "lag_interval_s": 0.5},
        )
        run = Run(settings, tmp_path / "run.log")
        try:
            wait_until(run.said("partitions assigned"), "the assignment", run)

            async def lag_measured() -> dict[str, float]:
                values = await scrape(port)
                return values if named(values, "llm_consumer_consumer_lag") else {}

            before: dict[str, float] = {}
            for _ in range(100):
                if before := await lag_measured():
                    break
                await asyncio.sleep(0.1)
            assert before, run.text()
            missing = {n for n in dashboard_series() - NOT_AT_START if not named(before, n)}
            assert not missing, f"no series before the first row: {sorted(missing)}"
            zero = [
                'llm_consumer_row_errors_total{reason="template_error"}',
                'llm_consumer_dead_letters_total{reason="invalid_json"}',
                'llm_consumer_llm_retries_total{provider="openai"}',
                'llm_consumer_llm_rate_limited_total{provider="openai"}',
                'llm_consumer_llm_tokens_total{kind="prompt",model="fake-model"}',
                'llm_consumer_windows_total{close_reason="count"}',
                'llm_consumer_cache_lookups_total{result="hit"}',
            ]
            assert {k: before[k] for k in zero} == dict.fromkeys(zero, 0.0)

            rows = [{"id": i, "text": f"review {i}"} for i in range(30)]
            await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            after: dict[str, float] = {}
            for _ in range(100):
                after = await scrape(port)
                lags = named(after, "llm_consumer_consumer_lag").values()
                if after["llm_consumer_rows_produced_total"] == 30 and not any(lags):
                    break
                await asyncio.sleep(0.1)
            assert run.terminate() == 0, run.text()
        finally:
            run.kill()
    assert after["llm_consumer_rows_consumed_total"] == 30
    assert after["llm_consumer_rows_produced_total"] == 30
    assert sum(named(after, "llm_consumer_row_errors_total").values()) == 0
    assert sum(named(after, "llm_consumer_dead_letters_total").values()) == 0
    # Answered first time: no retries, whatever the windows did (issue 17, item 13).
    assert after['llm_consumer_llm_retries_total{provider="openai"}'] == 0
    ok = 'llm_consumer_llm_request_seconds_count{provider="openai",status="200"}'
    assert after[ok] == 30
    assert after['llm_consumer_llm_tokens_total{kind="prompt",model="fake-model"}'] > 0
    assert after['llm_consumer_llm_tokens_total{kind="completion",model="fake-model"}'] > 0
    assert sum(named(after, "llm_consumer_windows_total").values()) >= 3
    assert after["llm_consumer_window_rows_sum"] == 30
    assert after["llm_consumer_commit_seconds_count"] >= 1
    assert after["llm_consumer_assigned_partitions"] == 2
    assert after["llm_consumer_ready"] == 1
    for gauge in ("held_back", "provider_failing", "broker_unreachable", "stuck_partitions"):
        assert after[f"llm_consumer_{gauge}"] == 0, gauge
    assert after["llm_consumer_limiter_limit"] >= 1
    assert after["llm_consumer_event_loop_lag_seconds"] >= 0


def test_every_dead_letter_reason_in_the_code_is_created_at_start() -> None:
    """DEAD_LETTER_REASONS is a list kept by hand: every `DeadLetter("reason", ...)` written
    in the code (on one line or the next) must be in it."""
    written: set[str] = set()
    for path in (ROOT / "consumer").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        written |= set(re.findall(r'DeadLetter\(\s*"([a-z0-9_]+)"', text))
    assert written, "no dead letter reasons found: the pattern is out of date"
    assert written <= set(DEAD_LETTER_REASONS), sorted(written - set(DEAD_LETTER_REASONS))


async def read_new(bootstrap: str, topic: str, since: dict[int, int]) -> list[Any]:
    """The records of `topic` after the offsets `since`, as aiokafka gives them."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in since]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, since[tp.partition])
        out: list[Any] = []
        deadline = time.monotonic() + 30
        while sum(ends[tp] - since[tp.partition] for tp in tps) > len(out):
            assert time.monotonic() < deadline, "the new records did not arrive"
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(messages)
        return out
    finally:
        await consumer.stop()


async def test_replay_republishes_error_rows_and_dead_letters_and_offsets_shows_the_lag(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("replay")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], 2)
    rows = [{"id": f"ok-{i}", "text": f"fine {i}"} for i in range(4)]
    rows += [{"id": "no-text-1"}, {"id": "no-text-2", "note": "kept"}]  # template_error
    messages = [*rows_to_messages(rows), (b"bad", b"{not json")]
    await publish(kafka_bootstrap, topics.input, messages)
    with fake_llm_process() as llm:
        settings = settings_file(tmp_path, kafka_bootstrap, llm.base_url, topics)
        run = Run(settings, tmp_path / "run.log")
        try:
            await read_topic(kafka_bootstrap, topics.output, expect=6, timeout_s=60)
            await read_topic(kafka_bootstrap, topics.dlq, expect=1, timeout_s=30)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert run.terminate() == 0, run.text()
        finally:
            run.kill()
    c = ("-c", str(settings))
    before = await end_offsets(kafka_bootstrap, topics.input)

    shown = cli("offsets", *c)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[-1].split() == ["total", "0"]

    dry = cli("replay", "errors", *c)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        f"{topics.output}: 2 error rows to replay to {topics.input} (template_error 2)",
        "  nothing published: add --execute to publish them",
    ]
    none = cli("replay", "errors", *c, "--reason", "rate_limited", "--execute")
    assert none.stdout.startswith(f"{topics.output}: 0 error rows")
    assert await end_offsets(kafka_bootstrap, topics.input) == before

    done = cli("replay", "errors", *c, "--reason", "template_error", "--execute")
    assert done.returncode == 0, done.stderr
    letters = cli("replay", "dead-letters", *c, "--execute")
    assert letters.returncode == 0, letters.stderr
    assert f"1 dead letters to replay to {topics.input} (invalid_json 1)" in letters.stdout

    replayed = await read_new(kafka_bootstrap, topics.input, before)
    assert len(replayed) == 3
    by_key = {m.key: m for m in replayed}
    assert orjson.loads(by_key[b"no-text-2"].value) == {"id": "no-text-2", "note": "kept"}
    assert by_key[b"bad"].value == b"{not json"
    for message in replayed:
        headers = {k: v.decode() for k, v in message.headers}
        assert headers["replay.topic"] in (topics.output, topics.dlq)
        assert headers["replay.source.topic"] == topics.input
        assert (
            int(headers["replay.source.offset"]) < before[int(headers["replay.source.partition"])]
        )
    assert {k: v.decode() for k, v in by_key[b"bad"].headers}["replay.reason"] == "invalid_json"

    lagging = cli("offsets", *c)
    assert lagging.stdout.splitlines()[-1].split() == ["total", "3"]

    # A member of the group is running: a reset is refused.
    from aiokafka import AIOKafkaConsumer

    member = AIOKafkaConsumer(
        topics.input,
        bootstrap_servers=kafka_bootstrap,
        group_id=topics.group,
        enable_auto_commit=False,
        session_timeout_ms=10_000,
    )
    await member.start()
    try:
        deadline = time.monotonic() + 30
        while not member.assignment():
            assert time.monotonic() < deadline, "the member did not join"
            await member.getmany(timeout_ms=200)
        refused = cli("offsets", *c, "--reset", "earliest", "--execute")
    finally:
        await member.stop()
    assert refused.returncode == 1
    assert f"error: group {topics.group} has 1 active member(s)" in refused.stderr

    plan = cli("offsets", *c, "--reset", "earliest")
    assert "nothing committed" in plan.stdout
    assert sum((await committed_offsets(kafka_bootstrap, topics.group, topics.input)).values()) == 7
    reset = cli("offsets", *c, "--reset", "earliest", "--execute")
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert await committed_offsets(kafka_bootstrap, topics.group, topics.input) == {0: 0, 1: 0}
    one = cli("offsets", *c, "--reset", "1", "--partition", "0", "--execute")
    assert one.returncode == 0, one.stderr
    assert await committed_offsets(kafka_bootstrap, topics.group, topics.input) == {0: 1, 1: 0}
    bad = cli("offsets", *c, "--reset", "yesterday")
    assert bad.returncode == 2 and "not an ISO 8601 time" in bad.stderr
