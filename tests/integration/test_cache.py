"""The response cache end to end: a request already answered is never paid for again."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.enrich.cache import encode_entry
from consumer.llm.client import Completion, Usage
from tests.support.fake_llm_process import FakeLLM, fake_llm_process
from tests.support.ledger import account
from tests.support.pipeline import (
    ROOT,
    ConsumerProcess,
    Message,
    Topics,
    committed_offsets,
    create_topics,
    end_offsets,
    logged,
    publish,
    read_topic,
    rows_to_messages,
    running_consumer,
    settings_file,
    wait_for_commits,
    wait_until,
)

FAST_GROUP = {"session_timeout_ms": 6_000, "heartbeat_interval_ms": 1_000}


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


def cache_field(message: Message) -> str | None:
    value: str | None = message.json()["llm_response_cache"]
    return value


def bought_once(outputs: Sequence[Message]) -> Counter[str]:
    """Outputs that say `miss`, by request hash: more than one means a prompt paid twice."""
    return Counter(
        m.json()["llm_response_request_hash"] for m in outputs if cache_field(m) == "miss"
    )


async def test_rows_a_killed_member_paid_for_are_hits_on_the_member_that_takes_them_over(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Two members, each with its own store and its own fake LLM (the victim's echoes, so its
    entries on the cache topic can be told apart); the victim is SIGKILLed mid-window. The
    survivor catches the cache topic up on assignment, so it pays exactly for the prompts the
    victim had not stored: every answer the victim stored is a hit on the survivor. What is paid
    twice is what the victim never stored: its requests in flight at the kill, and answers it
    had received whose cache writes (produced without waiting) the broker had not acknowledged
    yet; with a produce round trip shorter than the fake's latency, that is at most one round
    of requests more."""
    topics = Topics.unique("cache-rebalance")
    # A member drains the partitions it fetched one after another: with 8, the victim's share
    # is not all finished when it gets it after a rebalance.
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=8)
    distinct = 1200
    rows = [{"id": i, "text": f"review {i}: it broke after a week"} for i in range(distinct)]
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    concurrency = 8
    with (
        fake_llm_process("--latency-ms", "50") as survivor_llm,
        fake_llm_process("--latency-ms", "50", "--answer", "echo") as victim_llm,
    ):

        def member(llm: FakeLLM, name: str) -> Path:
            return settings_file(
                tmp_path,
                kafka_bootstrap,
                llm.base_url,
                topics,
                kafka=FAST_GROUP,
                # Two windows in flight, not the default: a member with more would hold most
                # of the rows of every partition it fetched before the other joins, and the
                # victim would be handed partitions with nothing left to do.
                window={"max_messages": 100, "max_wait_ms": 500, "max_pending_windows": 2},
                llm={
                    "cache": {"backend": "kafka"},
                    "concurrency": {"initial": concurrency, "max": concurrency},
                },
                state={"directory": str(tmp_path / name)},
            )

        # Started together: one started once the other is under way would find most rows done.
        with running_consumer(member(survivor_llm, "a"), tmp_path / "a.log") as survivor:
            with running_consumer(member(victim_llm, "b"), tmp_path / "b.log") as victim:
                await wait_until(logged(victim, "window done"), "the victim finished a window")
                await asyncio.sleep(random.Random(5).uniform(0.2, 0.6))
                await wait_until(
                    lambda: victim_llm.stats()["in_flight"] > 0, "the victim is mid-window", 10
                )
                in_flight = victim_llm.stats()["in_flight"]
                victim.kill()
            outputs = await read_topic(
                kafka_bootstrap, topics.output, expect=distinct, timeout_s=120, settle_s=2
            )
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input, timeout_s=60)
            assert survivor.stop() == 0
        paid_by_survivor = survivor_llm.stats()["requests"]
        paid_by_victim = victim_llm.stats()["requests"]
    cache_topic = f"{topics.group}.llm-cache"
    ends = await end_offsets(kafka_bootstrap, cache_topic)
    entries = await read_topic(kafka_bootstrap, cache_topic, expect=sum(ends.values()))
    stored_by_victim = sum(
        1 for m in entries if orjson.loads(m.value or b"")["content"].startswith("Review:")
    )
    entry = account("Rebalance: one member SIGKILLed, kafka cache", positions, outputs)
    hits = sum(1 for m in outputs if cache_field(m) == "hit")
    paid_twice = paid_by_victim - stored_by_victim
    print(
        f"\nvictim: {paid_by_victim} requests ({in_flight} in flight at the kill), "
        f"{stored_by_victim} answers stored; survivor: {paid_by_survivor} requests, {hits} hits; "
        f"{paid_by_victim + paid_by_survivor} paid for {distinct} distinct prompts "
        f"({paid_twice} twice); {entry.duplicates} duplicate outputs"
    )
    assert entry.missing == 0, entry.missing_examples
    assert paid_by_survivor == distinct - stored_by_victim, "a stored answer was paid again"
    assert hits > 0, "the survivor took over rows the victim had paid for"
    assert hits >= entry.duplicates, "redelivered rows are answered from the cache"
    assert max(bought_once(outputs).values()) == 1, "an output of a prompt bought twice"
    assert paid_twice <= 2 * concurrency, f"{paid_twice} prompts paid twice"


