"""Batch mode end to end: windows answered by provider batch jobs at the real fake's batch API,
with Kafka's guarantees kept (one output per row, in order, offsets committed after delivery)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from consumer.observability.metrics import parse_exposition
from tests.support.fake_llm_process import FakeLLM, fake_llm_process
from tests.support.ledger import account
from tests.support.pipeline import (
    ConsumerProcess,
    Message,
    Topics,
    create_topics,
    end_offsets,
    publish,
    read_topic,
    rows_to_messages,
    running_consumer,
    settings_file,
    wait_for_commits,
)

FAST_GROUP = {"session_timeout_ms": 6_000, "heartbeat_interval_ms": 1_000}


def batch_llm(**batch: Any) -> dict[str, Any]:
    return {
        "mode": "batch",
        "batch": {"poll_initial_s": 0.2, "poll_max_s": 1.0, **batch},
    }


def batches(llm: FakeLLM) -> dict[str, Any]:
    response = httpx.get(llm.url("/admin/batches"), timeout=5.0)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


async def eventually(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.1)


def in_partition_order(outputs: list[Message]) -> bool:
    last: dict[int, int] = {}
    for message in sorted(outputs, key=lambda m: (m.partition, m.offset)):
        partition, offset = message.source
        if offset <= last.get(partition, -1):
            return False
        last[partition] = offset
    return True


async def test_2000_rows_in_batch_mode_one_job_per_window_line_errors_as_row_errors(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("batch-2000")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    rows: list[dict[str, Any]] = [{"id": i, "text": f"review {i}: fine"} for i in range(2000)]
    bad = {17: "400", 555: "content_filter", 1203: "400", 1999: "context_length"}
    for index, directive in bad.items():
        rows[index]["text"] = f"review {index} [[fake:{directive}]]"
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    with fake_llm_process("--batch-delay-s", "1") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            window={"max_messages": 500, "max_wait_ms": 1000},
            llm=batch_llm(),
            state={"directory": str(tmp_path / "state")},
        )
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:
            outputs = await read_topic(
                kafka_bootstrap, topics.output, expect=2000, timeout_s=120, settle_s=1
            )
            committed = await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert consumer.stop() == 0
        seen = batches(llm)
    entry = account("B1. 2,000 rows in batch mode", positions, outputs)
    assert entry.missing == 0 and entry.duplicates == 0
    assert in_partition_order(outputs)
    assert committed == await end_offsets(kafka_bootstrap, topics.input)
    bodies = {m.json()["id"]: m.json() for m in outputs}
    assert all(body["llm_response_mode"] == "batch" for body in bodies.values())
    errors = {
        i: body["llm_response_error"] for i, body in bodies.items() if body["llm_response_error"]
    }
    assert set(errors) == set(bad), errors
    assert errors[555]["reason"] == "content_filter"
    assert errors[1999]["reason"] == "context_length_exceeded"
    windows = {m.headers["window.id"] for m in outputs}
    assert seen["jobs"] == len(windows), seen
    assert seen["lines"] == 2000
    listed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        "batches",
        "-c",
        str(settings),
        "--json",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(listed.communicate(), 60)
    assert listed.returncode == 0
    jobs = [orjson.loads(line) for line in out.splitlines()]
    assert len(jobs) == len(windows)
    assert {job["state"] for job in jobs} == {"delivered"}
    assert sum(job["rows"] for job in jobs) == 2000


async def test_a_batch_in_progress_at_sigkill_is_awaited_after_the_restart_not_paid_again(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("batch-kill")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=2)
    rows = [{"id": i, "text": f"ticket {i}: slow"} for i in range(600)]
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    port = _free_port()
    with fake_llm_process("--batch-delay-s", "6") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            kafka=FAST_GROUP,
            window={"max_messages": 300, "max_wait_ms": 1000},
            llm=batch_llm(),
            state={"directory": str(tmp_path / "state")},
            observability={"host": "127.0.0.1", "port": port},
        )
        log = tmp_path / "consumer.log"
        first = ConsumerProcess(settings, log).start()

        async def all_waiting() -> dict[str, float] | None:
            if int(batches(llm)["lines"]) < 600:
                return None
            async with httpx.AsyncClient(timeout=5.0) as http:
                scraped = parse_exposition(
                    (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                )
            return scraped if scraped["llm_consumer_batch_rows_waiting"] == 600 else None

        metrics = await eventually(all_waiting, 60, "both windows' jobs created and polled")
        first.kill()
        running = sum(
            value for name, value in metrics.items() if name.startswith("llm_consumer_batch_jobs{")
        )
        assert running == 2, metrics
        assert metrics["llm_consumer_batch_oldest_age_seconds"] > 0
        before = batches(llm)
        assert all(job["status"] != "completed" for job in before["batches"]), before
        with running_consumer(settings, log) as consumer:
            outputs = await read_topic(
                kafka_bootstrap, topics.output, expect=600, timeout_s=120, settle_s=1
            )
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert consumer.stop() == 0
            text = consumer.log_text()
        after = batches(llm)
    entry = account("B2. SIGKILL while a batch runs", positions, outputs)
    assert entry.missing == 0
    assert after["jobs"] == before["jobs"], "the restart created jobs again"
    assert after["lines"] == 600, "rows were paid for twice"
    assert "batch jobs found for the window's rows" in text


async def test_a_member_joining_while_batches_run_takes_over_the_jobs_of_its_partitions(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("batch-rebalance")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=4)
    rows = [{"id": i, "text": f"ticket {i}"} for i in range(800)]
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    with fake_llm_process("--batch-delay-s", "8") as llm:

        def member(name: str) -> Path:
            return settings_file(
                tmp_path,
                kafka_bootstrap,
                llm.base_url,
                topics,
                kafka=FAST_GROUP,
                window={"max_messages": 200, "max_wait_ms": 1000},
                llm=batch_llm(),
                state={"directory": str(tmp_path / name)},
            )

        async def all_submitted() -> bool:
            return int(batches(llm)["lines"]) >= 800

        with running_consumer(member("a"), tmp_path / "a.log") as first:
            await eventually(all_submitted, 60, "the first member's jobs created")
            before = batches(llm)
            with running_consumer(member("b"), tmp_path / "b.log") as second:
                outputs = await read_topic(
                    kafka_bootstrap, topics.output, expect=800, timeout_s=120, settle_s=1
                )
                await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
                assert second.stop() == 0
                taken_over = second.log_text()
            assert first.stop() == 0
        after = batches(llm)
    entry = account("B3. a member joins while batches run", positions, outputs)
    assert entry.missing == 0
    assert after["jobs"] == before["jobs"] and after["lines"] == 800, after
    assert "batch jobs found for the window's rows" in taken_over


async def test_an_expired_batch_resubmits_only_its_unanswered_rows(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("batch-expired")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=1)
    rows = [{"id": i, "text": f"review {i}"} for i in range(200)]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    with fake_llm_process("--batch-delay-s", "1", "--batch-expire-next", "1") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            window={"max_messages": 200, "max_wait_ms": 2000},
            llm=batch_llm(),
            state={"directory": str(tmp_path / "state")},
        )
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=200, timeout_s=60)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert consumer.stop() == 0
        seen = batches(llm)
    assert len(outputs) == 200
    assert all(m.json()["llm_response_error"] is None for m in outputs)
    assert seen["by_status"] == {"completed": 1, "expired": 1}, seen
    assert seen["jobs"] == 2
    assert seen["lines"] == 300, "200 first, then only the 100 the expired job left unanswered"


async def test_a_batch_refused_as_a_whole_holds_the_window_without_error_rows(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("batch-refused")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=1)
    port = _free_port()
    with fake_llm_process("--batch-delay-s", "0.5", "--quota-exhausted") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            window={"max_messages": 50, "max_wait_ms": 500},
            llm=batch_llm(),
            state={"directory": str(tmp_path / "state")},
            observability={"host": "127.0.0.1", "port": port},
        )
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:
            rows = [{"id": i, "text": f"review {i}"} for i in range(50)]
            await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))

            async def held() -> dict[str, Any] | None:
                try:
                    async with httpx.AsyncClient(timeout=5.0) as http:
                        response = await http.get(f"http://127.0.0.1:{port}/readyz")
                except httpx.TransportError:
                    return None
                body: dict[str, Any] = response.json()
                return body if response.status_code == 503 and body.get("held_back") else None

            readiness = await eventually(held, 60, "readiness to say the window is held")
            assert "insufficient_quota" in " ".join(readiness["problems"]), readiness
            early = await read_topic(kafka_bootstrap, topics.output, expect=1, timeout_s=2)
            assert early == [], "no error rows while the batch is refused"
            llm.configure(quota_exhausted=False)
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=50, timeout_s=60)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert consumer.stop() == 0
    assert len(outputs) == 50
    assert all(m.json()["llm_response_error"] is None for m in outputs)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_auto_answers_a_backlog_in_batches_and_goes_live_once_it_is_drained(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("batch-auto")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=1)
    backlog = [{"id": i, "text": f"review {i}"} for i in range(3000)]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(backlog))
    with fake_llm_process("--batch-delay-s", "1") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            window={"max_messages": 500, "max_wait_ms": 500},
            llm={
                "mode": "auto",
                "batch": {"poll_initial_s": 0.2, "poll_max_s": 1.0, "auto_backlog_rows": 1000},
            },
            state={"directory": str(tmp_path / "state")},
        )
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:
            drained = await read_topic(kafka_bootstrap, topics.output, expect=3000, timeout_s=90)
            later = [{"id": 3000 + i, "text": f"new review {i}"} for i in range(20)]
            await publish(kafka_bootstrap, topics.input, rows_to_messages(later))
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=3020, timeout_s=60)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert consumer.stop() == 0
        seen = batches(llm)
    assert len(drained) >= 3000 and len(outputs) == 3020
    mode = {m.json()["id"]: m.json()["llm_response_mode"] for m in outputs}
    assert all(mode[i] == "batch" for i in range(1500)), "a window with > 1000 rows behind it"
    assert all(mode[i] == "live" for i in range(2000, 3020)), "<= 1000 behind, and new rows"
    assert seen["lines"] == sum(1 for m in mode.values() if m == "batch")
