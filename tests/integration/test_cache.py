"""The response cache end to end: a request already answered is never paid for again."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import orjson

from tests.support.fake_llm_process import fake_llm_process
from tests.support.ledger import account
from tests.support.pipeline import (
    ConsumerProcess,
    Topics,
    create_topics,
    publish,
    read_topic,
    rows_to_messages,
    running_consumer,
    settings_file,
    wait_for_commits,
)


async def test_rows_repeating_an_earlier_prompt_are_answered_from_the_cache(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """1,000 rows of which 300 repeat an earlier prompt: 700 requests, and the repeats say hit."""
    rng = random.Random(7)
    texts = [f"review {i}: it does what it says" for i in range(700)]
    rows = [{"id": i, "text": text} for i, text in enumerate(texts)]
    rows += [{"id": 700 + i, "text": rng.choice(texts)} for i in range(300)]
    rng.shuffle(rows[100:])  # repeats are spread out, some in the same window as their first
    topics = Topics.unique("cache-dedupe")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    with fake_llm_process("--latency-ms", "20") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            window={"max_messages": 100, "max_wait_ms": 500},
            llm={"cache": {"backend": "memory"}},
        )
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=1000, timeout_s=120)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert consumer.stop() == 0
        requests = llm.stats()["requests"]
    assert len(outputs) == 1000
    assert requests == 700, f"{requests} requests for 700 distinct prompts"
    bodies = [orjson.loads(m.value or b"") for m in outputs]
    assert sum(1 for b in bodies if b["llm_response_cache"] == "hit") == 300
    by_prompt: dict[str, set[str]] = {}
    for body in bodies:
        assert body["llm_response_error"] is None
        by_prompt.setdefault(body["llm_response_request_hash"], set()).add(body["llm_response"])
    assert len(by_prompt) == 700
    assert all(len(answers) == 1 for answers in by_prompt.values()), "a hit is the same answer"


async def test_rows_paid_for_before_a_crash_are_not_paid_again_after_the_restart(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """3,000 distinct rows, SIGKILL three times mid-run: every row comes out, and the provider
    is paid at most once per prompt plus what was in flight at each kill."""
    topics = Topics.unique("cache-crash")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    rows = [{"id": i, "text": f"review {i}: it works"} for i in range(3000)]
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    concurrency = 8
    with fake_llm_process("--latency-ms", "20") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            kafka={"session_timeout_ms": 6_000, "heartbeat_interval_ms": 1_000},
            window={"max_messages": 200, "max_wait_ms": 500},
            llm={
                "cache": {"backend": "kafka"},
                "concurrency": {"initial": concurrency, "max": concurrency},
            },
            state={"directory": str(tmp_path / "state")},
        )
        log = tmp_path / "consumer.log"
        rng = random.Random(3)
        for _ in range(3):
            proc = ConsumerProcess(settings, log).start()
            await asyncio.sleep(rng.uniform(2.5, 4.0))
            proc.kill()
        with running_consumer(settings, log) as consumer:
            outputs = await read_topic(
                kafka_bootstrap, topics.output, expect=3000, timeout_s=180, settle_s=2
            )
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input, timeout_s=60)
            assert consumer.stop() == 0
        requests = llm.stats()["requests"]
    entry = account("C1. SIGKILL x3 with the kafka cache", positions, outputs)
    assert entry.missing == 0, entry.missing_examples
    print(f"\n{requests} paid requests for 3000 distinct prompts")
    assert requests <= 3000 + 3 * concurrency, f"{requests} requests"
    hits = sum(1 for m in outputs if orjson.loads(m.value or b"")["llm_response_cache"] == "hit")
    assert hits >= entry.duplicates, "redelivered rows are answered from the cache"
