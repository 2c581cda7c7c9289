"""The user's commands as processes against the real broker and the real fake LLM: a CSV of
tickets published with the settings file, enriched by `run`, read back by `tail` with the
settings' response field and the dead letters' reasons; and a broker that is not there."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.support.fake_llm_process import fake_llm_process
from tests.support.pipeline import ConsumerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m consumer ARGS`, with warnings on so an unclosed client would show."""
    return subprocess.run(
        [sys.executable, "-W", "default", "-m", "consumer", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def jsonl_values(stdout: str) -> list[Any]:
    return [orjson.loads(line)["value"] for line in stdout.splitlines()]


def write_settings(tmp_path: Path, llm_url: str) -> tuple[Path, str]:
    """Settings as a user writes them from the README; the broker comes from the environment."""
    run = uuid.uuid4().hex[:8]
    (tmp_path / "prompt.j2").write_text(
        "Ticket {{ row.id }}, answer within {{ lookup.sla[row.priority] }}: {{ row.text }}",
        encoding="utf-8",
    )
    settings = {
        "kafka": {
            "bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}",
            "input_topic": f"cli-{run}.tickets",
            "output_topic": f"cli-{run}.triaged",
            "group_id": f"cli-{run}",
        },
        "window": {"max_messages": 10, "max_wait_ms": 300},
        "llm": {
            "provider": "openai",
            "base_url": f"{llm_url}/v1",
            "api_key": "test-key",
            "model": "fake-model",
            "template_file": "prompt.j2",
            "lookup": {"sla": {1: "4 hours", 2: "1 day", 3: "1 week"}},
            "response_field": "triage",
        },
        "logging": {"format": "json"},
    }
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path, f"cli-{run}"


TICKETS = (
    "id,priority,vip,text\n"
    "T-1,1,true,Printer on fire\n"
    'T-2,3,false,"Password reset, please"\n'
    "T-3,2,,Invoice missing\n"
)


def test_a_csv_published_with_the_settings_file_is_enriched_and_tailed_with_its_field(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    tickets = tmp_path / "tickets.csv"
    tickets.write_text(TICKETS, encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n", encoding="utf-8")
    with fake_llm_process() as llm:
        settings, run = write_settings(tmp_path, llm.base_url)
        metrics_port = free_port()

        published = cli(
            "publish", str(tickets), "-c", str(settings), "-k", "id", "-p", "2", env=env
        )
        assert published.returncode == 0, published.stderr
        assert f"published 3 rows to {run}.tickets" in published.stderr
        assert cli("publish", str(bad), "-c", str(settings), env=env).returncode == 0

        consumer = ConsumerProcess(
            settings,
            tmp_path / "consumer.log",
            {**env, "LLM_CONSUMER_METRICS_PORT": str(metrics_port)},
        ).start()
        try:
            waited = cli(
                "tail",
                "-c",
                str(settings),
                "--expect",
                "3",
                "--timeout",
                "60",
                "--format",
                "jsonl",
                env=env,
                timeout=90,
            )
            assert waited.returncode == 0, consumer.log_text()
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            assert "llm_consumer_rows_consumed_total" in metrics
        finally:
            assert consumer.stop() == 0

    # CSV values arrived typed: the lookup by priority worked for every row.
    rows = sorted(jsonl_values(waited.stdout), key=lambda row: row["id"])
    assert [(r["id"], r["priority"], r["vip"]) for r in rows] == [
        ("T-1", 1, True),
        ("T-2", 3, False),
        ("T-3", 2, None),
    ]
    assert all(r["triage_error"] is None and r["triage"] for r in rows)

    # The table reads the settings' response field, not llm_response.
    table = cli("tail", "-c", str(settings), env=env)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert "triage" in header
    assert len(lines) == 3
    assert not any("null" in line or "ERROR" in line for line in lines)

    # The dead letter shows why it is one.
    dead = cli("tail", "-c", str(settings), "--dlq", env=env)
    assert dead.returncode == 0, dead.stderr
    header, line = dead.stdout.splitlines()
    assert "dlq.reason" in header
    assert "DLQ invalid_json" in line
    assert "this is not json" in line
    assert "Unclosed" not in table.stderr + dead.stderr + published.stderr


def test_without_flags_publish_and_tail_use_kafka_bootstrap_servers(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"cli-env-{uuid.uuid4().hex[:8]}"
    rows = tmp_path / "rows.csv"
    rows.write_text("id,n,ratio,zip\na,7,0.5,007\n", encoding="utf-8")
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    assert cli("publish", str(rows), "-t", topic, env=env).returncode == 0
    assert cli("publish", str(rows), "-t", topic, "--csv-strings", env=env).returncode == 0
    tailed = cli("tail", "-t", topic, "--format", "jsonl", env=env)
    assert tailed.returncode == 0, tailed.stderr
    assert jsonl_values(tailed.stdout) == [
        {"id": "a", "n": 7, "ratio": 0.5, "zip": "007"},
        {"id": "a", "n": "7", "ratio": "0.5", "zip": "007"},
    ]


@pytest.mark.parametrize("command", ["publish", "tail"])
def test_an_unreachable_broker_is_one_line_and_exit_1_within_the_connect_timeout(
    command: str, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1}\n', encoding="utf-8")
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    args = [str(rows)] if command == "publish" else []
    started = time.monotonic()
    result = cli(command, *args, "-t", "t", "-b", address, "--connect-timeout", "1.5")
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert 1.5 <= elapsed < 15
    assert result.stderr.splitlines() == [
        f"error: cannot reach a Kafka broker at {address} (from -b), tried for 1.5 s: "
        f"{address} refused the connection (nothing listens there). Check that the broker "
        "runs and the address is right (-b, KAFKA_BOOTSTRAP_SERVERS, or "
        "kafka.bootstrap_servers with -c); --connect-timeout waits longer"
    ]


def test_the_fake_llm_lists_its_model_as_openai_does() -> None:
    with fake_llm_process() as llm:
        for path in ("/v1/models", "/models"):
            response = httpx.get(llm.url(path), timeout=5)
            assert response.status_code == 200
            body = response.json()
            assert body["object"] == "list"
            (model,) = body["data"]
            assert model["object"] == "model"
            assert {"id", "created", "owned_by"} <= set(model)
