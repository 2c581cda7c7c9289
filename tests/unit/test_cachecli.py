"""`llm-consumer cache`: the ages an operator writes, which entries a purge selects, and the
settings refused before any broker is contacted. Runs against the real broker are in
tests/integration/test_cache.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.cachecli import Duration, select_older_than
from consumer.cli import main
from consumer.state import LocalStore

DAY_S = 86_400.0
NOW_S = 1_800_000_000.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 7 * DAY_S),
        ("12h", 12 * 3600.0),
        ("30m", 1800.0),
        ("45s", 45.0),
        ("3600", 3600.0),
        ("0.5", 0.5),
        ("1.5h", 5400.0),
        (" 2d ", 2 * DAY_S),
        ("0", 0.0),
    ],
)
def test_an_age_is_a_number_with_an_optional_unit(text: str, seconds: float) -> None:
    assert Duration.parse(text).seconds == seconds


@pytest.mark.parametrize("text", ["", "d", "7x", "7 d", "-1d", "1w", "1h30m", "1.2.3s", "7D"])
def test_an_age_that_is_not_one_says_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"7d, 12h, 30m, 45s, or seconds as a bare number"):
        Duration.parse(text)


def test_a_bad_age_on_the_command_line_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "purge", "-c", str(tmp_path / "s.yaml"), "--older-than", "7x"])
    assert exit_info.value.code == 2
    assert "--older-than: expected a number and a unit" in capsys.readouterr().err


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    opened = LocalStore(tmp_path / "cache.sqlite")
    yield opened
    opened.close()


def ms(seconds: float) -> int:
    return int(seconds * 1000)


def test_a_purge_selects_the_entries_last_written_before_the_age(store: LocalStore) -> None:
    store.write(b"ten-days", b"v", ms(NOW_S - 10 * DAY_S))
    store.write(b"eight-days", b"v", ms(NOW_S - 8 * DAY_S))
    store.write(b"one-day", b"v", ms(NOW_S - DAY_S))
    store.write(b"just-now", b"v", ms(NOW_S))
    selection = select_older_than(store, Duration.parse("7d"), NOW_S)
    assert selection.cutoff_ms == ms(NOW_S - 7 * DAY_S)
    assert sorted(selection.keys) == [b"eight-days", b"ten-days"]
    assert select_older_than(store, Duration.parse("12h"), NOW_S).keys != []
    assert select_older_than(store, Duration.parse("30d"), NOW_S).keys == []


def test_an_entry_exactly_at_the_cutoff_or_written_again_since_is_kept(store: LocalStore) -> None:
    """Strictly older only; a key stored again is as young as its last write."""
    store.write(b"at-cutoff", b"v", ms(NOW_S - 7 * DAY_S))
    store.write(b"rebought", b"old", ms(NOW_S - 9 * DAY_S))
    store.write(b"rebought", b"new", ms(NOW_S - DAY_S))
    store.write(b"deleted", b"v", ms(NOW_S - 9 * DAY_S))
    store.write(b"deleted", None, ms(NOW_S - DAY_S))
    assert select_older_than(store, Duration.parse("7d"), NOW_S).keys == []


def test_every_entry_is_older_than_0(store: LocalStore) -> None:
    store.write(b"a", b"v", ms(NOW_S - 1))
    store.write(b"b", b"v", ms(NOW_S - DAY_S))
    assert sorted(select_older_than(store, Duration.parse("0"), NOW_S).keys) == [b"a", b"b"]


def settings(tmp_path: Path, **cache: Any) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kafka": {
                    "bootstrap_servers": "127.0.0.1:1",
                    "input_topic": "in",
                    "output_topic": "out",
                    "group_id": "g",
                },
                "llm": {
                    "provider": "openai",
                    "base_url": "http://127.0.0.1:1/v1",
                    "model": "m",
                    "template": "{{ row.text }}",
                    "cache": cache,
                },
                "state": {"directory": str(tmp_path / "state")},
            }
        )
    )
    return path


@pytest.mark.parametrize(
    ("backend", "why"),
    [("memory", "lives in each consumer process"), ("off", "there is no cache")],
)
@pytest.mark.parametrize("command", [["stats"], ["purge", "--older-than", "7d"]])
def test_a_backend_other_than_kafka_is_a_configuration_error(
    backend: str,
    why: str,
    command: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = settings(tmp_path, backend=backend)
    assert main(["cache", *command, "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"llm.cache.backend is {backend}" in err
    assert "works on the kafka backend only" in err and why in err
    assert not (tmp_path / "state").exists(), "refused before anything was opened"


@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf", "nan"])
def test_a_catch_up_timeout_that_is_not_seconds_above_0_is_a_usage_error(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = settings(tmp_path, backend="kafka")
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "stats", "-c", str(path), "--catch-up-timeout", value])
    assert exit_info.value.code == 2
    assert "--catch-up-timeout: takes seconds above 0" in capsys.readouterr().err
