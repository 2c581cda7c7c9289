"""Input that cannot be a row becomes a dead letter with a stable reason."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from consumer.config import KafkaSettings
from consumer.decode import RowLimits, decode_row
from consumer.records import DeadLetter

LIMITS = RowLimits(max_bytes=100_000, max_depth=10, max_key_bytes=100)


def reason(value: bytes | None, limits: RowLimits = LIMITS, key: bytes | None = None) -> str:
    result = decode_row(key, value, limits)
    assert isinstance(result, DeadLetter), result
    assert result.message  # a person can read why
    return result.reason


def nested(depth: int, kinds: str = "o") -> bytes:
    """A row `depth` levels deep: the top object, then containers cycling through `kinds`."""
    opening, closing = [b'{"row":'], [b"}"]
    for level in range(1, depth):
        if kinds[level % len(kinds)] == "o":
            opening.append(b'{"k":')
            closing.append(b"}")
        else:
            opening.append(b"[")
            closing.append(b"]")
    return b"".join(opening) + b"1" + b"".join(reversed(closing))


def test_a_tombstone_is_a_dead_letter() -> None:
    assert reason(None) == "tombstone"


def test_an_empty_value_is_a_dead_letter() -> None:
    assert reason(b"") == "empty"


def test_a_value_over_the_size_limit_is_a_dead_letter() -> None:
    limits = RowLimits(max_bytes=10, max_depth=10, max_key_bytes=100)
    assert reason(b'{"a": "' + b"x" * 20 + b'"}', limits) == "too_large"


def test_a_value_exactly_at_the_size_limit_is_accepted() -> None:
    value = b'{"a": 1}'
    limits = RowLimits(max_bytes=len(value), max_depth=10, max_key_bytes=100)
    assert decode_row(None, value, limits) == {"a": 1}


def test_invalid_utf8_is_reported_as_such() -> None:
    assert reason(b'{"a": "\xff"}') == "invalid_utf8"


@pytest.mark.parametrize("value", [b"{", b"not json", b'{"a": }', b"{'a': 1}"])
def test_invalid_json_is_a_dead_letter(value: bytes) -> None:
    assert reason(value) == "invalid_json"


@pytest.mark.parametrize("literal", [b"1e400", b"-1e400", b"1E+400"])
def test_a_number_beyond_a_double_is_invalid_json(literal: bytes) -> None:
    # orjson refuses a literal that would parse to infinity, so such a row never reaches output.
    assert reason(b'{"a": ' + literal + b"}") == "invalid_json"


@pytest.mark.parametrize("value", [b"[1, 2]", b"42", b'"text"', b"null", b"true"])
def test_json_that_is_not_an_object_is_a_dead_letter(value: bytes) -> None:
    assert reason(value) == "not_an_object"


def test_a_json_object_is_a_row() -> None:
    assert decode_row(b"id-1", '{"id": 1, "text": "héllo", "n": [1]}'.encode(), LIMITS) == {
        "id": 1,
        "text": "héllo",
        "n": [1],
    }


@pytest.mark.parametrize("kinds", ["o", "a", "oa", "aao"])
def test_a_row_exactly_at_the_depth_limit_is_accepted(kinds: str) -> None:
    assert isinstance(decode_row(None, nested(LIMITS.max_depth, kinds), LIMITS), dict)


@pytest.mark.parametrize("kinds", ["o", "a", "oa", "aao"])
def test_a_row_one_level_over_the_depth_limit_is_a_dead_letter(kinds: str) -> None:
    result = decode_row(None, nested(LIMITS.max_depth + 1, kinds), LIMITS)
    assert result == DeadLetter(
        "too_deep",
        "the row is nested 11 levels deep, over the limit of 10 (kafka.max_row_depth)",
    )


@pytest.mark.parametrize("depth", [255, 1024, 1025, 2000])
@pytest.mark.parametrize("kinds", ["o", "a", "oa"])
def test_rows_deeper_than_the_encoders_can_go_are_too_deep(depth: int, kinds: str) -> None:
    result = decode_row(None, nested(depth, kinds), LIMITS)
    assert isinstance(result, DeadLetter)
    assert result.reason == "too_deep"
    # Past orjson's own parser limit the exact depth is unknown, but never called invalid JSON.
    found = str(depth) if depth <= 1024 else "more than 1024"
    assert f"nested {found} levels deep" in result.message
    assert "kafka.max_row_depth" in result.message


def test_depth_counts_the_deepest_branch_not_the_first() -> None:
    value = b'{"flat": [1, 2, {"a": 3}], "deep": ' + nested(LIMITS.max_depth) + b"}"
    assert reason(value) == "too_deep"


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    value = b'{"text": "' + b"{[" * 500 + b'"}'
    assert decode_row(None, value, LIMITS) == {"text": "{[" * 500}


def test_a_wide_row_within_the_depth_limit_is_accepted() -> None:
    row = {"items": [{"id": i, "tags": [[i]]} for i in range(1_000)]}
    assert decode_row(None, orjson.dumps(row), LIMITS) == row


def kafka_settings(**overrides: Any) -> KafkaSettings:
    required = {"bootstrap_servers": "b:9092", "input_topic": "in", "output_topic": "out"}
    return KafkaSettings.model_validate({**required, "group_id": "g", **overrides})


def test_a_row_at_the_highest_allowed_depth_can_still_be_encoded_with_fields() -> None:
    # The setting's cap must leave room under orjson's encoder limit for one more level.
    cap = 200
    with pytest.raises(ValidationError):
        kafka_settings(max_row_depth=cap + 1)
    limits = RowLimits.from_settings(kafka_settings(max_row_depth=cap))
    row = decode_row(None, nested(cap, "oa"), limits)
    assert isinstance(row, dict)
    wrapped = {"outer": row, 1: "non-str key"}
    orjson.dumps(wrapped, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


def test_a_key_exactly_at_the_limit_is_accepted() -> None:
    assert decode_row(b"k" * LIMITS.max_key_bytes, b'{"a": 1}', LIMITS) == {"a": 1}


def test_a_key_over_the_limit_is_a_dead_letter() -> None:
    result = decode_row(b"k" * (LIMITS.max_key_bytes + 1), b'{"a": 1}', LIMITS)
    assert result == DeadLetter(
        "key_too_large",
        "the message key is 101 bytes, over the limit of 100 (kafka.max_key_bytes)",
    )


def test_checks_run_in_order_tombstone_empty_key_size_json_object_depth() -> None:
    big_key = b"k" * (LIMITS.max_key_bytes + 1)
    small = RowLimits(max_bytes=5, max_depth=1, max_key_bytes=LIMITS.max_key_bytes)
    assert reason(None, key=big_key) == "tombstone"
    assert reason(b"", key=big_key) == "empty"
    assert reason(b"[" * 2000, small, key=big_key) == "key_too_large"
    assert reason(b"[" * 2000, small) == "too_large"
    assert reason(b'{"a": "\xff", "b": [[[', LIMITS) == "invalid_utf8"
    assert reason(b'{"a": [[[', LIMITS) == "invalid_json"
    assert reason(b"[" * 20 + b"]" * 20, LIMITS) == "not_an_object"


def test_limits_come_from_the_kafka_settings() -> None:
    kafka = kafka_settings(max_row_bytes=123, max_row_depth=7, max_key_bytes=45)
    assert RowLimits.from_settings(kafka) == RowLimits(max_bytes=123, max_depth=7, max_key_bytes=45)
