"""What each row cost, end to end: configured prices, the provider's own figure, the dry run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.support.fake_llm_process import fake_llm_process
from tests.support.pipeline import (
    ROOT,
    Topics,
    create_topics,
    publish,
    read_topic,
    rows_to_messages,
    running_consumer,
    settings_file,
    wait_for_commits,
)

PRICE = {"input_per_million": 150.0, "output_per_million": 600.0, "cached_input_per_million": 15.0}
# Long enough for the fake's prefix cache (blocks of 32 tokens) to find it repeated.
SYSTEM = "You label the sentiment of product reviews. " * 8


def priced(row: dict[str, Any], price: dict[str, float]) -> float:
    usage = row["llm_response_usage"]
    cached = usage.get("cached_tokens", 0)
    return (
        (usage["prompt_tokens"] - cached) * price["input_per_million"]
        + cached * price["cached_input_per_million"]
        + usage["completion_tokens"] * price["output_per_million"]
    ) / 1e6


async def test_rows_carry_their_cost_from_the_prices_and_the_fakes_usage(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """120 distinct rows behind a long system prompt: every row's cost is its usage at the
    configured prices, cached prompt tokens at their own rate."""
    topics = Topics.unique("cost-prices")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=2)
    rows = [{"id": i, "text": f"review {i}: great value, would recommend"} for i in range(120)]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    with fake_llm_process("--latency-ms", "5") as llm:
        llm.configure(prefix_cache_min_tokens=32)
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            llm={"system_prompt": SYSTEM, "pricing": {"models": {"fake-model": PRICE}}},
        )
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=120, timeout_s=90)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert consumer.stop() == 0
            stopped = [line for line in consumer.log_lines() if line.get("msg") == "stopped"]
    bodies = [orjson.loads(m.value or b"") for m in outputs]
    assert len(bodies) == 120
    for body in bodies:
        assert body["llm_response_error"] is None
        assert body["llm_response_cost_source"] == "prices"
        assert body["llm_response_cost_usd"] == pytest.approx(priced(body, PRICE))
    cached = [b for b in bodies if b["llm_response_usage"].get("cached_tokens")]
    assert len(cached) >= 100, "the repeated system prompt is reported as cached"
    total = sum(b["llm_response_cost_usd"] for b in bodies)
    assert stopped[-1]["cost_usd"] == pytest.approx(total, rel=1e-4)


async def test_with_openrouter_usage_accounting_the_providers_figure_is_used_and_marked(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("cost-openrouter")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=1)
    rows = [{"id": i, "text": f"review {i}: terrible, broken"} for i in range(40)]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    with fake_llm_process() as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            llm={
                "provider": "openrouter",
                "base_url": f"{llm.base_url}/api/v1",
                "model": "openai/gpt-4o-mini",
                # deliberately not the fake's rates: the provider's figure must win
                "pricing": {"models": {"openai/gpt-4o-mini": PRICE}},
            },
        )
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=40, timeout_s=60)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert consumer.stop() == 0
        asked = llm.stats()["last_request"]["usage"]
    assert asked == {"include": True}
    fake_rates = {
        "input_per_million": 0.5,
        "output_per_million": 1.5,
        "cached_input_per_million": 0.125,
    }
    for body in (orjson.loads(m.value or b"") for m in outputs):
        assert body["llm_response_cost_source"] == "provider"
        assert body["llm_response_cost_usd"] == pytest.approx(priced(body, fake_rates))
        assert body["llm_response_cost_usd"] != pytest.approx(priced(body, PRICE))


def sentiment_settings(tmp_path: Path) -> Path:
    """examples/sentiment/settings.yaml as it is (with its prices), plus logs a test reads."""
    example = ROOT / "examples" / "sentiment"
    settings = yaml.safe_load((example / "settings.yaml").read_text())
    llm = settings["llm"]
    llm["template_file"] = str(example / llm["template_file"])
    llm["lookup_file"] = str(example / llm["lookup_file"])
    assert llm["pricing"]["models"], "the example is priced"
    settings["logging"] = {"format": "json"}
    settings["observability"] = {"port": 0}
    path = tmp_path / "sentiment.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


async def test_estimate_is_within_15_percent_of_what_the_sentiment_run_reports(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("cost-estimate")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    reviews = ROOT / "examples" / "sentiment" / "reviews.jsonl"
    lines = [line for line in reviews.read_bytes().splitlines() if line.strip()]
    await publish(kafka_bootstrap, topics.input, [(None, line) for line in lines])
    settings = sentiment_settings(tmp_path)
    with fake_llm_process() as llm:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "DEMO_INPUT_TOPIC": topics.input,
            "DEMO_OUTPUT_TOPIC": topics.output,
            "DEMO_DLQ_TOPIC": topics.dlq,
            "DEMO_GROUP": topics.group,
            "LLM_BASE_URL": f"{llm.base_url}/v1",
        }
        command = [sys.executable, "-m", "consumer", "estimate", "--json", "-c", str(settings)]
        done = await asyncio.to_thread(
            subprocess.run,
            [*command, str(reviews)],
            check=True,
            capture_output=True,
            env={**os.environ, **env},
            cwd=ROOT,
        )
        estimated = orjson.loads(done.stdout)
        with running_consumer(settings, tmp_path / "consumer.log", **env) as consumer:
            await read_topic(kafka_bootstrap, topics.output, expect=len(lines), timeout_s=90)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert consumer.stop() == 0
            stopped = [line for line in consumer.log_lines() if line.get("msg") == "stopped"]
        requests = llm.stats()["requests"]
    reported = stopped[-1]["cost_usd"]
    print(
        f"\nsentiment example: run {reported:.6f} USD in {requests} requests; estimate "
        f"{estimated['cost_usd']:.6f} USD in {estimated['requests']} requests"
    )
    assert estimated["requests"] == requests
    assert abs(estimated["cost_usd"] - reported) <= 0.15 * reported


async def test_the_audit_trail_has_one_record_per_attempt_failed_ones_too(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """28 plain rows, one failing once with a 500 (two attempts), one refused with a 400: 31
    records, each naming its row's source position and window, before the offsets commit."""
    topics = Topics.unique("cost-audit")
    audit_topic = f"{topics.output}.audit"
    await create_topics(
        kafka_bootstrap, [topics.input, topics.output, topics.dlq, audit_topic], partitions=2
    )
    rows = [{"id": i, "text": f"review {i}: good"} for i in range(28)]
    rows += [{"id": 28, "text": "flaky [[fake:500x1]]"}, {"id": 29, "text": "bad [[fake:400]]"}]
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    with fake_llm_process() as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            llm={"pricing": {"models": {"fake-model": PRICE}}, "audit_topic": audit_topic},
        )
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=30, timeout_s=60)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            records = await read_topic(kafka_bootstrap, audit_topic, expect=31, settle_s=1)
            assert consumer.stop() == 0
    assert len(outputs) == 30
    audited = [orjson.loads(m.value or b"") for m in records]
    assert len(audited) == 31
    assert len({r["call_id"] for r in audited}) == 31
    assert {(r["source_partition"], r["source_offset"]) for r in audited} == set(positions)
    by_id = {m.json()["id"]: m.source for m in outputs}
    flaky = sorted(
        (r for r in audited if (r["source_partition"], r["source_offset"]) == by_id[28]),
        key=lambda r: r["attempt"],
    )
    assert [(r["attempt"], r["status_code"]) for r in flaky] == [(1, 500), (2, 200)]
    assert flaky[0]["error_reason"] and flaky[0]["cost_usd"] is None
    assert flaky[1]["cost_usd"] == pytest.approx(
        priced({"llm_response_usage": flaky[1]["usage"]}, PRICE)
    )
    bad = [r for r in audited if (r["source_partition"], r["source_offset"]) == by_id[29]]
    assert [(r["attempt"], r["status_code"]) for r in bad] == [(1, 400)]
    assert all(r["window_id"] and r["request_hash"] for r in audited)
