"""The batch client: each provider's URLs and line shape, per-file limits, output lines; and a
round trip against the fake's batch API served in process (OpenAI and Azure paths)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

from consumer.config import LLMSettings
from consumer.fake_llm.config import FakeLLMConfig
from consumer.fake_llm.server import create_app
from consumer.llm.batch import BatchAPI, BatchClient, BatchJob, parse_lines, split_lines
from consumer.llm.errors import FailureKind, LLMFailure


def openai(**extra: Any) -> LLMSettings:
    return LLMSettings(provider="openai", model="gpt-4o-mini", template="{{ row.t }}", **extra)


def azure(**extra: Any) -> LLMSettings:
    values: dict[str, Any] = {
        "provider": "azure",
        "base_url": "https://res.openai.azure.com",
        "deployment": "gpt-4o-mini-batch",
        "template": "{{ row.t }}",
        **extra,
    }
    return LLMSettings(**values)


def test_openai_files_and_batches_live_under_v1_and_lines_name_the_chat_endpoint() -> None:
    api = BatchAPI(openai())
    assert api.url("/files") == "https://api.openai.com/v1/files"
    assert api.url("/batches/b1") == "https://api.openai.com/v1/batches/b1"
    line = orjson.loads(api.line("in/0/7", {"model": "gpt-4o-mini", "messages": []}))
    assert line == {
        "custom_id": "in/0/7",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": []},
    }
    assert api.endpoint == "/v1/chat/completions"


def test_azure_batches_carry_the_api_version_and_lines_name_the_deployment() -> None:
    api = BatchAPI(azure(api_version="2024-10-21"))
    assert api.url("/files") == "https://res.openai.azure.com/openai/files?api-version=2024-10-21"
    assert (
        api.url("/batches") == "https://res.openai.azure.com/openai/batches?api-version=2024-10-21"
    )
    line = orjson.loads(api.line("in/1/3", {"messages": []}))
    assert line["url"] == "/chat/completions" and api.endpoint == "/chat/completions"
    assert line["body"]["model"] == "gpt-4o-mini-batch"


def test_azure_v1_style_has_no_api_version() -> None:
    api = BatchAPI(azure(azure_api_style="v1"))
    assert api.url("/batches") == "https://res.openai.azure.com/openai/v1/batches"


def test_lines_are_split_into_files_within_the_request_and_byte_limits_in_order() -> None:
    lines = [(f"id{i}", b"x" * 10) for i in range(7)]
    by_count = list(split_lines(lines, max_requests=3, max_bytes=1_000))
    assert [[cid for cid, _ in chunk] for chunk in by_count] == [
        ["id0", "id1", "id2"],
        ["id3", "id4", "id5"],
        ["id6"],
    ]
    by_bytes = list(split_lines(lines, max_requests=100, max_bytes=25))
    assert [len(chunk) for chunk in by_bytes] == [2, 2, 2, 1]


def test_output_and_error_lines_are_read_answers_and_errors_without_an_answer() -> None:
    content = b"\n".join(
        orjson.dumps(line)
        for line in (
            {"custom_id": "a", "response": {"status_code": 200, "body": {"x": 1}}, "error": None},
            {"custom_id": "b", "response": {"status_code": 400, "body": {"error": {}}}},
            {
                "custom_id": "c",
                "response": None,
                "error": {"code": "batch_expired", "message": "late"},
            },
        )
    )
    a, b, c = parse_lines(content + b"\nnot json\n")
    assert (a.custom_id, a.status_code, a.body) == ("a", 200, {"x": 1})
    assert b.status_code == 400
    assert (c.status_code, c.error_code) == (None, "batch_expired")


def test_a_failed_job_says_why() -> None:
    job = BatchJob.from_body(
        {
            "id": "batch_1",
            "status": "failed",
            "errors": {"data": [{"code": "mismatched_url", "message": "wrong url", "line": 1}]},
        }
    )
    assert job.terminal and job.errors == ("mismatched_url: wrong url",)


@pytest.fixture
async def fake_root() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []

    async def start(**knobs: Any) -> str:
        server = TestServer(create_app(FakeLLMConfig(batch_delay_s=0.2, **knobs)))
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def run_job(client: BatchClient, bodies: dict[str, dict[str, Any]]) -> tuple[BatchJob, Any]:
    content = b"".join(client.line(cid, body) for cid, body in bodies.items())
    file_id = await client.upload(content, "w.jsonl")
    job = await client.create(file_id, {"llm_consumer_job": "k1"})
    assert job.status == "validating"
    for _ in range(100):
        job = await client.retrieve(job.id)
        if job.terminal:
            break
        await asyncio.sleep(0.02)
    lines = []
    for fid in (job.output_file_id, job.error_file_id):
        if fid is not None:
            lines += parse_lines(await client.content(fid))
    return job, {line.custom_id: line for line in lines}


def chat(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


async def test_a_job_at_the_fake_openai_path_answers_each_line_and_errors_by_directive(
    fake_root: Callable[..., Any],
) -> None:
    root = await fake_root()
    client = BatchClient(openai(base_url=f"{root}/v1"))
    try:
        job, lines = await run_job(
            client, {"t/0/0": chat("great"), "t/0/1": chat("bad [[fake:400]]")}
        )
        found = await client.find("llm_consumer_job", "k1")
    finally:
        await client.aclose()
    assert job.status == "completed"
    assert job.request_counts == {"total": 2, "completed": 1, "failed": 1}
    assert lines["t/0/0"].status_code == 200
    assert lines["t/0/0"].body["choices"][0]["message"]["content"]
    assert lines["t/0/1"].status_code == 400
    assert found is not None and found.id == job.id


async def test_a_job_at_the_fake_azure_path_needs_the_api_version_and_can_expire(
    fake_root: Callable[..., Any],
) -> None:
    root = await fake_root(batch_expire_next=1)
    client = BatchClient(azure(base_url=root))
    try:
        job, lines = await run_job(client, {f"t/0/{i}": chat(f"row {i}") for i in range(4)})
    finally:
        await client.aclose()
    assert job.status == "expired"
    assert sorted(cid for cid, line in lines.items() if line.status_code == 200) == [
        "t/0/0",
        "t/0/1",
    ]
    assert {lines[c].error_code for c in ("t/0/2", "t/0/3")} == {"batch_expired"}


async def test_a_refused_create_is_a_classified_failure(fake_root: Callable[..., Any]) -> None:
    root = await fake_root(quota_exhausted=True)
    client = BatchClient(openai(base_url=f"{root}/v1"))
    try:
        file_id = await client.upload(client.line("t/0/0", chat("x")), "w.jsonl")
        with pytest.raises(LLMFailure) as refused:
            await client.create(file_id, {})
    finally:
        await client.aclose()
    assert refused.value.kind is FailureKind.SYSTEMIC
    assert refused.value.reason == "insufficient_quota"


def test_batch_mode_on_openrouter_is_refused_at_start_naming_why() -> None:
    with pytest.raises(ValueError, match="OpenRouter's batch API takes inline requests"):
        LLMSettings(provider="openrouter", model="m", template="{{ row.t }}", mode="batch")
