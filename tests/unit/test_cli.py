"""The command line a new user meets: help for every flag, check-config on sample rows, and
errors that say what to do. Commands that need no broker run in-process here; the ones that
do are in tests/integration/test_cli.py."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer import __version__
from consumer.cli import build_parser, main

SETTINGS: dict[str, Any] = {
    "kafka": {
        "bootstrap_servers": "127.0.0.1:1",
        "input_topic": "tickets",
        "output_topic": "tickets.out",
        "group_id": "g",
    },
    "llm": {
        "provider": "openai",
        "base_url": "http://127.0.0.1:1/v1",
        "model": "m",
        "template_file": "prompt.j2",
        "lookup": {"sla": {1: "4h", 2: "1d"}},
        "response_field": "triage",
    },
}


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    (tmp_path / "prompt.j2").write_text(
        "Ticket {{ row.id }} (SLA {{ lookup.sla[row.priority] }}):\n{{ row.text }}",
        encoding="utf-8",
    )
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(SETTINGS), encoding="utf-8")
    return path


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


def test_every_flag_of_every_command_has_help() -> None:
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, sub in _subparsers().items()
        for action in sub._actions
        if not action.help
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("check-config", "(default: 5)"),
        ("publish", "(default: 10.0)"),
        ("tail", "(default: table)"),
        ("schemas", "(default: schemas)"),
        ("fake-llm", "(default: 8089)"),
    ],
)
def test_help_shows_the_defaults(
    command: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert shown in out
    assert "(default: None)" not in out
    assert "(default: False)" not in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"llm-consumer {__version__}"


def test_check_config_takes_the_file_positionally_and_with_c(
    settings_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", str(settings_file)]) == 0
    assert main(["check-config", "-c", str(settings_file)]) == 0
    assert capsys.readouterr().out.count(f"{settings_file}: OK") == 2


def test_check_config_without_a_file_or_with_two_is_a_usage_error(
    settings_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["check-config"])
    assert caught.value.code == 2
    assert "check-config -c settings.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["check-config", str(settings_file), "-c", "other.yaml"])
    assert caught.value.code == 2


def test_a_sample_prints_each_prompt_and_each_error_with_its_row(
    settings_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"id": "a", "priority": 1, "text": "printer on fire"}\n'
        "\n"
        '{"id": "b", "text": "no priority"}\n'
        "not json\n"
        '{"id": "c", "priority": 2, "text": "fine"}\n'
        '{"id": "d", "priority": 2, "text": "beyond --rows"}\n',
        encoding="utf-8",
    )
    assert (
        main(["check-config", "-c", str(settings_file), "--sample", str(rows), "--rows", "4"]) == 1
    )
    out = capsys.readouterr().out
    assert "row 1 (line 1):\n  [user] Ticket a (SLA 4h):\n      printer on fire" in out
    assert "row 2 (line 3): template error: UndefinedError: 'dict object' has no attribute" in out
    assert "(the row's fields: id, text)" in out
    assert "row 3 (line 4): would be a dead letter (invalid_json)" in out
    assert "Ticket c (SLA 1d)" in out
    assert "beyond --rows" not in out
    assert "4 rows checked, 2 with errors" in out


def test_a_sample_whose_rows_all_render_exits_0(
    settings_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "a", "priority": 2, "text": "t"}\n', encoding="utf-8")
    assert main(["check-config", str(settings_file), "--sample", str(rows)]) == 0
    assert "1 rows checked, 0 with errors" in capsys.readouterr().out


def test_a_csv_sample_gets_numbers_so_a_lookup_by_number_works(
    settings_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("id,priority,text\nt1,1,hello\nt2,2,bye\n", encoding="utf-8")
    assert main(["check-config", str(settings_file), "--sample", str(rows)]) == 0
    assert "Ticket t2 (SLA 1d)" in capsys.readouterr().out
    # As strings the lookup misses: the sample shows it before anything is paid for.
    assert main(["check-config", str(settings_file), "--sample", str(rows), "--csv-strings"]) == 1
    assert "row 1 (line 2): template error" in capsys.readouterr().out
    args = ["--sample", str(rows), "--csv-strings", "--csv-types", "priority=int"]
    assert main(["check-config", str(settings_file), *args]) == 0


def test_a_jinja_syntax_error_names_the_key_the_file_and_the_line(
    settings_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = settings_file.parent / "prompt.j2"
    template.write_text("line one\n{{ row.id }\n", encoding="utf-8")
    assert main(["check-config", str(settings_file)]) == 2
    err = capsys.readouterr().err
    assert f"llm.template_file: {template}, line 2: not a valid Jinja2 template" in err


def test_an_unknown_key_in_check_config_suggests_the_right_one(
    settings_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {**SETTINGS, "window": {"max_wait": 500}}
    settings_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["check-config", str(settings_file)]) == 2
    assert "window.max_wait: unknown key; did you mean `max_wait_ms`?" in capsys.readouterr().err


def test_publish_and_tail_need_a_topic_or_a_settings_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("{}\n", encoding="utf-8")
    for argv in (["publish", str(rows)], ["tail"], ["tail", "--dlq"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
        assert "-c" in capsys.readouterr().err


def test_a_csv_that_does_not_convert_is_refused_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("id,priority\na,high\n", encoding="utf-8")
    argv = ["publish", str(rows), "-t", "t", "-b", "127.0.0.1:1", "--csv-types", "priority=int"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nothing was published" in err
    assert "cannot reach" not in err


@pytest.mark.parametrize(
    ("argv", "env", "source"),
    [
        (["-b", "127.0.0.1:1"], {}, "127.0.0.1:1 (from -b)"),
        ([], {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}, "(from KAFKA_BOOTSTRAP_SERVERS)"),
        (["-c", "SETTINGS"], {"KAFKA_BOOTSTRAP_SERVERS": "ignored:1"}, "(from kafka.bootstrap"),
    ],
)
def test_an_unreachable_broker_is_one_line_naming_where_the_address_came_from(
    argv: list[str],
    env: dict[str, str],
    source: str,
    settings_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = [str(settings_file) if a == "SETTINGS" else a for a in argv]
    started = time.monotonic()
    assert main(["tail", "-t", "t", "--connect-timeout", "0.5", *argv]) == 1
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err.strip()
    assert source in err
    assert "refused the connection" in err
    assert len(err.splitlines()) == 1
