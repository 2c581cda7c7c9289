"""Input that cannot be a row becomes a dead letter with a stable reason."""

from __future__ import annotations

import pytest

from consumer.decode import decode_row
from consumer.records import DeadLetter

LIMIT = 1_000


def reason(value: bytes | None, max_bytes: int = LIMIT) -> str:
    result = decode_row(value, max_bytes)
    assert isinstance(result, DeadLetter), result
    assert result.message  # a person can read why
    return result.reason


def test_a_tombstone_is_a_dead_letter() -> None:
    assert reason(None) == "tombstone"


def test_an_empty_value_is_a_dead_letter() -> None:
    assert reason(b"") == "empty"


def test_a_value_over_the_size_limit_is_a_dead_letter() -> None:
    assert reason(b'{"a": "' + b"x" * 20 + b'"}', max_bytes=10) == "too_large"


def test_a_value_exactly_at_the_size_limit_is_accepted() -> None:
    value = b'{"a": 1}'
    assert decode_row(value, len(value)) == {"a": 1}


def test_invalid_utf8_is_reported_as_such() -> None:
    assert reason(b'{"a": "\xff"}') == "invalid_utf8"


@pytest.mark.parametrize("value", [b"{", b"not json", b'{"a": }', b"{'a': 1}"])
def test_invalid_json_is_a_dead_letter(value: bytes) -> None:
    assert reason(value) == "invalid_json"


@pytest.mark.parametrize("value", [b"[1, 2]", b"42", b'"text"', b"null", b"true"])
def test_json_that_is_not_an_object_is_a_dead_letter(value: bytes) -> None:
    assert reason(value) == "not_an_object"


def test_a_json_object_is_a_row() -> None:
    assert decode_row('{"id": 1, "text": "héllo", "n": [1]}'.encode(), LIMIT) == {
        "id": 1,
        "text": "héllo",
        "n": [1],
    }
