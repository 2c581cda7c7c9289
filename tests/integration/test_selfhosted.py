"""A self-hosted server that queues and announces its slots (llama.cpp's GET /props): the
limit is capped one above them, so requests never pile up in the server's queue."""

from __future__ import annotations

from pathlib import Path

from consumer.config import LLMSettings
from consumer.llm.limiter import AIMDLimiter
from consumer.llm.selfhosted import announced_slots, fit_to_server
from tests.support.fake_llm_process import fake_llm_process
from tests.support.pipeline import (
    Topics,
    create_topics,
    duplicates,
    publish,
    read_topic,
    rows_to_messages,
    running_consumer,
    settings_file,
    wait_for_commits,
)

SLOTS = 4
QUEUEING = ["--overload", "queue", "--capacity", str(SLOTS), "--latency-ms", "50"]


def llm_settings(base_url: str, **concurrency: object) -> LLMSettings:
    return LLMSettings.model_validate(
        {
            "provider": "openai",
            "base_url": f"{base_url}/v1",
            "api_key": "test-key",
            "model": "fake-model",
            "template": "{{ row.text }}",
            "concurrency": concurrency,
        }
    )


async def test_the_slots_are_read_from_props_and_cap_the_limit_one_above_them() -> None:
    with fake_llm_process(*QUEUEING, "--announce-slots") as llm:
        settings = llm_settings(llm.base_url)
        assert await announced_slots(settings) == SLOTS
        limiter = AIMDLimiter.from_settings(settings.concurrency)
        assert await fit_to_server(settings, limiter) == SLOTS
        assert limiter.limit == SLOTS + 1
        assert limiter.state().limit == SLOTS + 1
    # a server without /props (vLLM, a gateway) announces nothing: the latency probe decides
    with fake_llm_process(*QUEUEING) as llm:
        settings = llm_settings(llm.base_url)
        limiter = AIMDLimiter.from_settings(settings.concurrency)
        assert await fit_to_server(settings, limiter) is None
        assert limiter.limit == settings.concurrency.initial
        # `server_slots: null` never asks; a number is taken as it is
        assert await announced_slots(llm_settings(llm.base_url, server_slots=None)) is None
        assert await fit_to_server(llm_settings(llm.base_url, server_slots=2), limiter) == 2
        assert limiter.limit == 3


async def test_the_consumer_keeps_a_queueing_server_at_its_slots_end_to_end(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    total = 400
    topics = Topics.unique("selfhosted")
    await create_topics(kafka_bootstrap, [topics.input, topics.output], partitions=2)
    rows = [{"id": f"s{i}", "text": f"review {i}: fine"} for i in range(total)]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    with fake_llm_process(*QUEUEING, "--announce-slots") as llm:
        settings = settings_file(tmp_path, kafka_bootstrap, llm.base_url, topics)
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=total, timeout_s=120)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert consumer.stop() == 0
        stats = llm.stats()
    log = consumer.log_text()[-3000:]
    assert len(outputs) == total, log
    assert duplicates(outputs) == 0
    bodies = [message.json() for message in outputs]
    assert [body["llm_response_error"] for body in bodies if body["llm_response_error"]] == []
    fitted = [line for line in consumer.log_lines() if line.get("server_slots") == SLOTS]
    assert fitted and fitted[0]["limit_cap"] == SLOTS + 1, log
    # the default limit (16) would have queued a dozen requests in the server
    assert stats["max_in_flight"] <= SLOTS + 1, stats