async def test_answers_bought_before_an_outage_are_hits_after_a_sigterm_during_the_hold(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The provider goes down mid-window; the window is held back; SIGTERM abandons it. After
    the outage a restart answers the rows bought before it from the cache: the provider is
    paid once per prompt."""
    topics = Topics.unique("cache-hold")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    distinct = 400
    rows = [{"id": i, "text": f"review {i}: arrived late"} for i in range(distinct)]
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    outage_s = 8.0
    with fake_llm_process("--latency-ms", "50") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            kafka=FAST_GROUP,
            window={"max_messages": 100, "max_wait_ms": 500},
            llm={
                "cache": {"backend": "kafka"},
                "concurrency": {"initial": 4, "max": 4},
                "retry": {
                    "max_attempts": 3,
                    "initial_backoff_s": 0.05,
                    "max_backoff_s": 0.2,
                    "window_backoff_max_s": 2,
                },
            },
            state={"directory": str(tmp_path / "state")},
        )
        log = tmp_path / "consumer.log"
        with running_consumer(settings, log) as first:
            await wait_until(lambda: llm.stats()["requests"] >= 150, "150 requests answered")
            llm.configure(retry_after_s=None, outage={"status": 503, "seconds": outage_s})
            outage_ends = time.monotonic() + outage_s
            await wait_until(logged(first, "window held back"), "a window held back")
            assert first.stop() == 0
        answered = llm.stats()["by_status"].get("200", 0)
        offsets = await committed_offsets(kafka_bootstrap, topics.group, topics.input)
        committed = sum(offsets.values())
        await asyncio.sleep(max(0.0, outage_ends - time.monotonic()) + 0.5)
        with running_consumer(settings, log) as second:
            outputs = await read_topic(
                kafka_bootstrap, topics.output, expect=distinct, timeout_s=90, settle_s=1
            )
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert second.stop() == 0
        paid = llm.stats()["by_status"].get("200", 0)
    entry = account("Held-back window abandoned by SIGTERM, kafka cache", positions, outputs)
    hits = sum(1 for m in outputs if cache_field(m) == "hit")
    abandoned = answered - committed
    print(
        f"\n{answered} answers bought before the SIGTERM, {committed} rows committed: "
        f"{abandoned} answered and abandoned; {hits} hits after the restart; {paid} answers "
        f"paid for {distinct} distinct prompts"
    )
    assert entry.missing == 0, entry.missing_examples
    assert all(m.json()["llm_response_error"] is None for m in outputs)
    assert abandoned > 0, "the held-back windows had bought answers when they were abandoned"
    assert hits >= abandoned, "the answers of the abandoned windows are hits"
    assert paid == distinct, f"{paid} answers paid for {distinct} distinct prompts"


async def test_a_cache_topic_that_is_not_compacted_stops_the_consumer_with_one_line(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A topic with cleanup.policy=delete would lose entries to retention: the consumer refuses
    it before it joins the group, in one line naming the topic and the policy, and commits
    nothing, so a run with a compacted topic still gets every row."""
    topics = Topics.unique("cache-policy")
    cache_topic = f"{topics.group}.not-compacted"
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(cache_topic, 3, 1, topic_configs={"cleanup.policy": "delete"})]
        )
    finally:
        await admin.close()
    rows = [{"id": i, "text": f"review {i}: as described"} for i in range(30)]
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    with fake_llm_process("--latency-ms", "5") as llm:

        def settings(cache: dict[str, str], state: str) -> Path:
            return settings_file(
                tmp_path,
                kafka_bootstrap,
                llm.base_url,
                topics,
                llm={"cache": cache},
                state={"directory": str(tmp_path / state)},
            )

        refused = ConsumerProcess(
            settings({"backend": "kafka", "topic": cache_topic}, "refused"),
            tmp_path / "refused.log",
        ).start()
        try:
            code = refused.wait(30)
        finally:
            refused.kill()
        text = refused.log_text()
        naming = [line for line in text.splitlines() if cache_topic in line]
        assert code in (1, 2), text
        assert len(naming) == 1, text
        assert "cleanup.policy=delete" in naming[0] and "compact" in naming[0]
        assert "Traceback" not in text, text
        assert llm.stats()["requests"] == 0
        assert await committed_offsets(kafka_bootstrap, topics.group, topics.input) == {}

        compacted = settings({"backend": "kafka"}, "compacted")
        with running_consumer(compacted, tmp_path / "compacted.log") as consumer:
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=30, timeout_s=60)
            assert consumer.stop() == 0
    print(f"\nrefused with exit code {code}: {naming[0]}")
    entry = account("Cache topic not compacted: refused, then run", positions, outputs)
    assert entry.missing == 0, entry.missing_examples


