"""Answer validation end to end: real broker, the fake LLM as a process, the consumer too.

An answer that is not one of the allowed values is asked for again once; still wrong, the row
is an `invalid_answer` error row keeping the answer, while the rest of the window is enriched
and committed. Invalid answers are never cached.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_llm_process import FakeLLM, fake_llm_process
from tests.support.pipeline import (
    Topics,
    create_topics,
    publish,
    read_topic,
    rows_to_messages,
    running_consumer,
    settings_file,
    wait_for_commits,
)

LABELS = ["POSITIVE", "NEGATIVE", "NEUTRAL"]


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    """One fake per test: the tests count its requests."""
    with fake_llm_process("--latency-ms", "5") as server:
        yield server


async def test_invalid_answers_become_invalid_answer_rows_after_the_retry(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    topics = Topics.unique("validate")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    texts = {
        "ok": "great product",
        "untidy": "awful product [[fake:untidy]]",
        "fixed": "nice product [[fake:wrongx1]]",
        "wrong": "good product [[fake:wrong]]",
        "same": "good product [[fake:wrong]]",
        "cut": "great stuff [[fake:length]]",
    }
    batch = [{"id": key, "text": text} for key, text in texts.items()]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(batch))
    llm = {"validate": {"allowed": LABELS}, "cache": {"backend": "memory"}}
    settings = settings_file(tmp_path, kafka_bootstrap, fake_llm.base_url, topics, llm=llm)
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=6, timeout_s=60)
        committed = await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
        assert consumer.stop() == 0

    assert committed == {0: 6}
    bodies = {m.key: m.json() for m in outputs}
    assert len(bodies) == 6
    assert bodies[b"ok"]["llm_response"] == "POSITIVE"
    assert bodies[b"untidy"]["llm_response"] == "NEGATIVE", "case and whitespace do not count"
    assert bodies[b"fixed"]["llm_response"] == "POSITIVE", "the retry got a valid answer"
    assert bodies[b"fixed"]["llm_response_usage"]["prompt_tokens"] > 0
    for key in (b"ok", b"untidy", b"fixed"):
        assert bodies[key]["llm_response_error"] is None
    for key in (b"wrong", b"same"):
        body = bodies[key]
        assert body["llm_response"] is None
        assert body["llm_response_error"] == {
            "reason": "invalid_answer",
            "message": "the answer is not one of ['POSITIVE', 'NEGATIVE', 'NEUTRAL']",
            "status_code": 200,
            "attempts": 2,
            "retryable": False,
            "answer": "The sentiment of this review is positive.",
        }
        assert body["llm_response_cache"] == "miss", "an invalid answer is never a cache hit"
        assert body["llm_response_model"] == "fake-model"
        assert body["llm_response_usage"]["completion_tokens"] > 0, "the answers were paid"
    cut = bodies[b"cut"]
    assert cut["llm_response_error"]["reason"] == "invalid_answer"
    assert cut["llm_response_error"]["attempts"] == 1, "a cut answer is not asked again"
    assert cut["llm_response_error"]["answer"] == "POSI"
    assert cut["llm_response_truncated"] is True
    # ok 1, untidy 1, fixed 2, wrong 2, same 2 (its own attempts: nothing cached), cut 1
    assert fake_llm.stats()["requests"] == 9


async def test_a_sloppy_model_gives_valid_or_invalid_answer_rows_and_never_holds_the_window(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    fake_llm.configure(wrong_rate=0.3, truncate_rate=0.2, seed=7)
    topics = Topics.unique("sloppy")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    batch: list[dict[str, Any]] = [
        {"id": f"r{i}", "text": f"{'great' if i % 2 else 'awful'} product {i}"} for i in range(30)
    ]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(batch))
    settings = settings_file(
        tmp_path, kafka_bootstrap, fake_llm.base_url, topics, llm={"validate": {"allowed": LABELS}}
    )
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=30, timeout_s=60)
        committed = await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
        assert consumer.stop() == 0
        held = [
            line
            for line in consumer.log_lines()
            if line.get("msg") == "window held back: offsets stay uncommitted"
        ]

    assert committed == {0: 30}
    assert held == [], "wrong answers are the rows' own: never a held window"
    bodies = [m.json() for m in outputs]
    invalid = [b for b in bodies if b["llm_response_error"] is not None]
    valid = [b for b in bodies if b["llm_response_error"] is None]
    assert all(b["llm_response"] in LABELS for b in valid)
    assert all(b["llm_response_error"]["reason"] == "invalid_answer" for b in invalid)
    assert invalid and valid
    assert any(b["llm_response_truncated"] for b in invalid)
    assert any(b["llm_response_error"]["answer"].startswith("The sentiment") for b in invalid)