@dataclass(frozen=True)
class CliRun:
    code: int
    out: str
    err: str

    def fields(self) -> dict[str, str]:
        """`cache stats` output: one `name: value` per line."""
        pairs = (line.split(":", 1) for line in self.out.splitlines() if ":" in line)
        return {name.strip(): value.strip() for name, value in pairs}


async def cache_cli(*args: str | Path) -> CliRun:
    """`python -m consumer cache ARGS` as a process, warnings on (an unclosed client shows)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "default",
        "-m",
        "consumer",
        "cache",
        *map(str, args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return CliRun(proc.returncode, out.decode(), err.decode())


async def store_old_entries(bootstrap: str, topic: str, count: int, age_s: float) -> list[bytes]:
    """Entries bought `age_s` ago, as the table writes them but with old record times."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, 3, 1, topic_configs={"cleanup.policy": "compact"})]
        )
    finally:
        await admin.close()
    bought_at = time.time() - age_s
    keys = [f"old-{i}".encode() for i in range(count)]
    entry = encode_entry(Completion("positive", "fake-model", Usage(9, 1, 10), "stop"), bought_at)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key in keys:
            await producer.send_and_wait(
                topic, value=entry, key=key, timestamp_ms=int(bought_at * 1000)
            )
    finally:
        await producer.stop()
    return keys


async def test_cache_stats_and_a_purge_by_age_on_the_real_topic(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """`cache stats` reports the table as a replica starting now sees it (refusing a store a
    running consumer holds); `cache purge --older-than` tombstones only the old entries, for
    every replica, `--dry-run` only counts them, and a purge that could not read the topic to
    its end refuses to select from it."""
    topics = Topics.unique("cache-cli")
    cache_topic = f"{topics.group}.llm-cache"
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    old = await store_old_entries(kafka_bootstrap, cache_topic, 20, age_s=10 * 86_400)
    rows = [{"id": i, "text": f"review {i}: fine"} for i in range(50)]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    state = tmp_path / "state"
    with fake_llm_process("--latency-ms", "5") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            llm={"cache": {"backend": "kafka"}},
            state={"directory": str(state)},
        )
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:
            await read_topic(kafka_bootstrap, topics.output, expect=50, timeout_s=60)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            held = await cache_cli("stats", "-c", settings)
            beside = await cache_cli("stats", "-c", settings, "--state-directory", tmp_path / "b")
            assert consumer.stop() == 0
    assert held.code == 1, held
    assert "in use by another process" in held.err and "--state-directory" in held.err, held
    assert len(held.err.strip().splitlines()) == 1, held.err
    assert beside.code == 0, beside
    assert beside.fields()["entries"] == "70"

    stats = await cache_cli("stats", "-c", settings)
    assert stats.code == 0 and stats.err == "", stats
    fields = stats.fields()
    assert fields["topic"] == cache_topic
    assert fields["partitions"] == "3"
    ends = dict(pair.split(":") for pair in fields["end offsets"].split())
    assert sorted(ends) == ["0", "1", "2"] and sum(map(int, ends.values())) == 70
    assert fields["store"] == str(state / f"{cache_topic}.sqlite")
    assert fields["entries"] == "70"
    assert int(fields["bytes"].split()[0]) > 0
    records_read = int(fields["last catch-up"].split(", ")[1].split()[0])
    assert records_read < 70, "the consumer's store is read on from its offsets"
    print(f"\n{stats.out}")

    short = await cache_cli(
        "purge",
        "-c",
        settings,
        "--older-than",
        "7d",
        "--catch-up-timeout",
        "0.001",
        "--state-directory",
        tmp_path / "short",
    )
    assert short.code == 1, short
    assert "was not read to its end" in short.err and "--catch-up-timeout" in short.err, short
    dry = await cache_cli("purge", "-c", settings, "--older-than", "7d", "--dry-run")
    assert dry.code == 0 and dry.err == "", dry
    assert dry.out.startswith("would purge 20 of 70 entries"), dry
    purge = await cache_cli("purge", "-c", settings, "--older-than", "7d")
    assert purge.code == 0 and purge.err == "", purge
    assert purge.out.startswith("purged 20 of 70 entries"), purge
    print(purge.out)

    fresh = await cache_cli("stats", "-c", settings, "--state-directory", tmp_path / "fresh")
    assert fresh.code == 0, fresh
    assert fresh.fields()["entries"] == "50", "a replica reading the topic whole drops them"
    records = await read_topic(kafka_bootstrap, cache_topic, expect=90, timeout_s=30)
    tombstones = sorted(m.key or b"" for m in records if m.value is None)
    assert tombstones == sorted(old)
